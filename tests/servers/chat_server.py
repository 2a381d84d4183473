"""A scripted OpenAI-compatible Chat Completions server: the test double of a local model.

Real HTTP on 127.0.0.1, real SSE, chunks shaped like OpenAI's own (``chatcmpl-`` ids, ``created``,
``system_fingerprint``, ``logprobs``, a final ``choices: []`` usage chunk when asked for). Tool-call
arguments are JSON-encoded and cut into small random fragments, escapes included, the way models
stream them. Each request is answered by the next item of a script, or by a function of the
messages, so a test can write a model that reacts to what its code printed.

::

    with ChatServer([Reply.calls("print(1)"), "It printed 1."]) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test")

Faults: ``Fault(500)`` answers with an OpenAI-shaped error; ``Cut(reply, after_chunks=3)`` drops the
connection mid-stream (``clean=True`` ends the body properly but without a finish_reason).
``Recorded(body, status)`` answers with a body captured from a real server, byte for byte (SSE events
are written one by one, as that server sent them).

Real servers' habits, on request: ``listing=`` serves a recorded ``GET /v1/models`` body (llama.cpp's
``meta.n_ctx``...); ``refuse_null_content=True`` answers HTTP 500 to an assistant message whose content
is null, as llama-cpp-python does; ``context_tokens=N`` answers llama-server's HTTP 400
``exceed_context_size_error`` when the prompt (estimated at 4 characters a token) is longer.
``Reply.call_style`` streams tool calls the ways other servers do: arguments whole in one chunk, no
``index``, or ``id``/``name`` repeated on every chunk.

CLI (for notebooks and demos)::

    python -m tests.servers.chat_server --port 0 --scenario quickstart   # prints READY <base_url>
"""

from __future__ import annotations

import json
import random
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.servers.http_base import (
    ApiError,
    Exchange,
    RecordedRequest,
    Route,
    StreamCut,
    TestServer,
    command_line,
    error_body,
    serve_until_stopped,
    server_options,
)

__all__ = [
    "SCENARIOS",
    "CallStyle",
    "ChatServer",
    "Cut",
    "Fault",
    "Recorded",
    "RecordedRequest",
    "Reply",
    "Script",
    "ScriptItem",
    "ToolCall",
    "main",
    "quickstart",
]


@dataclass(frozen=True)
class ToolCall:
    """One function call of a scripted reply; ``arguments`` (raw) overrides the encoded ``code``."""

    code: str = ""
    name: str = "python"
    arguments: str | None = None
    id: str | None = None


CallStyle = Literal["openai", "whole", "no_index", "repeat_id"]


@dataclass(frozen=True)
class Reply:
    """One assistant message: text, tool calls, or both (text first, as models write them).

    ``reasoning`` streams first as ``reasoning_field`` deltas (llama.cpp and vLLM say
    ``reasoning_content``, Ollama ``reasoning``). ``call_style``: ``openai`` (id, type and name on
    the first chunk, arguments in fragments, ``index`` always), ``whole`` (all arguments in the first
    chunk), ``no_index`` (no ``index`` field), ``repeat_id`` (id, type and name on every chunk, as
    llama-cpp-python does).
    """

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None  # default: "tool_calls" when there are calls, else "stop"
    reasoning: str = ""
    reasoning_field: str = "reasoning_content"
    call_style: CallStyle = "openai"

    @classmethod
    def calls(cls, *codes: str, text: str = "") -> Reply:
        return cls(text=text, tool_calls=tuple(ToolCall(code) for code in codes))

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


@dataclass(frozen=True)
class Fault:
    """An HTTP error answer, bodied like OpenAI's ``{"error": {...}}``."""

    status: int = 500
    message: str = "The server had an error while processing your request. Sorry about that!"
    type: str = "server_error"
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cut:
    """Stream ``reply`` but stop after ``after_chunks`` SSE events.

    ``clean=False`` drops the connection (the client sees an incomplete body); ``clean=True`` ends
    the HTTP body normally, with no finish_reason and no ``[DONE]``.
    """

    reply: Reply
    after_chunks: int
    clean: bool = False


@dataclass(frozen=True)
class Recorded:
    """A body captured from a real server, sent as it was: SSE when it starts with ``data:``."""

    body: str
    status: int = 200


ScriptItem = Reply | str | Fault | Cut | Recorded
Script = Sequence[ScriptItem] | Callable[[list[dict[str, Any]]], ScriptItem]


class ChatServer(TestServer):
    """The server, on a background thread; a context manager that starts and stops it."""

    thread_name = "chat-server"

    def __init__(
        self,
        script: Script,
        *,
        model: str = "scripted-model",
        models: Sequence[str] | None = None,
        api_key: str | None = None,
        event_delay: float = 0.0,
        seed: int = 0,
        ensure_ascii: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        listing: dict[str, Any] | None = None,
        refuse_null_content: bool = False,
        context_tokens: int | None = None,
    ) -> None:
        """``models``: names the server knows (others get 404); None accepts any, like llama.cpp.

        ``api_key``: when set, requests must carry ``Authorization: Bearer <api_key>`` (else 401).
        ``ensure_ascii``: encode non-ASCII code as ``\\uXXXX`` escapes, surrogate pairs included.
        """
        super().__init__(host=host, port=port, event_delay=event_delay)
        self._script = script if callable(script) else list(script)
        self._position = 0
        self.model = model
        self.models = tuple(models) if models is not None else None
        self.api_key = api_key
        self.listing = listing
        self.refuse_null_content = refuse_null_content
        self.context_tokens = context_tokens
        self.ensure_ascii = ensure_ascii
        self.usage_sent: list[dict[str, Any]] = []  # the usage object of every answer delivered
        self._rng = random.Random(seed)

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def close(self) -> None:
        self.stop()

    # -- used by the handler thread --------------------------------------------------------------

    def _record_usage(self, usage: dict[str, Any]) -> None:
        with self._lock:
            self.usage_sent.append(usage)

    def _next_item(self, messages: list[dict[str, Any]]) -> ScriptItem:
        if callable(self._script):
            return self._script(messages)
        with self._lock:
            if self._position >= len(self._script):
                return Fault(500, f"scripted chat server: the script has only {len(self._script)} replies")
            item = self._script[self._position]
            self._position += 1
            return item

    def _fragments(self, text: str, low: int = 1, high: int = 6) -> list[str]:
        with self._lock:
            sizes = [self._rng.randint(low, high) for _ in range(len(text))]
        pieces, start = [], 0
        for size in sizes:
            if start >= len(text):
                break
            pieces.append(text[start : start + size])
            start += size
        return pieces

    # -- answering (handler threads) ---------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            ("GET", re.compile(r"/v1/models"), self._models),
            ("POST", re.compile(r"/v1/chat/completions"), self._chat),
        ]

    def check_auth(self, request: RecordedRequest) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            given = (request.headers.get("authorization") or "").removeprefix("Bearer ")
            shown = f"{given[:3]}***{given[-2:]}" if len(given) > 5 else "***"
            raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")

    def not_found(self, method: str, path: str) -> ApiError:
        message = f"Unknown request URL: {method} {path}. Please check the URL for typos."
        return ApiError(404, message, code="unknown_url")

    def _models(self, exchange: Exchange) -> None:
        if self.listing is not None:
            exchange.send_json(self.listing)
            return
        data = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "ci-magic-tests"}
            for name in self.models or (self.model,)
        ]
        exchange.send_json({"object": "list", "data": data})

    def _chat(self, exchange: Exchange) -> None:
        body = exchange.record.json
        problem = _validate(body, self.models) or _habits(self, body)
        if problem is not None:
            exchange.send_json(problem[1], problem[0])
            return
        item = self._next_item(body["messages"])
        if isinstance(item, str):
            item = Reply(text=item)
        if isinstance(item, Recorded):
            _send_recorded(exchange, item)
        elif isinstance(item, Fault):
            exchange.send_json(_error_body(item.message, item.type, item.code), item.status, item.headers)
        else:
            reply, cut = (
                (item.reply, StreamCut(item.after_chunks, item.clean))
                if isinstance(item, Cut)
                else (item, None)
            )
            completion = _Completion(self, body, reply)
            if body.get("stream"):
                exchange.send_stream(_sse_stream(completion.chunks()), cut=cut)
            else:
                exchange.send_json(completion.message())


def _send_recorded(exchange: Exchange, item: Recorded) -> None:
    """A recorded body as it was sent: JSON whole, SSE event by event."""
    if not item.body.lstrip().startswith(("data:", ":")):
        exchange.send_json(item.body, item.status)
        return
    events = [event.encode() for event in re.findall(r".*?(?:\n\n|\Z)", item.body, re.DOTALL) if event]
    exchange.send_stream(events, status=item.status, content_type="text/event-stream")


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return error_body(message, type_, param, code)


def _count_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _sse_stream(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """Chunks as ``data:`` events, then ``[DONE]``; lazily, so a cut stream records no usage."""
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _validate(body: Any, models: tuple[str, ...] | None) -> tuple[int, dict[str, Any]] | None:
    """The checks OpenAI makes that a model loop can get wrong, with OpenAI's wording."""

    def bad(message: str, param: str | None = "messages") -> tuple[int, dict[str, Any]]:
        return 400, _error_body(message, "invalid_request_error", None, param)

    if not isinstance(body, dict):
        return bad("We could not parse the JSON body of your request.", None)
    if not isinstance(body.get("model"), str) or not body["model"]:
        return bad("you must provide a model parameter", "model")
    if models is not None and body["model"] not in models:
        message = f"The model `{body['model']}` does not exist or you do not have access to it."
        return 404, _error_body(message, "invalid_request_error", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("[] is too short - 'messages'")
    if body.get("stream_options") is not None and not body.get("stream"):
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        return bad(message, "stream_options")
    pending: list[str] = []  # tool_call ids still owed a tool message
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            supported = "'system', 'assistant', 'user', 'tool'"
            return bad(f"Invalid value: '{role}'. Supported values are: {supported}.")
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                return bad(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                    "with 'tool_calls'."
                )
            pending.remove(message["tool_call_id"])
            continue
        if pending:
            return bad(_unanswered(pending))
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                arguments = call.get("function", {}).get("arguments")
                try:
                    json.loads(arguments)
                except (TypeError, json.JSONDecodeError):
                    return bad(f"Invalid 'messages[{number}].tool_calls': arguments are not valid JSON.")
                pending.append(call.get("id"))
        elif not isinstance(message.get("content"), (str, list)):
            return bad(f"Invalid type for 'messages[{number}].content': expected a string or an array.")
    if pending:
        return bad(_unanswered(pending))
    return None


def _habits(chat: ChatServer, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """What some real servers refuse that OpenAI accepts, in those servers' words."""
    messages = body["messages"]
    if chat.refuse_null_content:
        for number, message in enumerate(messages):
            if message.get("role") == "assistant" and message.get("content") is None:
                # llama-cpp-python's pydantic models: content must be a string (HTTP 500, not 400).
                detail = (
                    "1 validation error:\n  {'type': 'string_type', 'loc': ('body', 'messages', "
                    f"{number}, 'ChatCompletionRequestAssistantMessage', 'content'), "
                    "'msg': 'Input should be a valid string', 'input': None}"
                )
                return 500, {"error": {"message": detail, "type": "internal_server_error"}}
    if chat.context_tokens is not None:
        prompt_tokens = _count_tokens(json.dumps(messages) + json.dumps(body.get("tools") or []))
        if prompt_tokens > chat.context_tokens:
            # llama-server's answer, as recorded (fixtures/chat/ls-gemma-4).
            message = (
                f"request ({prompt_tokens} tokens) exceeds the available context size "
                f"({chat.context_tokens} tokens), try increasing it"
            )
            error = {
                "code": 400,
                "message": message,
                "type": "exceed_context_size_error",
                "n_prompt_tokens": prompt_tokens,
                "n_ctx": chat.context_tokens,
            }
            return 400, {"error": error}
    return None


def _unanswered(pending: list[str]) -> str:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}"
    )


class _Completion:
    """One scripted reply, as OpenAI's streamed chunks or its non-streamed message."""

    def __init__(self, chat: ChatServer, body: dict[str, Any], reply: Reply) -> None:
        self._chat = chat
        self._reply = reply
        self._model = body["model"]
        self._include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._id = f"chatcmpl-{secrets.token_urlsafe(21)[:29]}"
        self._created = int(time.time())
        self._arguments = [
            call.arguments
            if call.arguments is not None
            else json.dumps({"code": call.code}, ensure_ascii=chat.ensure_ascii)
            for call in reply.tool_calls
        ]
        self._call_ids = [call.id or f"call_{secrets.token_urlsafe(18)[:24]}" for call in reply.tool_calls]
        prompt = json.dumps(body["messages"]) + json.dumps(body.get("tools") or [])
        completion_tokens = _count_tokens(reply.text + "".join(self._arguments))
        prompt_tokens = _count_tokens(prompt)
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "service_tier": "default",
            "system_fingerprint": "fp_ci_magic",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk

    def chunks(self) -> Iterator[dict[str, Any]]:
        reply = self._reply
        for piece in re.findall(r"\s*\S+\s*|\s+", reply.reasoning):
            yield self._chunk({reply.reasoning_field: piece})
        if reply.text or not reply.tool_calls:
            yield self._chunk({"role": "assistant", "content": "", "refusal": None})
            for piece in re.findall(r"\s*\S+\s*|\s+", reply.text):
                yield self._chunk({"content": piece})
        style = reply.call_style
        for index, (call, arguments) in enumerate(zip(reply.tool_calls, self._arguments, strict=True)):
            named = {"id": self._call_ids[index], "type": "function"}
            whole = style == "whole"
            opening = {
                "index": index,
                **named,
                "function": {"name": call.name, "arguments": arguments if whole else ""},
            }
            if style == "no_index":
                del opening["index"]
            if index == 0 and not reply.text:
                first = {"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None}
                yield self._chunk(first)
            else:
                yield self._chunk({"tool_calls": [opening]})
            for fragment in [] if whole else self._chat._fragments(arguments):
                delta: dict[str, Any] = {"index": index, "function": {"arguments": fragment}}
                if style == "no_index":
                    del delta["index"]
                if style == "repeat_id":
                    delta = {"index": index, **named, "function": {"name": call.name, "arguments": fragment}}
                yield self._chunk({"tool_calls": [delta]})
        yield self._chunk({}, reply.finish)
        if self._include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self.usage
            yield usage_chunk
            self._chat._record_usage(self.usage)

    def message(self) -> dict[str, Any]:
        reply = self._reply
        self._chat._record_usage(self.usage)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text or None,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool_calls:
            calls = zip(reply.tool_calls, self._call_ids, self._arguments, strict=True)
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
                for call, call_id, arguments in calls
            ]
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
            "usage": self.usage,
            "service_tier": "default",
            "system_fingerprint": "fp_ci_magic",
        }


# -- scenarios --------------------------------------------------------------------------------------

QUICKSTART_PROMPT = "Load the numbers 1..100, plot their squares and save the table as squares.csv"

_QUICKSTART_STEPS: list[tuple[str, str]] = [
    (
        "table",
        "# step: table\n"
        "import pandas as pd\n\n"
        'df = pd.DataFrame({"n": range(1, 101)})\n'
        'df["square"] = df["n"] ** 2\n'
        "print(df.tail())\n",
    ),
    (
        "plot",
        "# step: plot\n"
        "import matplotlib.pyplot as plt\n\n"
        "fig, ax = plt.subplots(figsize=(6, 4))\n"
        'ax.plot(df["n"], df["square"], color="tab:blue")\n'
        'ax.set(title="Squares of 1..100", xlabel="n", ylabel="n²")\n'
        "plt.show()\n",
    ),
    (
        "save",
        "# step: save\n"
        'df.to_csv("squares.csv", index=False)\n'
        'print(f"saved {len(df)} rows to squares.csv")\n',
    ),
]
_STEP_MARKER = re.compile(r"# step: (\w+)")
_ERROR = re.compile(r"Traceback|\b[A-Z]\w*(?:Error|Exception)\b")


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def quickstart(messages: list[dict[str, Any]]) -> Reply:
    """The quickstart's model: table, plot, save, then a Markdown answer linking the CSV.

    It picks the next step from the tool results since the last user message: a step whose result
    shows an error is retried (once), and a ``NameError`` about ``df`` means the kernel lost the
    table, so it is built again.
    """
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    if "square" not in _text_of(messages[last_user].get("content")).lower():
        return Reply(text=f"This scripted model only knows the quickstart prompt: “{QUICKSTART_PROMPT}”.")
    step_of_call: dict[str, str] = {}
    done: set[str] = set()
    failures: dict[str, int] = {}
    last_error = ""
    for message in messages[last_user + 1 :]:
        for call in message.get("tool_calls") or ():
            found = _STEP_MARKER.search(call["function"]["arguments"])
            if found:
                step_of_call[call["id"]] = found.group(1)
        if message.get("role") == "tool" and message.get("tool_call_id") in step_of_call:
            step, result = step_of_call[message["tool_call_id"]], _text_of(message.get("content"))
            if _ERROR.search(result):
                failures[step] = failures.get(step, 0) + 1
                last_error = result
                if "name 'df' is not defined" in result:
                    done.discard("table")
            else:
                done.add(step)
    pending = [(name, code) for name, code in _QUICKSTART_STEPS if name not in done]
    if not pending:
        return Reply(
            text="I loaded the numbers 1 to 100 into a table with their squares, plotted the squares "
            "(a parabola reaching 10,000 at n = 100) and saved the table.\n\n"
            "[Download squares.csv](sandbox:/mnt/data/squares.csv)"
        )
    name, code = pending[0]
    if failures.get(name, 0) >= 2:
        return Reply(text=f"I could not finish the {name} step; it kept failing:\n\n```\n{last_error}\n```")
    intro = "I'll build the table first, then plot it and save it." if not step_of_call else ""
    return Reply(text=intro, tool_calls=(ToolCall(code),))


SCENARIOS: dict[str, Callable[[list[dict[str, Any]]], ScriptItem]] = {"quickstart": quickstart}


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_line("python -m tests.servers.chat_server", "Serve a scripted Chat Completions model.")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="quickstart")
    parser.add_argument("--model", default="scripted-model")
    args = parser.parse_args(argv)
    server = ChatServer(SCENARIOS[args.scenario], model=args.model, **server_options(args))
    serve_until_stopped(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
