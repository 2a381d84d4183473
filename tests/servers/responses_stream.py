"""The ``/v1/responses`` event encoding: what OpenAI streams for code interpreter turns.

``ResponseEvents`` numbers events and shapes every object exactly as the genuine recordings do
(key sets, key order, ``obfuscation`` padding, where outputs and citations appear); responders
(replay, scripted model) only decide *what* happens. A code call's outputs are produced by a
callback run between ``...call.interpreting`` and ``...call.completed``, which is when the
sandbox really executes, so streaming shows real progress.

Recorded facts this encodes: an ``obfuscation`` string pads each delta to 16 characters; code
outputs appear only in ``output_item.done`` and ``response.completed`` (``[]`` while in progress
when the request includes ``code_interpreter_call.outputs``, else ``null``); citations arrive via
``response.output_text.annotation.added`` after the last text delta; the streamed response
says ``service_tier: "auto"`` until ``response.completed`` says ``"default"``.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

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
    "dumps",
    "prompt_text",
    "response_object",
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

    # -- items -----------------------------------------------------------------------------

    def reasoning(self, item_id: str | None = None) -> Iterator[SSEEvent]:
        item: dict[str, Any] = {"id": item_id or self._id("rs"), "type": "reasoning"}
        if REASONING_INCLUDE in self.ctx.include:
            item["encrypted_content"] = "gAAAAA" + secrets.token_urlsafe(96)
        item["summary"] = []
        self._reasoning_items += 1
        index = self._add(item)
        yield self.event("response.output_item.added", output_index=index, item=item)
        yield self.event("response.output_item.done", output_index=index, item=item)

    def code_call(
        self,
        code: str,
        container_id: str,
        run: Callable[[], list[dict[str, Any]]],
        item_id: str | None = None,
    ) -> Iterator[SSEEvent]:
        """A code_interpreter_call; ``run()`` executes the code and returns its outputs."""
        include_outputs = OUTPUTS_INCLUDE in self.ctx.include
        item_id = item_id or self._id("ci")
        item = {
            "id": item_id,
            "type": "code_interpreter_call",
            "status": "in_progress",
            "code": "",
            "container_id": container_id,
            "outputs": [] if include_outputs else None,
        }
        index = self._add(item)
        yield self.event("response.output_item.added", output_index=index, item=item)
        yield self.event("response.code_interpreter_call.in_progress", output_index=index, item_id=item_id)
        for delta in _code_chunks(code):
            yield self.event(
                "response.code_interpreter_call_code.delta",
                output_index=index,
                item_id=item_id,
                delta=delta,
                obfuscation=self._obfuscation(delta),
            )
        self._generated_chars += len(code)
        yield self.event(
            "response.code_interpreter_call_code.done", output_index=index, item_id=item_id, code=code
        )
        yield self.event("response.code_interpreter_call.interpreting", output_index=index, item_id=item_id)
        outputs = run()
        yield self.event("response.code_interpreter_call.completed", output_index=index, item_id=item_id)
        done = {**item, "status": "completed", "code": code, "outputs": outputs if include_outputs else None}
        self.output[index] = done
        yield self.event("response.output_item.done", output_index=index, item=done)

    def message(
        self, text: str, annotations: list[dict[str, Any]], item_id: str | None = None
    ) -> Iterator[SSEEvent]:
        item_id = item_id or self._id("msg")
        item = {"id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
        index = self._add(item)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        yield self.event("response.output_item.added", output_index=index, item=item)
        yield self.event(
            "response.content_part.added",
            **where,
            part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
        )
        for delta in self._text_chunks(text):
            yield self.event(
                "response.output_text.delta",
                **where,
                delta=delta,
                logprobs=[],
                obfuscation=self._obfuscation(delta),
            )
        self._generated_chars += len(text)
        for number, annotation in enumerate(annotations):
            yield self.event(
                "response.output_text.annotation.added",
                **where,
                annotation_index=number,
                annotation=annotation,
            )
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        part = {"type": "output_text", "annotations": annotations, "logprobs": [], "text": text}
        yield self.event("response.content_part.done", **where, part=part)
        done = {**item, "status": "completed", "content": [part]}
        self.output[index] = done
        yield self.event("response.output_item.done", output_index=index, item=done)

    # -- helpers ---------------------------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> int:
        self.output.append(item)
        return len(self.output) - 1

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{secrets.token_hex(25)}"

    def _obfuscation(self, delta: str) -> str:
        return "".join(self._random.choices(_ALPHABET, k=max(_PAD_TO - len(delta), 1)))

    def _text_chunks(self, text: str) -> Iterator[str]:
        position = 0
        while position < len(text):
            size = self._random.randint(3, 8)
            yield text[position : position + size]
            position += size


def _code_chunks(code: str) -> Iterator[str]:
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
