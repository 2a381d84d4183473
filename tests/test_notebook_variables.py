"""In a real notebook: variables go to /mnt/data with a schema card, files come back as objects, and
every bad input is a one-paragraph error that loses nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tests.notebook_support import kernel_env, openai_env, output_text, run_cells


def error_text(cell) -> str:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert len(errors) == 1, output_text(cell)
    rendered = "\n".join(errors[0].traceback)
    assert "Traceback" not in rendered and 'File "' not in rendered, rendered
    return rendered


def ok(cell) -> str:
    assert all(o.output_type != "error" for o in cell.outputs), output_text(cell)
    return output_text(cell)


def test_a_prompt_naming_df_sends_it_with_a_card_and_the_result_comes_back_equal(
    openai_server, tmp_path: Path
) -> None:
    cells = [
        "%load_ext ci_magic",
        "import pandas as pd\n"
        "df = pd.DataFrame({'region': ['north', 'south', 'east'] * 4,\n"
        "                   'revenue': [float(i) for i in range(12)]})",
        "%%ci\nSummarize df and plot it",
        "summary = %ci_pull df_summary.csv -o summary\nprint(type(summary).__name__, summary.shape)",
        "%ci_files",
        "squares = 'my own notes'",
        "%%ci_exec\nimport pandas as pd\n"
        "pd.DataFrame({'n': [1, 2, 3], 'sq': [1, 4, 9]}).to_csv('squares.csv', index=False)",
        "sq2 = %ci_pull squares.csv\n"
        "print(type(squares).__name__, squares, '|', type(sq2).__name__, sq2.shape)",
        "%ci_pull --all\nprint('machine-named:', sorted(n for n in globals() if n.startswith('cfile_')))",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path)
    turn = ok(notebook.cells[2])
    # Auto-push is not silent: one line per variable sent, with where it went and its shape.
    assert re.search(r"df -> /mnt/data/[0-9a-f]{32}-df\.parquet \(12 x 2\): sent, ", turn), turn
    request = openai_server.requests_to("/v1/responses", "POST")[0].json
    prompt = str(request["input"])
    # OpenAI stores an upload as /mnt/data/<32 hex>-<name>: the card gives the model that real path.
    assert re.search(r"/mnt/data/[0-9a-f]{32}-df\.parquet: pandas DataFrame", prompt), prompt
    assert "revenue" in prompt and "float64" in prompt
    assert "pd.read_parquet" in prompt, "the card says how to load the file"
    uploads = [r for r in openai_server.requests if r.method == "POST" and r.path.endswith("/files")]
    assert len(uploads) == 1
    expected = pd.DataFrame(
        {"region": ["north", "south", "east"] * 4, "revenue": [float(i) for i in range(12)]}
    ).describe(include="all")
    pulled = pd.read_csv(tmp_path / "ci_outputs" / "df_summary.csv", index_col=0)
    assert pulled.loc["count", "revenue"] == expected.loc["count", "revenue"] == 12
    assert pulled.loc["mean", "revenue"] == expected.loc["mean", "revenue"]
    assert "DataFrame (11, 3)" in ok(notebook.cells[3]), "describe() rows; the index column comes back too"
    files = ok(notebook.cells[4])
    assert "df.parquet" in files and "notebook" in files and "df_summary.csv" in files and "model" in files
    assert re.search(r"path in the container.*/mnt/data/[0-9a-f]{32}-df\.parquet", files, re.DOTALL), files
    # Bind only what the user asked for: the assignment names the variable; `squares` stays theirs.
    assert "str my own notes | DataFrame (3, 2)" in ok(notebook.cells[7])
    everything = ok(notebook.cells[8])
    assert "(not bound: the backend named it)" in everything, "the plot's cfile_<hex>.png is saved, not bound"
    assert "machine-named: []" in everything


def test_bad_inputs_are_clear_errors_and_nothing_is_lost(openai_server, tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic\nimport threading\n"
        "import pandas as pd\nsales_df = pd.DataFrame({'x': [1, 2, 3]})",
        "%ci_push sales_df",
        "%ci_push sales_dff",  # unknown variable: suggest the close name
        "lock = threading.Lock()\n%ci_push lock",  # unsupported type
        "%config CodeInterpreter.upload_size_cap = 10\nbig = 'x' * 1000\n%ci_push big",  # over the cap
        "%config CodeInterpreter.upload_size_cap = 536870912\n%ci_pull nothing_here.csv",  # not in container
        "%%ci_exec\nopen('/mnt/data/broken.parquet', 'w').write('not parquet')",
        "%ci_pull broken.parquet",  # undecodable: keeps the bytes
        "%ci_push sales_df --format nosuchformat",  # bad flag value
        "%ci_pull",  # bad flags: neither a name nor --all
        "%%ci_exec\nimport pandas as pd\nprint(pd.read_parquet('/mnt/data/sales_df.parquet').x.sum())",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path)
    ok(notebook.cells[1])
    unknown = error_text(notebook.cells[2])
    assert "sales_dff" in unknown and "sales_df" in unknown.replace("sales_dff", "")
    unsupported = error_text(notebook.cells[3])
    assert "DataFrame" in unsupported and "--pickle" in unsupported
    over = error_text(notebook.cells[4])
    assert "upload_size_cap" in over or "cap" in over
    missing = error_text(notebook.cells[5])
    assert "nothing_here.csv" in missing and "sales_df.parquet" in missing, "it lists what is there"
    ok(notebook.cells[6])
    undecodable = error_text(notebook.cells[7])
    assert "broken.parquet" in undecodable and "ci_outputs" in undecodable
    assert (tmp_path / "ci_outputs" / "broken.parquet").read_bytes() == b"not parquet"
    assert "nosuchformat" in error_text(notebook.cells[8])
    usage = output_text(notebook.cells[9])  # IPython prints UsageError itself, in one line
    assert usage.startswith("UsageError:") and "--all" in usage
    assert "6" in ok(notebook.cells[10]), "the container and its files survived every failed cell"
    creates = [r for r in openai_server.requests if r.method == "POST" and r.path == "/v1/containers"]
    assert len(creates) == 1
