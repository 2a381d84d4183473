"""Server-sent events decoded from raw bytes into plain JSON payloads.

The openai backend reads the Responses stream through the SDK's ``with_streaming_response``
(the SDK still does the transport, auth, retries and HTTP errors) and decodes the events here.
The SDK's own ``Stream`` validates every event into a pydantic model, which costs about 80 µs per
event on a 2-core machine, four fifths of the client's CPU on a fast stream; a code delta needs
two string fields, so a dict from ``json.loads`` is all the translator reads.

Follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
CR, LF and CRLF line ends, comments, multi-line data, and an unterminated last event is dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent", "aiter_events", "decode_all"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """Incremental: ``feed`` each chunk as it arrives, get back the events it completed."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for an event boundary
        self._after_cr = False  # the previous chunk ended in CR: a leading LF belongs to it
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        buffer = self._buffer
        buffer += chunk
        events: list[ServerSentEvent] = []
        start = 0
        search = max(0, self._scanned - 1)
        while (end := buffer.find(b"\n\n", search)) != -1:
            event = self._parse(bytes(buffer[start:end]))
            if event is not None:
                events.append(event)
            start = search = end + 2
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        return events

    def _parse(self, block: bytes) -> ServerSentEvent | None:
        name: str | None = None
        data: list[str] = []
        for line in block.decode("utf-8", errors="replace").split("\n"):
            if not line or line[0] == ":":
                continue
            field, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
            elif field == "id" and "\0" not in value:
                self.last_event_id = value
        if not data:
            return None  # the spec dispatches nothing for an event without data
        return ServerSentEvent("\n".join(data), name, self.last_event_id)


def decode_all(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    """Every complete event in ``chunks`` (for tests and replays of recorded bytes)."""
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


async def aiter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
