"""A user saves a notebook of %%ci cells and later reads, from the file alone, what each cell did:
backend, model, container, responses, times, code, inputs, files (with hashes), tokens and cost."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat
from nbconvert import NotebookExporter

from tests.notebook_support import kernel_env, openai_env, output_text, run_cells
from tests.servers.scripted import Call, Text

SCALE = (
    "import glob\nimport pandas as pd\n"
    "source = pd.read_parquet(glob.glob('/mnt/data/*df.parquet')[0])\n"
    "source['b'] = source['a'] * 10\n"
    "source.to_csv('/mnt/data/scaled.csv', index=False)"
)
SHOW = "print(source['b'].sum())"


def records_of(cell) -> list[dict]:
    return [o["metadata"]["ci_magic"] for o in cell.get("outputs", []) if "ci_magic" in o.get("metadata", {})]


def test_saved_notebook_tells_what_each_cell_did(openai_server, tmp_path: Path) -> None:
    openai_server.responder = [
        [Call(SCALE), Call(SHOW), Text("Saved [scaled.csv](sandbox:/mnt/data/scaled.csv).")],
        [Call("print(sum(range(10)))"), Text("Done.")],  # %%ci_exec: the model runs the code given
    ]
    cells = [
        "%load_ext ci_magic",
        "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\n%ci_push df",
        "%%ci\nScale column a of df by 10 and save it as scaled.csv",
        "print(_ci.container_id, _ci.response_id)",
        "%%ci_exec\nprint(sum(range(10)))",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        run_cells(cells, tmp_path, save_as="analysis.ipynb")

    saved = nbformat.read(tmp_path / "analysis.ipynb", as_version=4)
    container_id, response_id = output_text(saved.cells[3]).split()
    [turn] = records_of(saved.cells[2])
    assert turn["schema"] == "ci-magic/provenance" and turn["version"] == 1 and turn["kind"] == "ci"
    assert turn["backend"] == "openai" and turn["model"] == "gpt-5-mini"
    assert turn["container_id"] == container_id and turn["response_ids"] == [response_id]
    assert turn["started_at"] < turn["ended_at"] and turn["started_at"].endswith("Z")
    assert turn["prompt"].strip() == "Scale column a of df by 10 and save it as scaled.csv"
    assert [call["code"] for call in turn["calls"]] == [SCALE, SHOW]
    assert all(call["ok"] for call in turn["calls"])
    [pushed] = turn["inputs"]
    assert (
        pushed["name"] == "df" and pushed["path"].endswith("df.parquet") and len(pushed["fingerprint"]) >= 16
    )
    [scaled] = turn["files"]
    local = (tmp_path / "ci_outputs" / "scaled.csv").read_bytes()
    assert scaled == {
        "name": "scaled.csv",
        "path": "/mnt/data/scaled.csv",
        "size": len(local),
        "sha256": hashlib.sha256(local).hexdigest(),
    }
    assert turn["usage"]["total_tokens"] > 0
    assert turn["cost"]["currency"] == "USD" and turn["cost"]["total"] > 0 and turn["cost"]["container"] > 0
    timings = turn["timings"]
    assert timings["wall"] > 0 and timings["first_code"] is not None and timings["model"] is not None

    [exec_turn] = records_of(saved.cells[4])
    assert exec_turn["kind"] == "exec" and exec_turn["prompt"] == ""
    assert exec_turn["calls"] == [
        {
            "code": "print(sum(range(10)))",
            "ok": True,
            "error": None,
            "seconds": exec_turn["calls"][0]["seconds"],
        }
    ]
    assert exec_turn["container_id"] == container_id
    assert "test-key" not in (tmp_path / "analysis.ipynb").read_text(), "no secret is saved"

    # nbconvert (what a pipeline or a reviewer runs over the file) keeps the records.
    converted, _ = NotebookExporter().from_filename(str(tmp_path / "analysis.ipynb"))
    again = nbformat.reads(converted, as_version=4)
    assert records_of(again.cells[2]) == [turn] and records_of(again.cells[4]) == [exec_turn]
