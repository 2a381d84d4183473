"""Replaying a genuine OpenAI recording as the answer to any ``POST /v1/responses``.

The recorded events go out byte for byte, except what must belong to this request: a fresh
response id, the request's ``previous_response_id``, and the request's container in place of the
recorded one. Every cited container file is registered in that container under its recorded
file id with real bytes (the recording's own PNG for images), so clients can download it.
A non-streamed ``.json`` recording is turned into the event sequence OpenAI would stream.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ci_magic import events
from tests.servers.http_base import ApiError
from tests.servers.recordings import load_response, load_stream, resolve_recording
from tests.servers.responses_stream import (
    ResponseEvents,
    SSEEvent,
    TurnContext,
    code_chunks,
    dumps,
    text_chunks,
)

__all__ = ["Replay"]

_CONTAINER_ID = re.compile(r"cntr_[0-9a-f]+")
_PREVIOUS_NULL = re.compile(r'"previous_response_id":\s*null')
_PNG_URL = "data:image/png;base64,"


class Replay:
    """A responder that answers every request with one recording (``.chunks.txt``, ``.yaml``, ``.json``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_recording(path)
        self.streamed: list[SSEEvent] | None = None
        self.response: dict[str, Any] | None = None
        if self.path.suffix == ".json":
            self.response = load_response(self.path)
            self._recorded_id = self.response["id"]
        else:
            self.streamed = load_stream(self.path)
            self._recorded_id = self.streamed[0].json["response"]["id"]

    def events(self, ctx: TurnContext) -> Iterator[SSEEvent]:
        if ctx.container is None:
            raise ApiError(
                400,
                "Replaying a code interpreter recording needs a code_interpreter tool in the request.",
                param="tools",
            )
        self._register_cited_files(ctx)
        if self.streamed is not None:
            for event in self.streamed:
                yield SSEEvent(event.type, self._rewrite(event.data, ctx))
        else:
            yield from self._stream_response(ctx)

    def _rewrite(self, data: str, ctx: TurnContext) -> str:
        assert ctx.container is not None
        data = data.replace(self._recorded_id, ctx.response_id)
        data = _CONTAINER_ID.sub(ctx.container.id, data)
        previous = ctx.request.get("previous_response_id")
        if previous is not None:
            data = _PREVIOUS_NULL.sub(lambda _: f'"previous_response_id":{dumps(previous)}', data)
        return data

    def _stream_response(self, ctx: TurnContext) -> Iterator[SSEEvent]:
        assert self.response is not None and ctx.container is not None
        recorded = json.loads(self._rewrite(json.dumps(self.response, ensure_ascii=False), ctx))
        writer = ResponseEvents(ctx, base={**recorded, "output": [], "usage": None})
        item_ids = iter([item["id"] for item in recorded["output"]])
        yield from writer.encode(
            _as_events(recorded["output"]),
            container_id=ctx.container.id,
            item_ids=item_ids,
            usage=recorded["usage"],
        )

    def _register_cited_files(self, ctx: TurnContext) -> None:
        assert ctx.container is not None
        cited: dict[str, str] = {}
        image: bytes | None = None
        for node in self._objects():
            if node.get("type") == "container_file_citation":
                cited[node["file_id"]] = node["filename"]
            elif node.get("type") == "image" and image is None and str(node.get("url")).startswith(_PNG_URL):
                image = base64.b64decode(node["url"][len(_PNG_URL) :])
        for file_id, filename in cited.items():
            if file_id not in ctx.container.files:
                ctx.store.add_file(
                    ctx.container, filename, _bytes_for(filename, image), source="assistant", file_id=file_id
                )

    def _objects(self) -> Iterator[dict[str, Any]]:
        """Every JSON object in the recording, depth first."""
        stack: list[Any] = [self.response] if self.streamed is None else [e.json for e in self.streamed]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                yield node
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


def _as_events(output: list[dict[str, Any]]) -> Iterator[events.Event]:
    """A recorded response's output items as our typed events (``ResponseEvents.encode`` makes
    the stream OpenAI would have sent for it)."""
    for item in output:
        if item["type"] == "reasoning":
            yield events.ThinkingDelta("")
        elif item["type"] == "code_interpreter_call":
            call_id = item["id"]
            yield events.CallStarted(call_id, item["container_id"])
            for piece in code_chunks(item["code"]):
                yield events.CodeDelta(call_id, piece)
            yield events.CodeDone(call_id, item["code"])
            yield events.CallStatus(call_id, "running")
            for recorded in item.get("outputs") or []:
                if recorded["type"] == "logs":
                    yield events.Logs(call_id, recorded["logs"])
                elif recorded["type"] == "image" and recorded["url"].startswith(_PNG_URL):
                    yield events.Image(call_id, base64.b64decode(recorded["url"][len(_PNG_URL) :]))
            yield events.CallStatus(call_id, "completed")
        elif item["type"] == "message":
            part = item["content"][0]
            for piece in text_chunks(part["text"], random.Random(item["id"])):
                yield events.TextDelta(piece)
            for note in part["annotations"]:
                yield events.FileCited(
                    note["container_id"],
                    note["file_id"],
                    note["filename"],
                    note["start_index"],
                    note["end_index"],
                )
            yield events.TextDone(part["text"])


def _bytes_for(filename: str, image: bytes | None) -> bytes:
    """Content that fits the file's extension; the recording's real PNG when it has one."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix == ".png" and image is not None:
        return image
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["n", "value"])
        writer.writerows([n, n * n] for n in range(1, 11))
        return buffer.getvalue().encode()
    if suffix == ".json":
        return b'{"replayed": true}\n'
    if suffix == ".png":
        return _tiny_png()
    return f"Replayed file {filename}\n".encode()


def _tiny_png() -> bytes:
    """A valid 1x1 white PNG, for recordings that cite a PNG without embedding one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\xff\xff"))
        + chunk(b"IEND", b"")
    )
