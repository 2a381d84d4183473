"""A user re-runs what the AI did without asking it again (%ci_replay), and takes the whole analysis
out of the notebook as a plain script that reproduces its output with no model and no ci-magic."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tests.notebook_support import errors_of, kernel_env, openai_env, output_text, run_cells
from tests.servers.chat_server import quickstart
from tests.servers.responses_stream import prompt_text
from tests.servers.scripted import Call, Text, forced_code_turn
from tests.test_notebook_local import no_key_env
from tests.test_provenance import SCALE, SHOW, records_of

SQUARES_PROMPT = (
    "%%ci -o first\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"
)
# The user's own DataFrame, sent to the container before the turn.
PUSH_DF = "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\n%ci_push df"
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the local sandbox needs Linux namespaces"
)


@needs_linux
@pytest.mark.slow
def test_replay_reruns_recorded_code_without_a_model_request(chat_server, tmp_path: Path) -> None:
    server = chat_server(quickstart)
    asked: list[int] = []
    cells = [
        "%load_ext ci_magic",
        SQUARES_PROMPT,
        "%ci_replay",
        "%%ci_exec\ndel df",  # the state the turn made is gone: only a real re-run brings it back
        "%ci_replay first -o again",
        "%%ci_exec\nprint('rows', len(df))",
        "print(again.ok, again.code == first.code)",
    ]
    with kernel_env(**no_key_env(server.base_url)):
        notebook = run_cells(
            cells,
            tmp_path,
            timeout=180,
            save_as="first.ipynb",
            before={2: lambda _: asked.append(len(server.chat_requests))},
        )
    for cell in notebook.cells:
        assert not errors_of(cell), output_text(cell)
    assert asked[0] > 0 and len(server.chat_requests) == asked[0], "the replays asked the model nothing"
    [turn] = records_of(notebook.cells[1])
    assert turn["backend"] == "local" and turn["kind"] == "ci" and len(turn["calls"]) >= 2
    assert all(call["seconds"] is not None for call in turn["calls"]), "each call's execution time"
    replay = notebook.cells[2]
    assert re.search(r"Re-running [23] code blocks of the last turn", output_text(replay))
    assert 'df["square"] = df["n"] ** 2' in output_text(replay), "rendered like any turn: the code is shown"
    [record] = records_of(replay)
    assert record["kind"] == "replay" and len(record["calls"]) == 1 and record["calls"][0]["ok"]
    assert "the Result in first" in output_text(notebook.cells[4])
    assert "rows 100" in output_text(notebook.cells[5])
    assert output_text(notebook.cells[6]).strip() == "True True"

    # Days later, in a new kernel (a new container): the saved cell In [2] is re-run from its record.
    (tmp_path / "later").mkdir()
    with kernel_env(**no_key_env(server.base_url)):
        later = run_cells(
            [
                "%load_ext ci_magic",
                "%ci_replay --cell 2 --notebook ../first.ipynb",
                "%%ci_exec\nprint(df.shape)",
            ],
            tmp_path / "later",
            timeout=180,
        )
    assert not errors_of(later.cells[1]), output_text(later.cells[1])
    assert "cell In [2] of first.ipynb" in output_text(later.cells[1])
    assert "(100, 2)" in output_text(later.cells[2])
    assert len(server.chat_requests) == asked[0]


def test_export_runs_with_plain_python_and_reproduces_the_output(openai_server, tmp_path: Path) -> None:
    openai_server.responder = [
        [Call(SCALE), Call("source.plot(); undefined_name"), Call(SHOW), Text("Saved scaled.csv.")],
    ]
    cells = [
        "%load_ext ci_magic",
        PUSH_DF,
        "%%ci\nScale column a of df by 10 and save it as scaled.csv",
        "%ci_export export/analysis.py",
        "%ci_export export/analysis.ipynb",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path)
    for cell in notebook.cells:
        assert not errors_of(cell), output_text(cell)
    assert "1 failed call kept as comments" in output_text(notebook.cells[3])

    folder = tmp_path / "export"
    script = (folder / "analysis.py").read_text()
    assert "'/mnt/data" not in script and "'./scaled.csv'" in script, "paths point at the script's folder"
    assert "ci_magic" not in script
    assert "# source.plot(); undefined_name" in script, "the failed call is kept, as a comment"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".parquet")[0].endswith("df.parquet")

    # A clean folder elsewhere, a plain interpreter, and ci_magic made unimportable.
    clean = tmp_path / "elsewhere"
    clean.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import runpy, sys; sys.modules['ci_magic'] = None; "
            f"runpy.run_path({str(folder / 'analysis.py')!r}, run_name='__main__')",
        ],
        cwd=clean,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(clean)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "60", "the last call ran: 10 + 20 + 30"
    produced = (folder / "scaled.csv").read_bytes()
    assert produced == (tmp_path / "ci_outputs" / "scaled.csv").read_bytes()
    assert pd.read_csv(folder / "scaled.csv")["b"].tolist() == [10, 20, 30]

    exported = nbformat.read(folder / "analysis.ipynb", as_version=4)
    nbformat.validate(exported)
    code_cells = [c.source for c in exported.cells if c.cell_type == "code"]
    assert any("source['b'] = source['a'] * 10" in c for c in code_cells)


def test_replay_on_openai_is_one_forced_run_of_the_recorded_code(openai_server, tmp_path: Path) -> None:
    openai_server.responder = [
        [Call(SCALE), Call(SHOW), Text("Saved scaled.csv.")],
        [Call(f"{SCALE}\n\n{SHOW}"), Text("Ran it.")],  # the model copies the code it is given
        [Call("print('something else')"), Text("Ran it.")],  # a model that did not copy it
    ]
    cells = [
        "%load_ext ci_magic",
        PUSH_DF,
        "%%ci -o scaled\nScale column a of df by 10 and save it as scaled.csv",
        "%ci_replay",
        "%ci_replay scaled",
        "print(_ci.ok)",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path)
    replay = notebook.cells[3]
    assert not errors_of(replay), output_text(replay)
    assert "60" in output_text(replay)
    requests = [r.json for r in openai_server.requests if r.method == "POST" and r.path == "/v1/responses"]
    assert len(requests) == 3, "one request for the turn, one for each replay"
    assert requests[1]["tool_choice"] == {"type": "code_interpreter"}, "the model must run, not write, code"
    assert SCALE in str(requests[1]["input"]) and SHOW in str(requests[1]["input"])

    [error] = errors_of(notebook.cells[4])
    assert "did not run the recorded code as written" in "\n".join(error.traceback)
    assert "Traceback" not in "\n".join(error.traceback)
    assert output_text(notebook.cells[5]).strip() == "False", "_ci is the refused replay's Result"


def upload_reader(request: dict) -> list:
    """A model that reads the pushed table at the path its schema card gives (OpenAI's hashed name),
    and runs the code it is given when the tool is forced."""
    forced = forced_code_turn(request, text="Ran it.")
    if forced is not None:
        return list(forced)
    path = re.search(r"/mnt/data/[0-9a-f]{32}-df\.parquet", prompt_text(request)).group(0)
    return [
        Call(f"import pandas as pd\nprint('total', pd.read_parquet({path!r})['a'].sum())"),
        Text("Read it."),
    ]


def test_a_saved_cell_replays_in_a_new_container_where_the_upload_has_a_new_name(
    openai_server, tmp_path: Path
) -> None:
    openai_server.responder = upload_reader
    with kernel_env(**openai_env(openai_server.url)):
        first = run_cells(
            ["%load_ext ci_magic", PUSH_DF, "%%ci\nWhat is the total of df.a?"],
            tmp_path,
            save_as="first.ipynb",
        )
        (tmp_path / "later").mkdir()
        later = run_cells(
            ["%load_ext ci_magic", PUSH_DF, "%ci_replay --cell 3 --notebook ../first.ipynb"],
            tmp_path / "later",
        )
    [recorded] = records_of(first.cells[2])
    [replayed] = records_of(later.cells[2])
    assert recorded["container_id"] != replayed["container_id"]
    assert recorded["inputs"][0]["path"] != replayed["inputs"][0]["path"], "OpenAI named the upload anew"
    assert replayed["inputs"][0]["path"] in replayed["calls"][0]["code"]
    assert not errors_of(later.cells[2]) and "total 6" in output_text(later.cells[2]), output_text(
        later.cells[2]
    )
