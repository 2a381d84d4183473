"""The openai backend reads genuine OpenAI streams: every call's code, outputs, text and citations."""

from __future__ import annotations

import pytest

from ci_magic import events
from ci_magic.backends.openai_backend import ResponsesTranslator
from ci_magic.result import ResultBuilder
from tests.servers.recordings import (
    PYDANTIC_IMAGE_STREAM,
    VERCEL_CHUNKS,
    fixtures_available,
    load_stream,
    resolve_recording,
)

pytestmark = pytest.mark.skipif(
    not fixtures_available(), reason="../shared/fixtures/openai/ (the genuine OpenAI recordings) is absent"
)


def translate(name: str, *, without_outputs: bool = False) -> tuple[list, ResultBuilder]:
    raw = [e.json for e in load_stream(resolve_recording(name))]
    if without_outputs:  # as a request without `include` (or some gateways) streams it
        for item in raw:
            if item.get("type") == "response.output_item.done" and "outputs" in item["item"]:
                item["item"]["outputs"] = None
    translator = ResponsesTranslator()
    builder = ResultBuilder("recorded prompt")
    collected = []
    for item in raw:
        for event in translator.translate(item):
            builder.feed(event)
            collected.append(event)
    assert translator.finished
    return collected, builder


def recorded_calls(name: str) -> list[dict]:
    completed = [
        e.json for e in load_stream(resolve_recording(name)) if e.json["type"] == "response.completed"
    ]
    return [item for item in completed[0]["response"]["output"] if item["type"] == "code_interpreter_call"]


def test_three_calls_with_logs_and_a_csv_citation() -> None:
    collected, builder = translate(VERCEL_CHUNKS)
    result = builder.result
    expected = recorded_calls(VERCEL_CHUNKS)
    assert [c.code for c in result.calls] == [item["code"] for item in expected]
    assert [c.logs for c in result.calls] == [
        "".join(o["logs"] for o in item["outputs"]) for item in expected
    ]
    assert all(c.status == "completed" for c in result.calls)
    assert "sandbox:/mnt/data/roll2dice_sums_10000.csv" in result.text
    assert [c.filename for c in result.citations] == ["roll2dice_sums_10000.csv"]
    assert result.response_id.startswith("resp_") and result.usage.total_tokens > 0
    # Deltas are streamed one by one (the renderer throttles, not the translator).
    assert sum(isinstance(e, events.CodeDelta) for e in collected) == 149
    assert sum(isinstance(e, events.TextDelta) for e in collected) == 209
    assert isinstance(collected[-1], events.Completed)


def test_image_output_and_zero_length_citation() -> None:
    collected, builder = translate(PYDANTIC_IMAGE_STREAM)
    result = builder.result
    images = [e for e in collected if isinstance(e, events.Image)]
    assert len(images) == 1 and images[0].data.startswith(b"\x89PNG")
    cites = [e for e in collected if isinstance(e, events.FileCited)]
    assert [c.displayed for c in cites] == [True, False], "the zero-length citation is the image shown"
    assert cites[0].filename.startswith("cfile_") and cites[0].filename.endswith(".png")
    assert [c.code for c in result.calls] == [item["code"] for item in recorded_calls(PYDANTIC_IMAGE_STREAM)]
    assert any(isinstance(e, events.Logs) for e in collected)
    started = [e for e in collected if isinstance(e, events.CallStarted)]
    assert started[0].container_id and started[0].container_id.startswith("cntr_")


def test_without_call_outputs_the_zero_length_cited_image_is_the_only_copy_and_is_fetched() -> None:
    collected, _ = translate(PYDANTIC_IMAGE_STREAM, without_outputs=True)
    assert not [e for e in collected if isinstance(e, events.Image)]
    cites = [e for e in collected if isinstance(e, events.FileCited)]
    assert cites[0].filename.startswith("cfile_") and not cites[0].displayed, "nothing shown it: fetch it"
