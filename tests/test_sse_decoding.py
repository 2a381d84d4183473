"""The openai backend decodes the Responses SSE stream itself: byte for byte what the SDK decodes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from openai._streaming import SSEDecoder as SDKDecoder

from ci_magic import CodeInterpreter
from ci_magic.backends.openai_backend import ResponsesTranslator
from ci_magic.backends.sse import ServerSentEvent, SSEDecoder, decode_all
from ci_magic.errors import CIError
from ci_magic.events import Failed
from tests.render_support import RecordingFrontend
from tests.servers.recordings import (
    PYDANTIC_IMAGE_STREAM,
    VERCEL_CHUNKS,
    fixtures_available,
    load_cassette,
    resolve_recording,
)
from tests.servers.responses_stream import ResponseEvents, SSEEvent
from tests.servers.scripted import Call, Text

needs_recordings = pytest.mark.skipif(
    not fixtures_available(), reason="../shared/fixtures/openai/ (the genuine OpenAI recordings) is absent"
)


def chunks(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def sdk_events(body: bytes) -> list[tuple[str | None, str]]:
    return [(e.event, e.data) for e in SDKDecoder().iter_bytes(iter([body]))]


def ours(body: bytes, size: int) -> list[tuple[str | None, str]]:
    return [(e.event, e.data) for e in decode_all(chunks(body, size))]


def cassette_body() -> bytes:
    for interaction in load_cassette(resolve_recording(PYDANTIC_IMAGE_STREAM)):
        if interaction.body.lstrip().startswith("event:"):
            return interaction.body.encode()
    raise AssertionError("the cassette has no SSE body")


@needs_recordings
@pytest.mark.parametrize("size", [1, 7, 100, 4096, 10**7])
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_genuine_stream_decodes_like_the_sdk_however_it_is_chunked(size: int, line_end: bytes) -> None:
    body = cassette_body().replace(b"\n", line_end)
    expected = sdk_events(cassette_body())
    assert len(expected) > 30 and expected[0][0] == "response.created"
    assert ours(body, size) == expected


@needs_recordings
def test_every_recorded_payload_survives_decoding_unchanged() -> None:
    lines = [line for line in resolve_recording(VERCEL_CHUNKS).read_text().splitlines() if line.strip()]
    body = "".join(f"data: {line}\n\n" for line in lines).encode()
    assert [e.data for e in decode_all(chunks(body, 1500))] == lines


def test_the_spec_rules_for_fields_comments_and_multiline_data() -> None:
    body = (
        b": a comment, then an event with two data lines\n"
        b"event: response.output_text.delta\nid: 7\ndata: first\ndata:second\n\n"
        b"event: ping\n\n"  # no data: nothing is dispatched
        b"data\n\n"  # a field name alone is an empty value
        b'retry: 10\nunknown: x\ndata: {"\xc3\xa9": 1}\n\n'
        b"data: the last event has no blank line after it"
    )
    assert decode_all(chunks(body, 3)) == [
        ServerSentEvent("first\nsecond", "response.output_text.delta", "7"),
        ServerSentEvent("", None, "7"),
        ServerSentEvent('{"é": 1}', None, "7"),
    ]


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == [ServerSentEvent("a")]  # CRLF, then CR: the blank line
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [ServerSentEvent("b")]


def test_a_large_event_arriving_in_small_chunks_is_decoded_once_complete() -> None:
    payload = json.dumps({"type": "response.completed", "blob": "x" * 300_000})
    decoder = SSEDecoder()
    events = [e for chunk in chunks(f"data: {payload}\n\n".encode(), 512) for e in decoder.feed(chunk)]
    assert [e.data for e in events] == [payload]


def test_error_payloads_become_one_failure_with_the_message() -> None:
    responses_error = {"type": "error", "code": "server_error", "message": "The model is overloaded."}
    gateway_error = {"error": {"message": "Quota exceeded.", "type": "insufficient_quota"}}
    for payload, message in [(responses_error, "overloaded"), (gateway_error, "Quota exceeded.")]:
        translator = ResponsesTranslator()
        [failed] = translator.translate(payload)
        assert isinstance(failed, Failed) and message in failed.message and translator.finished


class FailsAfterStarting:
    """A model that starts a response, then fails: the server says so in-band, as OpenAI does."""

    def events(self, ctx) -> Iterator[SSEEvent]:
        yield from ResponseEvents(ctx).start()
        raise RuntimeError("The model is overloaded, try again later")


def test_an_in_band_error_ends_the_cell_with_its_message_and_the_session_goes_on(
    openai_server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    interpreter = CodeInterpreter(frontend=RecordingFrontend(), output_dir=str(tmp_path), backend="openai")
    openai_server.responder = [[Call("x = 41")]]
    interpreter.run("set x")
    openai_server.responder = FailsAfterStarting()
    with pytest.raises(CIError, match="error mid-stream: The model is overloaded, try again later"):
        interpreter.run("fail")
    openai_server.responder = [[Call("print(x + 1)"), Text("42")]]
    result = interpreter.run("x + 1 please")
    assert result.ok and result.calls[0].logs.strip() == "42", "the container kept x"
    interpreter.close()


class SendsAMalformedEvent:
    def events(self, ctx) -> Iterator[SSEEvent]:
        yield from ResponseEvents(ctx).start()
        yield SSEEvent("response.output_text.delta", json.dumps({"type": "response.output_text.delta"}))


def test_a_malformed_event_says_what_was_missing(openai_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    interpreter = CodeInterpreter(frontend=RecordingFrontend(), output_dir=str(tmp_path), backend="openai")
    openai_server.responder = SendsAMalformedEvent()
    with pytest.raises(CIError, match="broke mid-way \\(an event lacked its 'delta' field\\)"):
        interpreter.run("go")
    interpreter.close()
