"""A user's container expires mid-session on OpenAI, and the server refuses the old conversation too.

OpenAI answers ``400 Container is expired.`` to a request naming the expired container, and (as
users report) the same 400 to a ``previous_response_id`` chained to it. Both refusals must leave
the user with a working cell: a new container, the conversation carried over from the session's
own transcript, and one line saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.notebook_support import errors_of, kernel_env, openai_env, output_text, run_cells

pytestmark = pytest.mark.slow

SQUARES = "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"


def responses(server) -> list:
    return [r for r in server.requests if r.method == "POST" and r.path == "/v1/responses"]


def expire_printed_container(server, cell_index: int):
    def expire(notebook) -> None:
        server.expire(output_text(notebook.cells[cell_index]).strip().splitlines()[-1])

    return expire


def test_both_refusals_the_cell_still_answers_with_the_conversation_carried_over(
    openai_server, tmp_path: Path
) -> None:
    openai_server.chain_expiry.refuse = True  # as users report: the chain to an expired container is refused
    cells = [
        "%load_ext ci_magic",
        SQUARES,
        "print(_ci.container_id)",
        "%%ci\nWhat is in /mnt/data now?",
        "%%ci\nAnd now?",
    ]
    env = openai_env(openai_server.url, JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"))
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, before={3: expire_printed_container(openai_server, 2)})
    after = notebook.cells[3]
    text = output_text(after)
    assert not errors_of(after), text
    assert "started a new one" in text, "the container was replaced"
    assert "conversation was carried over" in text, "one line says the conversation came along"
    print(text)

    sent = responses(openai_server)
    refusals = [r for r in sent if r.status == 400]
    assert len(refusals) == 2, "first the expired container, then the chain to it"
    first_container = sent[0].json["tools"][0]["container"]
    named_expired, chained = refusals
    assert named_expired.json["tools"][0]["container"] == first_container
    assert chained.json["tools"][0]["container"] != first_container, "a live container, refused all the same"
    assert chained.json["previous_response_id"], "because of the chain"
    assert openai_server.chain_expiry.refused == 2
    carried = next(r.json for r in sent if r.status == 200 and isinstance(r.json.get("input"), list))
    assert carried.get("previous_response_id") is None, "no chain: the transcript goes instead"
    history = carried["input"]
    assert history[0]["role"] == "user" and history[0]["content"].strip() == SQUARES.split("\n", 1)[1]
    assert 'df["square"] = df["n"] ** 2' in history[1]["content"], "the model sees the code that ran"
    assert "squares.csv" in history[1]["content"]
    assert history[-1]["role"] == "user" and "What is in /mnt/data now?" in history[-1]["content"]
    assert carried["tools"][0]["container"] == chained.json["tools"][0]["container"]

    later = notebook.cells[4]
    assert not errors_of(later), output_text(later)
    last = sent[-1].json
    assert last["previous_response_id"], "once carried over, the conversation chains again"
    assert isinstance(last["input"], str), "and the transcript is not sent a second time"


def test_a_chain_the_server_still_accepts_is_kept_and_the_model_is_told_what_came_back(
    openai_server, tmp_path: Path
) -> None:
    cells = ["%load_ext ci_magic", SQUARES, "print(_ci.container_id)", "%%ci\nWhat is in /mnt/data now?"]
    env = openai_env(openai_server.url, JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"))
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, before={3: expire_printed_container(openai_server, 2)})
    after = notebook.cells[3]
    assert not errors_of(after), output_text(after)
    assert "carried over" not in output_text(after)
    last = responses(openai_server)[-1].json
    assert last["previous_response_id"], "the server's chain is the cheaper way to continue"
    told = str(last["input"])
    assert "run again there" in told and "df" in told, "the model knows its variables are back"
    assert "are gone" not in told
