"""A user runs %%ci cells in a real notebook (nbclient + ipykernel) against the OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.notebook_support import (
    answers_of,
    kernel_env,
    openai_env,
    output_text,
    run_cells,
    texts_by_mime,
)
from tests.servers.recordings import PYDANTIC_IMAGE_STREAM, VERCEL_CHUNKS, fixtures_available, load_stream
from tests.servers.replay import Replay
from tests.servers.scripted import Call, Text

QUICKSTART_PROMPT = "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"
needs_recordings = pytest.mark.skipif(
    not fixtures_available(), reason="../shared/fixtures/openai/ (the genuine OpenAI recordings) is absent"
)


def responses_requests(server) -> list:
    return [r for r in server.requests if r.method == "POST" and r.path == "/v1/responses"]


def test_quickstart_cell_shows_code_chart_table_file_and_answer(openai_server, tmp_path: Path) -> None:
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(
            [
                "%load_ext ci_magic",
                QUICKSTART_PROMPT,
                "print(_ci.container_id, len(_ci.calls))",
                "%ci_status",
            ],
            tmp_path,
            save_as="saved.ipynb",
        )
    cell = notebook.cells[1]
    text = output_text(cell)
    assert not [o for o in cell.outputs if o.output_type == "error"], text
    assert 'df["square"] = df["n"] ** 2' in text  # the first call's code
    assert "plt.show()" in text  # the second call's code
    assert texts_by_mime(cell, "image/png"), "the chart is shown inline"
    answers = answers_of(cell)
    assert any("squares.csv" in answer["text/plain"] for answer in answers), "the answer, as text"
    assert any('href="ci_outputs/squares.csv"' in answer["text/html"] for answer in answers), "as a link"
    assert "sandbox:/mnt/data" not in json.dumps(answers), "links point at local copies"
    assert not texts_by_mime(cell, "text/markdown"), "nothing the model wrote goes out as Markdown"
    assert (tmp_path / "ci_outputs" / "squares.csv").read_text().startswith("n,square")
    html = "\n".join(texts_by_mime(cell, "text/html"))
    assert "<table" in html and "square" in html and "100 rows" in html, "the csv is previewed as a table"
    assert "cntr_" in output_text(notebook.cells[2]) and "2" in output_text(notebook.cells[2])
    status = output_text(notebook.cells[3])
    assert "openai" in status and "cntr_" in status and "tokens" in status


def test_second_cell_reuses_container_and_continues_conversation(openai_server, tmp_path: Path) -> None:
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(
            [
                "%load_ext ci_magic",
                QUICKSTART_PROMPT,
                "%%ci\nWhat is in /mnt/data now?",
                "%%ci --new\nStart over.",
            ],
            tmp_path,
        )
    assert all(o.output_type != "error" for c in notebook.cells for o in c.outputs), output_text(
        notebook.cells[2]
    )
    creates = [r for r in openai_server.requests if r.method == "POST" and r.path == "/v1/containers"]
    assert len(creates) == 1, "one container per kernel session"
    assert creates[0].json["name"].startswith("ci-magic-")
    assert creates[0].json["expires_after"] == {"anchor": "last_active_at", "minutes": 20}
    first, second, third = (r.json for r in responses_requests(openai_server))
    assert first.get("previous_response_id") is None
    assert second["previous_response_id"] and second["previous_response_id"].startswith("resp_")
    assert third.get("previous_response_id") is None, "--new starts a fresh conversation"
    container = first["tools"][0]["container"]
    assert container.startswith("cntr_") and second["tools"][0]["container"] == container
    assert first["stream"] is True and first["include"] == ["code_interpreter_call.outputs"]


@needs_recordings
@pytest.mark.parametrize("recording", [VERCEL_CHUNKS, PYDANTIC_IMAGE_STREAM])
def test_replayed_recording_renders_every_call_text_and_images(
    openai_server, tmp_path: Path, recording
) -> None:
    openai_server.responder = Replay(recording)
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(["%load_ext ci_magic", "%%ci\nReplay the recording"], tmp_path)
    cell = notebook.cells[1]
    text = output_text(cell)
    assert not [o for o in cell.outputs if o.output_type == "error"], text
    events = [e.json for e in load_stream(Replay(recording).path)]
    done = next(e for e in events if e["type"] == "response.completed")["response"]["output"]
    for item in done:
        if item["type"] == "code_interpreter_call":
            for line in item["code"].replace("\r\n", "\n").strip().splitlines():
                assert line.strip() in text.replace("&#x27;", "'").replace("&quot;", '"').replace(
                    "&lt;", "<"
                ).replace("&gt;", ">").replace("&amp;", "&"), f"code line missing: {line}"
    final_text = next(e for e in events if e["type"] == "response.output_text.done")["text"]
    first_words = final_text.split("\n")[0][:40]
    # The answer's own display: HTML we rendered from its Markdown, and its text/plain read as is.
    answers = [answer["text/plain"] for answer in answers_of(cell)]
    assert any(first_words in plain for plain in answers), answers
    images = texts_by_mime(cell, "image/png")
    has_image_output = any(
        o.get("type") == "image"
        for item in done
        if item["type"] == "code_interpreter_call"
        for o in item["outputs"] or []
    )
    if has_image_output:
        assert len(set(images)) == len(images), "the plt.show() image is not shown twice"
        assert images


def test_rate_limit_and_server_error_are_retried(openai_server, tmp_path: Path) -> None:
    openai_server.fail_next("/v1/responses", 429, times=1, retry_after=0.1)
    openai_server.fail_next("/v1/containers", 500, times=1)
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(["%load_ext ci_magic", QUICKSTART_PROMPT], tmp_path)
    assert all(o.output_type != "error" for o in notebook.cells[1].outputs), output_text(notebook.cells[1])
    statuses = [r.status for r in openai_server.requests if r.path in ("/v1/responses", "/v1/containers")]
    assert 429 in statuses and 500 in statuses and statuses.count(200) >= 2


def test_api_errors_show_the_api_message_without_traceback(openai_server, tmp_path: Path) -> None:
    openai_server.require_model("gpt-5-mini")
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(
            ["%load_ext ci_magic", "%%ci --model no-such-model\nHello", "%%ci\nWhat is in /mnt/data?"],
            tmp_path,
        )
    failed = notebook.cells[1]
    errors = [o for o in failed.outputs if o.output_type == "error"]
    assert len(errors) == 1
    rendered = "\n".join(errors[0].traceback)
    assert "404" in rendered and "no-such-model" in rendered
    assert "Traceback" not in rendered and "File " not in rendered, rendered
    assert all(o.output_type != "error" for o in notebook.cells[2].outputs), "the kernel is usable afterwards"


def test_missing_key_explains_how_to_configure(tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": None, "AZURE_OPENAI_API_KEY": None, "CI_MAGIC_BACKEND": "openai"}
    with kernel_env(**env):
        notebook = run_cells(["%load_ext ci_magic", "%%ci\nHello", "1 + 1"], tmp_path)
    errors = [o for o in notebook.cells[1].outputs if o.output_type == "error"]
    assert len(errors) == 1
    message = "\n".join(errors[0].traceback)
    assert "OPENAI_API_KEY" in message and "AZURE_OPENAI_ENDPOINT" in message and "local" in message
    assert "Traceback" not in message
    assert notebook.cells[2].outputs[0]["data"]["text/plain"] == "2"


def test_stream_cut_midway_keeps_what_arrived_and_next_cell_works(openai_server, tmp_path: Path) -> None:
    openai_server.responder = [
        [Call("x = 6 * 7\nprint('partial', x)"), Text("The answer is 42.")],
        [Call("print(x)"), Text("Still 42.")],
    ]
    openai_server.cut_stream_after(25)
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(["%load_ext ci_magic", "%%ci\nCompute 6*7", "%%ci\nPrint x again"], tmp_path)
    cut = notebook.cells[1]
    errors = [o for o in cut.outputs if o.output_type == "error"]
    assert len(errors) == 1 and "stream" in "\n".join(errors[0].traceback).lower()
    assert "x = 6 * 7" in output_text(cut), "the code that arrived stays on screen"
    after = notebook.cells[2]
    assert all(o.output_type != "error" for o in after.outputs), output_text(after)


def test_expired_container_is_replaced_and_files_resent(openai_server, tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\n%ci_push df",
        QUICKSTART_PROMPT,
        "cid = _ci.container_id\nprint(cid)",
        "%%ci\nWhat is in /mnt/data now?",
        "print(_ci.container_id != cid)",
    ]

    def expire(notebook) -> None:
        openai_server.expire(output_text(notebook.cells[3]).strip())

    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path, before={4: expire})
    replaced = notebook.cells[4]
    assert all(o.output_type != "error" for o in replaced.outputs), output_text(replaced)
    assert "new one" in output_text(replaced)
    assert output_text(notebook.cells[5]).strip().endswith("True")
    uploads = [r for r in openai_server.requests if r.method == "POST" and r.path.endswith("/files")]
    assert len(uploads) == 2, "df.parquet was sent to the first container and again to the new one"
    last = responses_requests(openai_server)[-1].json
    # The model is told (its variables are gone, or the code that made them was run again).
    assert "The previous container expired and was replaced" in str(last["input"])
