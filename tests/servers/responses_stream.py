"""The ``/v1/responses`` event encoding: what OpenAI streams for code interpreter turns.

``ResponseEvents.encode`` turns one turn of our typed events (``ci_magic.events``, what every
backend emits) into the Responses stream, numbering events and shaping every object exactly as
the genuine recordings do (key sets, key order, ``obfuscation`` padding, where outputs and
citations appear). So any backend's turn can be served to OpenAI clients; responders (replay,
scripted model) only decide *what* happens. The encoder pulls events as it streams: a code call's
outputs are awaited between ``...call.interpreting`` and ``...call.completed``, which is when
the sandbox really executes.

Recorded facts this encodes: an ``obfuscation`` string pads each delta to 16 characters; code
outputs appear only in ``output_item.done`` and ``response.completed`` (``[]`` while in progress
when the request includes ``code_interpreter_call.outputs``, else ``null``); citations arrive via
``response.output_text.annotation.added`` after the last text delta; the streamed response
says ``service_tier: "auto"`` until ``response.completed`` says ``"default"``.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import re
import secrets
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from ci_magic import events

if TYPE_CHECKING:
    from tests.servers.containers import Container, ContainerStore

__all__ = [
    "OUTPUTS_INCLUDE",
    "REASONING_INCLUDE",
    "Responder",
    "ResponseEvents",
    "SSEEvent",
    "TurnContext",
    "citation",
    "code_chunks",
    "dumps",
    "prompt_text",
    "response_object",
    "text_chunks",
]

OUTPUTS_INCLUDE = "code_interpreter_call.outputs"
REASONING_INCLUDE = "reasoning.encrypted_content"
_PAD_TO = 16
_ALPHABET = string.ascii_letters + string.digits
_CODE_TOKEN = re.compile(r"\r\n|\n|[ \t]*\w+|[ \t]*[^\w\s]+|[ \t]+")


def dumps(value: Any) -> str:
    """JSON as OpenAI writes it: compact, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: the ``event:`` name and the exact ``data:`` text."""

    type: str
    data: str

    @cached_property
    def json(self) -> dict[str, Any]:
        return json.loads(self.data)

    def encode(self) -> bytes:
        return f"event: {self.type}\ndata: {self.data}\n\n".encode()


@dataclass
class TurnContext:
    """Everything a responder may use to answer one ``POST /v1/responses``."""

    request: dict[str, Any]
    response_id: str
    created_at: int
    store: ContainerStore
    container: Container | None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def include(self) -> list[str]:
        return list(self.request.get("include") or [])


class Responder(Protocol):
    def events(self, ctx: TurnContext) -> Iterator[SSEEvent]:
        """The full event sequence, ending with ``response.completed``.

        Raise ``containers.ApiError`` before the first event to answer with an HTTP error.
        """
        ...


def prompt_text(request: dict[str, Any]) -> str:
    """The text of the last user message of a Responses request (``input`` string or list)."""
    items = request.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if not isinstance(item, dict) or item.get("role", "user") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def citation(container_id: str, file_id: str, filename: str, start: int, end: int) -> dict[str, Any]:
    return {
        "type": "container_file_citation",
        "container_id": container_id,
        "end_index": end,
        "file_id": file_id,
        "filename": filename,
        "start_index": start,
    }


def _echo_tools(tools: Any) -> list[Any]:
    echoed = []
    for tool in tools or []:
        if isinstance(tool, dict) and tool.get("type") == "code_interpreter":
            echoed.append({"type": "code_interpreter", "container": tool.get("container")})
        else:
            echoed.append(tool)
    return echoed


def response_object(
    request: dict[str, Any],
    response_id: str,
    created_at: int,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    service_tier: str,
    billing: bool = False,
) -> dict[str, Any]:
    """A response object echoing the request, keys in the order OpenAI sends them."""
    reasoning = request.get("reasoning") or {}
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": bool(request.get("background", False)),
    }
    if billing:  # non-streamed bodies carry it (vercel .json); the streamed recordings do not
        response["billing"] = {"payer": "developer"}
    response.update(
        {
            "error": None,
            "incomplete_details": None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": request.get("max_tool_calls"),
            "model": request.get("model"),
            "output": output,
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"),
            "prompt_cache_key": request.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort", "medium"), "summary": reasoning.get("summary")},
            "safety_identifier": request.get("safety_identifier"),
            "service_tier": service_tier,
            "store": request.get("store", True),
            "temperature": request.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": _echo_tools(request.get("tools")),
            "top_logprobs": request.get("top_logprobs", 0),
            "top_p": request.get("top_p", 1.0),
            "truncation": request.get("truncation", "disabled"),
            "usage": usage,
            "user": request.get("user"),
            "metadata": request.get("metadata") or {},
        }
    )
    return response


class ResponseEvents:
    """Builds one response's events in order; each ``yield from`` emits one output item."""

    def __init__(self, ctx: TurnContext, *, base: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.output: list[dict[str, Any]] = []
        self._base = base
        self._sequence = 0
        self._random = random.Random(ctx.response_id)
        self._generated_chars = 0
        self._reasoning_items = 0
        self._open: _OpenItem | None = None
        self._container_id: str | None = None
        self._item_ids: Iterator[str] | None = None

    # -- framing ---------------------------------------------------------------------------

    def event(self, type: str, **fields: Any) -> SSEEvent:
        data = {"type": type, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return SSEEvent(type, dumps(data))

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        tier = "default" if status == "completed" else "auto"
        if self._base is not None:
            response = {**self._base, "status": status, "output": list(self.output), "usage": usage}
            if "service_tier" in response:
                response["service_tier"] = tier
            return response
        return response_object(
            self.ctx.request,
            self.ctx.response_id,
            self.ctx.created_at,
            status=status,
            output=list(self.output),
            usage=usage,
            service_tier=tier,
        )

    def start(self) -> Iterator[SSEEvent]:
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))

    def complete(self, usage: dict[str, Any] | None = None) -> Iterator[SSEEvent]:
        yield self.event("response.completed", response=self.response("completed", usage or self.usage()))

    def usage(self) -> dict[str, Any]:
        """Plausible counts: a fixed tool/system overhead plus about four characters a token."""
        input_tokens = 1800 + len(prompt_text(self.ctx.request)) // 4
        reasoning_tokens = 128 * self._reasoning_items
        output_tokens = self._generated_chars // 4 + reasoning_tokens
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        }

    # -- our events, encoded -----------------------------------------------------------------

    def encode(
        self,
        turn: Iterable[events.Event],
        *,
        container_id: str | None = None,
        item_ids: Iterator[str] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> Iterator[SSEEvent]:
        """The Responses stream for one turn of our typed events (``ci_magic.events``).

        Any backend's turn can be served this way. ``container_id`` names the container in code
        calls (the server's id, not the backend's); ``item_ids`` gives output items their ids
        in order (a replayed recording's), else they are made up; ``usage`` replaces the estimate.
        The first event is pulled before ``response.created`` goes out, so a turn that fails at
        once becomes an HTTP error, not a stream.
        """
        self._container_id = container_id
        self._item_ids = item_ids
        iterator = iter(turn)
        first = next(iterator, None)
        yield from self.start()
        pending = [] if first is None else [first]
        for event in itertools.chain(pending, iterator):
            if isinstance(event, events.Completed):
                yield from self._close()
                yield from self.complete(usage)
                return
            if isinstance(event, events.Failed):
                yield from self._close()
                yield self.event("error", code="server_error", message=event.message, param=None)
                return
            yield from self._encode(event)
        yield from self._close()
        yield from self.complete(usage)

    def _encode(self, event: events.Event) -> Iterator[SSEEvent]:
        if isinstance(event, events.ThinkingDelta):
            if self._open is None or self._open.item["type"] != "reasoning":
                yield from self._close()
                yield from self._open_reasoning()
        elif isinstance(event, events.CallStarted):
            yield from self._close()
            yield from self._open_call(event.call_id)
        elif isinstance(event, events.CodeDelta):
            where = self._call_where()
            self._open_item().code += event.delta
            yield self.event(
                "response.code_interpreter_call_code.delta",
                **where,
                delta=event.delta,
                obfuscation=self._obfuscation(event.delta),
            )
        elif isinstance(event, events.CodeDone):
            where = self._call_where()
            self._open_item().code = event.code
            self._generated_chars += len(event.code)
            yield self.event("response.code_interpreter_call_code.done", **where, code=event.code)
        elif isinstance(event, events.CallStatus):
            if event.status in ("running", "interpreting"):
                yield self.event("response.code_interpreter_call.interpreting", **self._call_where())
            elif event.status in ("completed", "failed", "incomplete"):
                yield from self._close(status="incomplete" if event.status == "incomplete" else "completed")
        elif isinstance(event, (events.Logs, events.Image, events.RichOutput, events.ExecutionError)):
            self._open_item().outputs.add(event)
        elif isinstance(event, events.TextDelta):
            if self._open is None or self._open.item["type"] != "message":
                yield from self._close()
                yield from self._open_message()
            self._open_item().text += event.delta
            yield self.event(
                "response.output_text.delta",
                **self._text_where(),
                delta=event.delta,
                logprobs=[],
                obfuscation=self._obfuscation(event.delta),
            )
        elif isinstance(event, events.FileCited):
            if self._open is None or self._open.item["type"] != "message":
                yield from self._close()
                yield from self._open_message()
            item = self._open_item()
            annotation = citation(
                event.container_id, event.file_id, event.filename, event.start_index, event.end_index
            )
            yield self.event(
                "response.output_text.annotation.added",
                **self._text_where(),
                annotation_index=len(item.annotations),
                annotation=annotation,
            )
            item.annotations.append(annotation)
        elif (
            isinstance(event, events.TextDone)
            and self._open is not None
            and self._open.item["type"] == "message"
        ):
            self._open.text = event.text
            yield from self._close()
        # TurnStarted is response.created; a Notice has no Responses equivalent.

    def _open_reasoning(self) -> Iterator[SSEEvent]:
        item: dict[str, Any] = {"id": self._id("rs"), "type": "reasoning"}
        if REASONING_INCLUDE in self.ctx.include:
            item["encrypted_content"] = "gAAAAA" + secrets.token_urlsafe(96)
        item["summary"] = []
        self._reasoning_items += 1
        yield from self._add(item)

    def _open_call(self, call_id: str) -> Iterator[SSEEvent]:
        item: dict[str, Any] = {
            "id": self._id("ci"),
            "type": "code_interpreter_call",
            "status": "in_progress",
            "code": "",
            "container_id": self._container_id,
            "outputs": [] if OUTPUTS_INCLUDE in self.ctx.include else None,
        }
        yield from self._add(item)
        yield self.event("response.code_interpreter_call.in_progress", **self._call_where())

    def _open_message(self) -> Iterator[SSEEvent]:
        item: dict[str, Any] = {
            "id": self._id("msg"),
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        yield from self._add(item)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        yield self.event("response.content_part.added", **self._text_where(), part=part)

    def _add(self, item: dict[str, Any]) -> Iterator[SSEEvent]:
        self.output.append(item)
        self._open = _OpenItem(item, len(self.output) - 1)
        yield self.event("response.output_item.added", output_index=self._open.index, item=item)

    def _close(self, status: str = "completed") -> Iterator[SSEEvent]:
        """Finish the open output item, as OpenAI does once an item is complete."""
        open_item, self._open = self._open, None
        if open_item is None:
            return
        item, index = open_item.item, open_item.index
        if item["type"] == "code_interpreter_call":
            where = {"output_index": index, "item_id": item["id"]}
            yield self.event("response.code_interpreter_call.completed", **where)
            outputs = open_item.outputs.encoded() if OUTPUTS_INCLUDE in self.ctx.include else None
            done = {**item, "status": status, "code": open_item.code, "outputs": outputs}
        elif item["type"] == "message":
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            text = open_item.text
            self._generated_chars += len(text)
            yield self.event("response.output_text.done", **where, text=text, logprobs=[])
            part = {"type": "output_text", "annotations": open_item.annotations, "logprobs": [], "text": text}
            yield self.event("response.content_part.done", **where, part=part)
            done = {**item, "status": "completed", "content": [part]}
        else:
            done = item
        self.output[index] = done
        yield self.event("response.output_item.done", output_index=index, item=done)

    def _open_item(self) -> _OpenItem:
        if self._open is None:
            raise ValueError("an output or delta arrived outside an output item")
        return self._open

    def _call_where(self) -> dict[str, Any]:
        item = self._open_item()
        return {"output_index": item.index, "item_id": item.item["id"]}

    def _text_where(self) -> dict[str, Any]:
        item = self._open_item()
        return {"item_id": item.item["id"], "output_index": item.index, "content_index": 0}

    # -- helpers ---------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        if self._item_ids is not None:
            return next(self._item_ids)
        return f"{prefix}_{secrets.token_hex(25)}"

    def _obfuscation(self, delta: str) -> str:
        return "".join(self._random.choices(_ALPHABET, k=max(_PAD_TO - len(delta), 1)))


@dataclass
class _Outputs:
    """A call's outputs as OpenAI reports them: each image, then one ``logs`` text of all the rest."""

    images: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def add(self, event: events.Logs | events.Image | events.RichOutput | events.ExecutionError) -> None:
        if isinstance(event, events.Logs):
            self.logs.append(event.text)
        elif isinstance(event, events.Image):
            self.images.append(f"data:{event.mime};base64," + base64.b64encode(event.data).decode())
        elif isinstance(event, events.ExecutionError):
            text = event.traceback or f"{event.name}: {event.value}"
            self.logs.append(text if text.endswith("\n") else text + "\n")
        elif isinstance(event.bundle.get("image/png"), str):
            self.images.append(f"data:image/png;base64,{event.bundle['image/png']}")
        elif isinstance(event.bundle.get("text/plain"), str):  # a trailing expression's value
            self.logs.append(f"{event.bundle['text/plain']}\n")

    def encoded(self) -> list[dict[str, Any]]:
        outputs: list[dict[str, Any]] = [{"type": "image", "url": url} for url in self.images]
        if self.logs:
            outputs.append({"type": "logs", "logs": "".join(self.logs)})
        return outputs


@dataclass
class _OpenItem:
    item: dict[str, Any]
    index: int
    code: str = ""
    text: str = ""
    outputs: _Outputs = field(default_factory=_Outputs)
    annotations: list[dict[str, Any]] = field(default_factory=list)


def text_chunks(text: str, rng: random.Random) -> Iterator[str]:
    """Text deltas of 3 to 8 characters, as the recordings' are."""
    position = 0
    while position < len(text):
        size = rng.randint(3, 8)
        yield text[position : position + size]
        position += size


def code_chunks(code: str) -> Iterator[str]:
    """Token-like pieces as the recordings show (``import``, `` numpy``, ``\\r\\n``), at most 12 chars."""
    position = 0
    for match in _CODE_TOKEN.finditer(code):
        if match.start() > position:  # anything the pattern skipped, e.g. a lone "\r"
            yield code[position : match.start()]
        token = match.group()
        for start in range(0, len(token), 12):
            yield token[start : start + 12]
        position = match.end()
    if position < len(code):
        yield code[position:]
