"""The local backend's model loop: any Chat Completions model, one ``python`` tool, a sandbox to run it.

One turn is a few *steps*. Each step streams one completion; its tool-call argument fragments are
decoded as they arrive and shown as code deltas, each call then runs through ``execute`` and a short
summary of what it printed goes back to the model as a ``tool`` message. The turn ends when the
model answers without calling the tool, or after ``max_steps`` completions.

History lives client-side in ``request.conversation.messages``. Only whole steps are added to it
(an assistant message with tool calls always comes with all its tool replies), so a failed or
interrupted turn still leaves a history every server accepts.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import openai

from ci_magic.backends.base import Conversation, TurnRequest
from ci_magic.backends.local.partial_json import CodeArgumentDecoder, ToolArgumentsError
from ci_magic.errors import BackendError, ConfigurationError, SandboxError, StreamError
from ci_magic.events import (
    CallStarted,
    CallStatus,
    CodeDelta,
    CodeDone,
    Completed,
    Event,
    ExecutionError,
    Failed,
    FileCited,
    Image,
    Logs,
    Notice,
    RichOutput,
    TextDelta,
    TextDone,
    TurnStarted,
    Usage,
)

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionChunk

__all__ = ["PYTHON_TOOL", "TOOL_INSTRUCTIONS", "ChatModelLoop", "Execute"]

Execute = Callable[[str, str], AsyncIterator[Event]]
"""``execute(code, call_id)``: run code in the sandbox, yielding its events (CallStatus, Logs...)."""

TOOL_NAME = "python"

TOOL_INSTRUCTIONS = (
    "You have one tool, `python`. It runs Python code in a persistent Jupyter kernel: variables and "
    "imports survive between calls. The working directory is /mnt/data; save files there and link them "
    "in your answer as sandbox:/mnt/data/<name>. Print what you need to see, call plt.show() to display a "
    "chart. Only code sent through the tool runs."
)

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Run Python code in a persistent Jupyter kernel (cwd /mnt/data); returns its output.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python source to run."}},
            "required": ["code"],
        },
    },
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MIN_BUDGET = 200
_CUT_MARKER = "\n[... {} characters cut to fit the output budget ...]\n"
_CONFIG_HINT = '`%config CodeInterpreter.model_base_url = "http://host:port/v1"`'


@dataclass
class _DraftCall:
    """One tool call as its deltas arrive."""

    index: int
    call_id: str
    name: str = ""
    decoder: CodeArgumentDecoder = field(default_factory=CodeArgumentDecoder)
    started: bool = False  # CallStarted was emitted: this call is shown as code
    unsent: str = ""  # decoded code not yet shown (the name may arrive after the first arguments)

    def add_name(self, fragment: str) -> None:
        # Some servers repeat the full name in every delta instead of streaming it once.
        if fragment != self.name:
            self.name += fragment


@dataclass
class _Step:
    """What one streamed completion produced."""

    text: str = ""
    segment: str = ""  # text since the last TextDone
    calls: dict[int, _DraftCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)


class _ToolOutput:
    """Folds one call's events into the ``tool`` message the model reads next."""

    def __init__(self) -> None:
        self.sections: list[list[str]] = []  # [label, text], consecutive same-label output merged
        self.images = 0
        self.files: list[str] = []
        self.error: ExecutionError | None = None

    def add(self, event: Event) -> None:
        match event:
            case Logs(text=text, stream=stream):
                self._append("output" if stream == "logs" else stream, text)
            case Image():
                self.images += 1
            case RichOutput(bundle=bundle):
                plain = bundle.get("text/plain")
                if isinstance(plain, str):
                    self._append("result", plain.rstrip("\n") + "\n")
                elif any(mime.startswith("image/") for mime in bundle):
                    self.images += 1
                else:
                    self._append("result", f"[{', '.join(bundle) or 'empty'} output shown to the user]\n")
            case ExecutionError():
                self.error = event
            case FileCited(filename=name):
                if name not in self.files:
                    self.files.append(name)

    def _append(self, label: str, text: str) -> None:
        if self.sections and self.sections[-1][0] == label:
            self.sections[-1][1] += text
        else:
            self.sections.append([label, text])

    def render(self, budget: int) -> str:
        parts = [f"{label}:\n{_ANSI.sub('', text).rstrip()}" for label, text in self.sections if text.strip()]
        if self.error is not None:
            error = f"error: {self.error.name}: {self.error.value}"
            traceback = _ANSI.sub("", self.error.traceback).strip()
            parts.append(f"{error}\n{traceback}" if traceback else error)
        if self.images:
            parts.append(f"{self.images} image(s) displayed to the user.")
        if self.files:
            parts.append("New files: " + ", ".join(f"sandbox:/mnt/data/{name}" for name in self.files))
        return _truncate("\n".join(parts) or "The code ran and printed nothing.", budget)


def _truncate(text: str, budget: int) -> str:
    """Keep the head and the tail (where errors land) of ``text`` within ``budget`` characters."""
    if len(text) <= budget:
        return text
    # The marker counts against the budget; len(text) bounds the digits of the count it shows.
    keep = max(budget - len(_CUT_MARKER.format(len(text))), 0)
    head = keep * 2 // 3
    tail = keep - head
    marker = _CUT_MARKER.format(len(text) - keep)
    return text[:head] + marker + (text[len(text) - tail :] if tail else "")


@dataclass
class _Reply:
    """What goes back into the history for one tool call."""

    content: str = ""
    arguments: str = "{}"  # normalized JSON: servers re-parse history arguments in their chat templates


@dataclass
class _SandboxHealth:
    failed_last: bool = False


class _Turn:
    """This turn's messages, added to the conversation once and only in whole steps."""

    def __init__(self, conversation: Conversation, user_message: dict[str, Any]) -> None:
        self._conversation = conversation
        self.messages: list[dict[str, Any]] = [user_message]
        self._committed = False

    def add(self, *messages: dict[str, Any]) -> None:
        self.messages.extend(messages)

    def commit(self) -> None:
        # A lone user message is dropped: two user messages in a row break strict chat templates.
        if self._committed or len(self.messages) < 2:
            return
        self._committed = True
        self._conversation.messages.extend(self.messages)
        self._conversation.notes.clear()  # they were delivered inside the user message


class ChatModelLoop:
    """Drives an OpenAI-compatible Chat Completions model through code-running turns."""

    def __init__(
        self, client: openai.AsyncOpenAI, *, model: str, max_steps: int = 12, output_budget: int = 8000
    ) -> None:
        if max_steps < 1:
            raise ConfigurationError(
                f"max_steps must be at least 1 (got {max_steps}); "
                "set it with `%config CodeInterpreter.max_steps = 12`."
            )
        if output_budget < _MIN_BUDGET:
            raise ConfigurationError(
                f"The output budget sent back to the model must be at least {_MIN_BUDGET} characters "
                f"(got {output_budget}); raise it in ci-magic's configuration."
            )
        self._client = client
        self._model = model
        self._max_steps = max_steps
        self._output_budget = output_budget
        self._served_model: str | None = None

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    async def run(self, request: TurnRequest, execute: Execute) -> AsyncIterator[Event]:
        """Run one turn: stream steps, execute tool calls, end with Completed or Failed."""
        conversation = request.conversation
        model = await self._resolve_model(request.model or self._model)
        instructions = f"{request.instructions.rstrip()}\n\n{TOOL_INSTRUCTIONS}".lstrip()
        system = {"role": "system", "content": instructions}
        turn = _Turn(conversation, {"role": "user", "content": self._user_content(request)})
        usage = Usage()
        sandbox = _SandboxHealth()
        try:
            for number in range(1, self._max_steps + 1):
                step = _Step()
                messages = [system, *conversation.messages, *turn.messages]
                async for event in self._stream_step(request, model, messages, step, first=number == 1):
                    yield event
                usage += step.usage
                if step.finish_reason not in ("stop", "tool_calls"):
                    yield Notice(f"The model stopped early (finish_reason: {step.finish_reason}).", "warning")
                if not step.calls:
                    turn.add({"role": "assistant", "content": step.text})
                    turn.commit()
                    yield Completed(response_id=None, container_id=request.container_id, usage=usage)
                    return
                tool_calls: list[dict[str, Any]] = []
                replies: list[dict[str, Any]] = []
                for draft in sorted(step.calls.values(), key=lambda d: d.index):
                    reply = _Reply()
                    async for event in self._run_call(draft, execute, sandbox, reply):
                        yield event
                    tool_calls.append(
                        {
                            "id": draft.call_id,
                            "type": "function",
                            "function": {"name": draft.name or TOOL_NAME, "arguments": reply.arguments},
                        }
                    )
                    replies.append({"role": "tool", "tool_call_id": draft.call_id, "content": reply.content})
                assistant = {"role": "assistant", "content": step.text or None, "tool_calls": tool_calls}
                turn.add(assistant, *replies)
            turn.commit()
            yield Failed(
                f"Stopped after {self._max_steps} model steps while the model was still running code. "
                "Ask it to continue in a new cell, or allow more steps with "
                f"`%config CodeInterpreter.max_steps = {max(20, self._max_steps * 2)}`.",
                kind="limit",
            )
        finally:
            # Errors and interrupts keep the steps that finished: their code did run in the kernel.
            turn.commit()

    async def _run_call(
        self, draft: _DraftCall, execute: Execute, sandbox: _SandboxHealth, reply: _Reply
    ) -> AsyncIterator[Event]:
        """Run one tool call (or explain to the model why not), filling ``reply``."""
        if draft.name not in (TOOL_NAME, ""):
            reply.content = (
                f"There is no tool named {draft.name!r}. The only tool is `python`, "
                'called with {"code": "<python source>"}.'
            )
            if draft.started:  # its name arrived after its first delta
                yield CallStatus(draft.call_id, "failed")
            yield Notice(f"The model called an unknown tool {draft.name!r}; it was told to use python.")
            return
        try:
            code = draft.decoder.finish()
        except ToolArgumentsError as err:
            yield CodeDone(draft.call_id, draft.decoder.text)
            yield CallStatus(draft.call_id, "failed")
            reply.content = str(err)
            return
        reply.arguments = json.dumps({"code": code}, ensure_ascii=False)
        yield CodeDone(draft.call_id, code)
        output = _ToolOutput()
        try:
            async for event in execute(code, draft.call_id):
                output.add(event)
                yield event
        except SandboxError as err:
            # Once, the model may route around it (a timeout, a restarted kernel); twice in a row, the
            # sandbox itself is broken and the turn stops.
            if sandbox.failed_last:
                raise
            sandbox.failed_last = True
            yield CallStatus(draft.call_id, "failed")
            yield Notice(f"The sandbox failed while running this code: {err.message}", "warning")
            output.error = ExecutionError(draft.call_id, "SandboxError", err.message)
        else:
            sandbox.failed_last = False
        reply.content = output.render(self._output_budget)

    async def _resolve_model(self, model: str) -> str:
        """The model to ask; with none configured, the server's only model (llama.cpp, LM Studio...)."""
        if model:
            return model
        if self._served_model is None:
            try:
                names = [entry.id async for entry in self._client.models.list()]
            except openai.APIStatusError as err:
                raise ConfigurationError(
                    f"No model is configured and the model server at {self.base_url} could not list its "
                    f"models (HTTP {err.status_code}: {_server_message(err)}). "
                    'Choose one with `%config CodeInterpreter.model = "<name>"`.'
                ) from err
            except openai.APIConnectionError as err:
                raise self._connection_error(err) from err
            if len(names) != 1:
                served = ", ".join(names[:20]) or "none"
                raise ConfigurationError(
                    f"No model is configured and the model server at {self.base_url} serves {len(names)} "
                    f'({served}). Choose one with `%config CodeInterpreter.model = "<name>"`.'
                )
            self._served_model = names[0]
        return self._served_model

    @staticmethod
    def _user_content(request: TurnRequest) -> str:
        # Notes ride in the user message: many chat templates reject a system message mid-conversation.
        parts = [f"Note: {note}" for note in request.conversation.notes]
        if request.context.strip():
            parts.append(request.context.strip())
        parts.append(request.prompt)
        return "\n\n".join(parts)

    async def _stream_step(
        self, request: TurnRequest, model: str, messages: list[dict[str, Any]], step: _Step, *, first: bool
    ) -> AsyncIterator[Event]:
        """Stream one completion into ``step``, yielding text and code events as they arrive."""
        try:
            stream = await self._client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]  # plain dicts, shaped like the params
                tools=[PYTHON_TOOL],  # type: ignore[list-item]
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=request.extra_headers or None,
            )
        except openai.APIStatusError as err:
            raise self._status_error(err, model) from err
        except openai.APIConnectionError as err:
            raise self._connection_error(err) from err
        except openai.APIError as err:
            raise BackendError(f"The model server at {self.base_url} failed: {_server_message(err)}") from err
        if first:
            yield TurnStarted(response_id=None, model=model)
        try:
            async with stream:
                async for chunk in stream:
                    for event in self._read_chunk(chunk, step, request.container_id):
                        yield event
        except openai.APIError as err:
            for event in _abandon(step):
                yield event
            if isinstance(err, openai.APIConnectionError):
                raise StreamError(
                    f"The connection to the model server at {self.base_url} broke while the model was "
                    "answering; what arrived is shown above. Run the cell again to retry."
                ) from err
            raise BackendError(
                f"The model server at {self.base_url} reported an error mid-answer: {_server_message(err)}"
            ) from err
        if step.segment:
            yield TextDone(step.segment)
            step.segment = ""
        if step.finish_reason is None:
            for event in _abandon(step):
                yield event
            raise StreamError(
                f"The model server at {self.base_url} ended its answer before the model finished "
                "(the stream closed without a finish_reason); what arrived is shown above. "
                "Run the cell again."
            )

    def _read_chunk(self, chunk: ChatCompletionChunk, step: _Step, container_id: str) -> list[Event]:
        events: list[Event] = []
        if chunk.usage is not None:
            used = chunk.usage
            step.usage += Usage(used.prompt_tokens or 0, used.completion_tokens or 0, used.total_tokens or 0)
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # we ask for one choice; ignore any server that sends more
            delta = choice.delta
            if delta.content:
                step.text += delta.content
                step.segment += delta.content
                events.append(TextDelta(delta.content))
            for call in delta.tool_calls or ():
                if step.segment:
                    events.append(TextDone(step.segment))
                    step.segment = ""
                draft = step.calls.get(call.index)
                if draft is None:
                    call_id = call.id or f"call_{uuid.uuid4().hex[:24]}"  # a few servers send no id
                    draft = step.calls[call.index] = _DraftCall(call.index, call_id)
                function = call.function
                if function is not None and function.name:
                    draft.add_name(function.name)
                if not draft.started and draft.name in (TOOL_NAME, ""):
                    draft.started = True
                    events.append(CallStarted(draft.call_id, container_id))
                if function is not None and function.arguments:
                    draft.unsent += draft.decoder.feed(function.arguments)
                if draft.started and draft.unsent:
                    events.append(CodeDelta(draft.call_id, draft.unsent))
                    draft.unsent = ""
            if choice.finish_reason:
                step.finish_reason = choice.finish_reason
        return events

    def _status_error(self, err: openai.APIStatusError, model: str) -> BackendError:
        status, message = err.status_code, _server_message(err)
        where = f"The model server at {self.base_url}"
        if status in (401, 403):
            text = (
                f"{where} refused the API key (HTTP {status}: {message}). "
                'Set the key it expects with `%config CodeInterpreter.model_api_key = "..."` '
                "(or the CI_MAGIC_MODEL_API_KEY environment variable)."
            )
        elif status == 404:
            text = (
                f"{where} answered HTTP 404: {message}. Check that it serves the model {model!r} "
                f"(GET {self.base_url}/models lists them; choose with `%config CodeInterpreter.model`) and "
                "that model_base_url is its OpenAI-compatible root, usually ending in /v1."
            )
        elif status in (400, 422):
            text = (
                f"{where} rejected the request (HTTP {status}: {message}). The local backend needs a model "
                "served with tool calling enabled."
            )
        elif status == 429:
            text = f"{where} is rate limiting requests (HTTP 429: {message}). Wait, then run the cell again."
        elif status >= 500:
            text = f"{where} failed (HTTP {status}: {message}), also on retry. Try again, or read its log."
        else:
            text = f"{where} answered HTTP {status}: {message}."
        return BackendError(text, status_code=status)

    def _connection_error(self, err: openai.APIConnectionError) -> BackendError:
        if isinstance(err, openai.APITimeoutError):
            return BackendError(
                f"The model server at {self.base_url} did not answer in time. Check that it is running and "
                f"not overloaded, or point ci-magic at another one with {_CONFIG_HINT}."
            )
        cause = f" ({err.__cause__})" if err.__cause__ and str(err.__cause__) else ""
        return BackendError(
            f"Could not reach the model server at {self.base_url}{cause}. Start it, or point ci-magic at the "
            f"right one with {_CONFIG_HINT}."
        )


def _abandon(step: _Step) -> list[Event]:
    """Close what a broken stream left open: calls whose code never finished arriving."""
    return [CallStatus(d.call_id, "incomplete") for d in step.calls.values() if d.started]


def _server_message(err: openai.APIError) -> str:
    """The server's own words: OpenAI, vLLM, Ollama, llama.cpp and FastAPI shape errors differently."""
    body = err.body
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"].strip()
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return err.message
