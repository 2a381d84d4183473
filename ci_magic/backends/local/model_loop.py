"""The local backend's model loop: any Chat Completions model, one ``python`` tool, something to run it.

One turn is a few *steps*. Each step streams one completion; its tool-call argument fragments are
decoded as they arrive and shown as code deltas, each call then runs through ``execute`` and a short
summary of what it printed goes back to the model as a ``tool`` message. The turn ends when the
model answers without calling the tool, or after ``max_steps`` completions.

Real servers differ (see :mod:`.servers`), and the loop meets them where they are:

- The server is identified once per loop from ``GET /v1/models``; ``tool_choice`` and ``max_tokens``
  are sent as it expects, and its context size (when it reports one) bounds what is sent.
- A model that writes its call as text (a ```` ```python ```` block, or Hermes-style
  ``<tool_call>{...}</tool_call>``) has it run as a call (``text_tool_calls``), and is told the
  result in the shape it used.
- The conversation sent always fits the context: old turns are left out, long contents cut, and a
  request the server finds too long is trimmed harder and sent once more.

History lives client-side in ``request.conversation.messages``. Only whole steps are added to it (an
assistant message with tool calls always comes with all its tool replies), and nothing from a turn
whose request the server refused: a refused request never poisons the next cell.

The loop knows nothing of sandboxes: ``execute(code, call_id)`` runs code wherever its caller
decides (the local sandbox, a Jupyter Kernel Gateway...).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import openai

from ci_magic import events
from ci_magic.backends.base import Conversation, TurnRequest
from ci_magic.backends.local.partial_json import CodeArgumentDecoder, ToolArgumentsError
from ci_magic.backends.local.servers import (
    TOOL_CHOICES,
    ServerProfile,
    ToolChoice,
    default_max_tokens,
    identify,
    loop_options,
    tool_choice_param,
)
from ci_magic.backends.local.text_calls import Piece, TextCall, TextCallScanner, reply_in_shape
from ci_magic.backends.sdk_errors import Service, sdk_error, server_message
from ci_magic.errors import BackendError, ConfigurationError, SandboxError, StreamError
from ci_magic.redact import display_url

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionChunk

__all__ = [
    "PYTHON_TOOL",
    "TEXT_CALL_INSTRUCTIONS",
    "TOOL_INSTRUCTIONS",
    "ChatModelLoop",
    "Execute",
    "loop_options",
]

Execute = Callable[[str, str], AsyncIterator[events.Event]]
"""``execute(code, call_id)``: run code, yielding its events (CallStatus, Logs, Image...)."""

TOOL_NAME = "python"

TOOL_INSTRUCTIONS = (
    "You have one tool, `python`. It runs Python code in a persistent Jupyter kernel: variables and "
    "imports survive between calls. The working directory is /mnt/data; save files there and link them "
    "in your answer as sandbox:/mnt/data/<name>. Print what you need to see, call plt.show() to display a "
    "chart. Only code sent through the tool runs."
)

TEXT_CALL_INSTRUCTIONS = (
    "To run Python code, reply with one ```python block and stop; you will get its output in the next "
    "message. Code runs in a persistent Jupyter kernel with /mnt/data as its working directory."
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
# Tokens are estimated from characters: three per token errs on the safe side for English and code.
_CHARS_PER_TOKEN = 3
_TOOLS_TOKENS = 200  # the tool schema and the chat template's own wrapping
_OVERFLOW = re.compile(
    r"exceed_context_size|context (?:length|size|window)|maximum context|n_ctx|too many tokens|"
    r"prompt is too long|input is too long|reduce the length",
    re.IGNORECASE,
)
_TOOLS_UNSUPPORTED = re.compile(
    r"does not support tools|tools param requires|tool[_ ]choice.*(?:requires|not supported)|"
    r"(?:tools|tool calls?|function calling) (?:are|is) not supported",
    re.IGNORECASE,
)
_NUMBER_AFTER = re.compile(r'"?(n_ctx|n_prompt_tokens)"?\s*[:=]\s*(\d+)')
_TEXT_SHAPES = {"fence": "a ```python block", "hermes": "a <tool_call> in its text"}


@dataclass
class _DraftCall:
    """One tool call as its deltas arrive."""

    index: int
    call_id: str
    name: str = ""
    decoder: CodeArgumentDecoder = field(default_factory=CodeArgumentDecoder)
    started: bool = False  # CallStarted was emitted: this call is shown as code
    unsent: str = ""  # decoded code not yet shown (the name may arrive after the first arguments)
    text_call: TextCall | None = None  # the call came as text, already decoded

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
    usage: events.Usage = field(default_factory=events.Usage)
    chunks: int = 0
    thinking: int = 0  # characters of reasoning received
    text_call: _DraftCall | None = None

    def draft_for(self, index: int | None, call_id: str | None) -> _DraftCall:
        """The call a delta belongs to: by ``index``; without one, by ``id``; else the last call."""
        if index is None:
            known = [d for d in self.calls.values() if call_id and d.call_id == call_id]
            if known:
                return known[0]
            if call_id is None and self.calls:
                return self.calls[max(self.calls)]
            index = len(self.calls)
        draft = self.calls.get(index)
        if draft is None:
            draft = self.calls[index] = _DraftCall(index, call_id or f"call_{uuid.uuid4().hex[:24]}")
        return draft


class _ToolOutput:
    """Folds one call's events into the ``tool`` message the model reads next."""

    def __init__(self) -> None:
        self.sections: list[list[str]] = []  # [label, text], consecutive same-label output merged
        self.images = 0
        self.files: list[str] = []
        self.error: events.ExecutionError | None = None

    def add(self, event: events.Event) -> None:
        match event:
            case events.Logs(text=text, stream=stream):
                self._append("output" if stream == "logs" else stream, text)
            case events.Image():
                self.images += 1
            case events.RichOutput(bundle=bundle):
                plain = bundle.get("text/plain")
                if isinstance(plain, str):
                    self._append("result", plain.rstrip("\n") + "\n")
                elif any(mime.startswith("image/") for mime in bundle):
                    self.images += 1
                else:
                    self._append("result", f"[{', '.join(bundle) or 'empty'} output shown to the user]\n")
            case events.ExecutionError():
                self.error = event
            case events.FileCited(filename=name):
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
        self.ran: list[str] = []  # code executed during this turn
        self._closed = False

    def add(self, *messages: dict[str, Any]) -> None:
        self.messages.extend(messages)

    def commit(self) -> None:
        # A lone user message is dropped: two user messages in a row break strict chat templates.
        if self._closed or len(self.messages) < 2:
            return
        self._closed = True
        self._conversation.messages.extend(self.messages)
        self._conversation.notes.clear()  # they were delivered inside the user message

    def discard(self) -> None:
        """The server refused a request of this turn: keep none of it, but say what ran."""
        if self._closed:
            return
        self._closed = True
        if self.ran:
            code = _truncate("\n\n".join(self.ran), 1500)
            self._conversation.notes.append(
                "The previous turn failed on the model server's side after this code had run in the "
                f"kernel (its variables may exist):\n```python\n{code}\n```"
            )


class _Overflow(Exception):
    """The server said the request does not fit its context."""

    def __init__(self, error: BackendError, context_tokens: int | None, prompt_tokens: int | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.context_tokens = context_tokens
        self.prompt_tokens = prompt_tokens


class _ToolsRefused(Exception):
    """The server (or its model) does not take ``tools``."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error


class _Refused(Exception):
    """The server refused a request (any other HTTP error): the turn's history is discarded."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error


class ChatModelLoop:
    """Drives an OpenAI-compatible Chat Completions model through code-running turns.

    Keep one loop per model server: it identifies the server on its first turn and remembers.
    ``tool_choice`` / ``max_tokens`` empty or 0 pick the server's defaults (:mod:`.servers`);
    ``context_tokens`` is the context assumed when the server does not report its own.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        model: str,
        max_steps: int = 12,
        output_budget: int = 8000,
        tool_choice: str = "",
        max_tokens: int = 0,
        text_tool_calls: bool = True,
        context_tokens: int = 8192,
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
        if tool_choice and tool_choice not in TOOL_CHOICES:
            raise ConfigurationError(
                f"tool_choice must be one of {', '.join(TOOL_CHOICES)} (or empty for the server's default), "
                f'not {tool_choice!r}; set it with `%config CodeInterpreter.tool_choice = "auto"`.'
            )
        if context_tokens < 512:
            raise ConfigurationError(
                f"context_tokens must be at least 512 (got {context_tokens}); set the model's context size "
                "with `%config CodeInterpreter.context_tokens = 8192`."
            )
        self._client = client
        self._model = model
        self._max_steps = max_steps
        self._output_budget = output_budget
        self._tool_choice: ToolChoice | None = tool_choice or None  # type: ignore[assignment]
        self._max_tokens = max_tokens
        self._text_tool_calls = text_tool_calls
        self._context_tokens = context_tokens
        self._profile: ServerProfile | None = None
        self._served_model: str | None = None
        self._tools_off = False  # the server refused tools: calls come as text only

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    @property
    def shown_url(self) -> str:
        """The server's URL for messages: no user, password or query (they may hold a secret)."""
        return display_url(self._client.base_url).rstrip("/")

    @property
    def profile(self) -> ServerProfile | None:
        """The model server, once identified (on the first turn)."""
        return self._profile

    @property
    def context_tokens(self) -> int:
        return (self._profile.context_tokens if self._profile else None) or self._context_tokens

    @property
    def max_tokens(self) -> int:
        return self._max_tokens or default_max_tokens(self.context_tokens)

    async def run(self, request: TurnRequest, execute: Execute) -> AsyncIterator[events.Event]:
        """Run one turn: stream steps, execute tool calls, end with Completed or Failed."""
        conversation = request.conversation
        model = await self._resolve_model(request.model or self._model)
        turn = _Turn(conversation, {"role": "user", "content": request.user_text()})
        usage = events.Usage()
        sandbox = _SandboxHealth()
        told_text_call = False
        try:
            for number in range(1, self._max_steps + 1):
                step = _Step()
                async for event in self._stream_step(request, model, turn, step, number=number):
                    yield event
                usage += step.usage
                repeated = _repeats_code(step, turn.ran)
                if repeated is not None:
                    # A block repeating code that already ran in this turn quotes it: not a new call.
                    yield events.CallStatus(repeated, "completed")
                    yield events.Notice(
                        "The model's answer shows code that already ran; it was not run again."
                    )
                    step.text_call = None
                if step.text_call is not None and not told_text_call:
                    told_text_call = True
                    assert step.text_call.text_call is not None
                    shape = _TEXT_SHAPES[step.text_call.text_call.shape]
                    yield events.Notice(
                        f"The model wrote its code as text ({shape}), not as a tool call; it ran as a call "
                        "(CodeInterpreter.text_tool_calls)."
                    )
                if step.finish_reason == "length":
                    yield events.Notice(
                        f"The model's answer was cut at max_tokens ({self.max_tokens} tokens); raise it with "
                        "`%config CodeInterpreter.max_tokens = ...` if it needs more.",
                        "warning",
                    )
                elif step.finish_reason not in ("stop", "tool_calls", None):
                    yield events.Notice(
                        f"The model stopped early (finish_reason: {step.finish_reason}).", "warning"
                    )
                if not step.calls and step.text_call is None:
                    if not step.text.strip():
                        yield events.Notice(
                            "The model gave an empty answer "
                            f"({_thinking_note(step)}finish_reason: {step.finish_reason})."
                        )
                    turn.add({"role": "assistant", "content": step.text})
                    turn.commit()
                    yield events.Completed(response_id=None, container_id=request.container_id, usage=usage)
                    return
                async for event in self._run_step_calls(step, execute, sandbox, turn):
                    yield event
            turn.commit()
            yield events.Failed(
                f"Stopped after {self._max_steps} model steps while the model was still running code. "
                "Ask it to continue in a new cell, or allow more steps with "
                f"`%config CodeInterpreter.max_steps = {max(20, self._max_steps * 2)}`.",
                kind="limit",
            )
        except _Refused as refused:
            turn.discard()
            raise refused.error from refused.__cause__
        finally:
            # Errors and interrupts keep the steps that finished: their code did run in the kernel.
            turn.commit()

    async def _run_step_calls(
        self, step: _Step, execute: Execute, sandbox: _SandboxHealth, turn: _Turn
    ) -> AsyncIterator[events.Event]:
        if step.text_call is not None:
            draft = step.text_call
            assert draft.text_call is not None
            reply = _Reply()
            async for event in self._run_call(draft, execute, sandbox, turn, reply):
                yield event
            turn.add(
                {"role": "assistant", "content": draft.text_call.raw},
                {"role": "user", "content": reply_in_shape(draft.text_call.shape, reply.content)},
            )
            return
        tool_calls: list[dict[str, Any]] = []
        replies: list[dict[str, Any]] = []
        for draft in sorted(step.calls.values(), key=lambda d: d.index):
            reply = _Reply()
            async for event in self._run_call(draft, execute, sandbox, turn, reply):
                yield event
            tool_calls.append(
                {
                    "id": draft.call_id,
                    "type": "function",
                    "function": {"name": draft.name or TOOL_NAME, "arguments": reply.arguments},
                }
            )
            replies.append({"role": "tool", "tool_call_id": draft.call_id, "content": reply.content})
        # content "" and never null: llama-cpp-python (among others) refuses null with HTTP 500.
        turn.add({"role": "assistant", "content": step.text, "tool_calls": tool_calls}, *replies)

    async def _run_call(
        self, draft: _DraftCall, execute: Execute, sandbox: _SandboxHealth, turn: _Turn, reply: _Reply
    ) -> AsyncIterator[events.Event]:
        """Run one tool call (or explain to the model why not), filling ``reply``; code it runs joins
        ``turn.ran``."""
        if draft.name not in (TOOL_NAME, ""):
            reply.content = (
                f"There is no tool named {draft.name!r}. The only tool is `python`, "
                'called with {"code": "<python source>"}.'
            )
            if draft.started:  # its name arrived after its first delta
                yield events.CallStatus(draft.call_id, "failed")
            yield events.Notice(
                f"The model called an unknown tool {draft.name!r}; it was told to use python."
            )
            return
        try:
            if draft.text_call is not None:
                if draft.text_call.error is not None:
                    raise ToolArgumentsError(draft.text_call.error)
                code = draft.text_call.code
            else:
                code = draft.decoder.finish()
        except ToolArgumentsError as err:
            shown = draft.text_call.code if draft.text_call is not None else draft.decoder.text
            if not draft.started:
                yield events.CallStarted(draft.call_id)
            yield events.CodeDone(draft.call_id, shown)
            yield events.CallStatus(draft.call_id, "failed")
            yield events.Notice(f"The model's call could not run: {err} It was told so.", "warning")
            reply.content = str(err)
            return
        reply.arguments = json.dumps({"code": code}, ensure_ascii=False)
        yield events.CodeDone(draft.call_id, code)
        output = _ToolOutput()
        turn.ran.append(code)
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
            yield events.CallStatus(draft.call_id, "failed")
            yield events.Notice(f"The sandbox failed while running this code: {err.message}", "warning")
            output.error = events.ExecutionError(draft.call_id, "SandboxError", err.message)
        else:
            sandbox.failed_last = False
        reply.content = output.render(self._tool_output_budget())

    # -- the server -------------------------------------------------------------------------------------

    async def _identify(self) -> tuple[ServerProfile, BaseException | None]:
        """Ask ``GET /models`` once; a server that does not answer it is an unknown one."""
        if self._profile is not None:
            return self._profile, None
        try:
            listing = await self._client.get("/models", cast_to=object)
        except openai.APIConnectionError as err:
            raise self._connection_error(err) from err
        except openai.APIStatusError as err:
            # Not remembered: a wrong key or a server still starting may answer differently next turn.
            return identify(None), err
        self._profile = identify(listing)
        return self._profile, None

    async def _resolve_model(self, model: str) -> str:
        """The model to ask; with none configured, the server's only model (llama.cpp, LM Studio...)."""
        profile, failure = await self._identify()
        if model:
            return model
        if self._served_model is None:
            if isinstance(failure, openai.APIStatusError):
                raise ConfigurationError(
                    f"No model is configured and the model server at {self.shown_url} could not list its "
                    f"models (HTTP {failure.status_code}: {server_message(failure)}). "
                    'Choose one with `%config CodeInterpreter.model = "<name>"`.'
                ) from failure
            names = profile.models
            if len(names) != 1:
                served = ", ".join(names[:20]) or "none"
                raise ConfigurationError(
                    f"No model is configured and the model server at {self.shown_url} serves {len(names)} "
                    f'({served}). Choose one with `%config CodeInterpreter.model = "<name>"`.'
                )
            self._served_model = names[0]
        return self._served_model

    # -- one step -----------------------------------------------------------------------------------------

    def _system(self, request: TurnRequest) -> dict[str, Any]:
        extra = TEXT_CALL_INSTRUCTIONS if self._tools_off else TOOL_INSTRUCTIONS
        return {"role": "system", "content": f"{request.instructions.rstrip()}\n\n{extra}".lstrip()}

    def _tool_output_budget(self) -> int:
        # A quarter of what the context holds for the prompt, so one output never crowds out the rest.
        prompt_chars = (self.context_tokens - self.max_tokens - _TOOLS_TOKENS) * _CHARS_PER_TOKEN
        return max(_MIN_BUDGET, min(self._output_budget, prompt_chars // 4))

    def _request_options(self, profile: ServerProfile, number: int) -> dict[str, Any]:
        options: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self._tools_off:
            return options
        options["tools"] = [PYTHON_TOOL]
        choice = self._tool_choice or profile.tool_choice
        if choice in ("named", "required") and number > 1:
            # Forcing every step would never let the model answer: only the turn's first step is forced.
            # Where the server cannot leave the choice to the model (llama-cpp-python gets "none"), code
            # the model writes as a block is how it calls the tool again.
            choice = profile.after_forced
        param = tool_choice_param(choice, profile, TOOL_NAME)
        if param is not None:
            options["tool_choice"] = param
        return options

    async def _open_stream(
        self, request: TurnRequest, model: str, turn: _Turn, number: int
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        """Send the step's request, fitting it to the context; trim and retry once if it still overflows."""
        profile, _ = await self._identify()
        scale = 1.0
        tools_retried = False
        while True:
            system = self._system(request)
            budget = int((self.context_tokens - self.max_tokens - _TOOLS_TOKENS) * scale)
            messages = _fit(system, request.conversation.messages, turn.messages, budget)
            try:
                return await self._create(request, model, messages, self._request_options(profile, number))
            except _Overflow as overflow:
                if scale < 1.0:
                    raise _Refused(self._overflow_error(overflow)) from overflow
                # Trust the server's numbers over our estimate, with room to spare.
                told = overflow.context_tokens, overflow.prompt_tokens
                ratio = told[0] / told[1] if told[0] and told[1] else 0.5
                scale = max(0.2, min(0.6, ratio * 0.8))
                if overflow.context_tokens and not profile.context_tokens:
                    self._context_tokens = min(self._context_tokens, overflow.context_tokens)
            except _ToolsRefused as refused:
                if tools_retried or not self._text_tool_calls:
                    raise _Refused(refused.error) from refused
                tools_retried = True
                self._tools_off = True  # for this server, from now on

    async def _create(
        self, request: TurnRequest, model: str, messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        try:
            return await self._client.chat.completions.create(  # type: ignore[call-overload,no-any-return]
                model=model,
                messages=messages,  # type: ignore[arg-type]  # plain dicts, shaped like the params
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=request.extra_headers or None,
                **options,
            )
        except openai.APIStatusError as err:
            error = self._status_error(err, model)
            message = server_message(err)
            if _OVERFLOW.search(message) or _OVERFLOW.search(str(err.body)):
                numbers = dict(
                    (key, int(value)) for key, value in _NUMBER_AFTER.findall(json.dumps(err.body))
                )
                raise _Overflow(error, numbers.get("n_ctx"), numbers.get("n_prompt_tokens")) from err
            if err.status_code in (400, 422, 500) and _TOOLS_UNSUPPORTED.search(message):
                raise _ToolsRefused(error) from err
            raise _Refused(error) from err
        except openai.APIConnectionError as err:
            raise self._connection_error(err) from err
        except openai.APIError as err:
            raise BackendError(f"The model server at {self.shown_url} failed: {server_message(err)}") from err

    async def _stream_step(
        self, request: TurnRequest, model: str, turn: _Turn, step: _Step, *, number: int
    ) -> AsyncIterator[events.Event]:
        """Stream one completion into ``step``, yielding text and code events as they arrive."""
        tools_were_off = self._tools_off
        stream = await self._open_stream(request, model, turn, number)
        if number == 1:
            yield events.TurnStarted(response_id=None, model=model)
        if self._tools_off and not tools_were_off:
            yield events.Notice(
                f"The model server at {self.shown_url} does not take tools here; the model was asked to "
                "write code in ```python blocks instead, and those run as calls.",
                "warning",
            )
        scanner = TextCallScanner() if self._text_tool_calls else None
        try:
            async with stream:
                async for chunk in stream:
                    step.chunks += 1
                    for event in self._read_chunk(chunk, step, scanner, request.container_id):
                        yield event
                    if scanner is not None and scanner.done and step.text_call is not None:
                        break  # what follows a call written as text is the model inventing its output
        except openai.APIError as err:
            for event in _abandon(step):
                yield event
            if isinstance(err, openai.APIConnectionError):
                raise StreamError(
                    f"The connection to the model server at {self.shown_url} broke while the model was "
                    "answering; what arrived is shown above. Run the cell again to retry."
                ) from err
            raise BackendError(
                f"The model server at {self.shown_url} reported an error mid-answer: {server_message(err)}"
            ) from err
        if scanner is not None and not scanner.done and not step.calls:
            for event in self._text_pieces(scanner.finish(), step, request.container_id):
                yield event
        if step.segment:
            yield events.TextDone(step.segment)
            step.segment = ""
        if step.text_call is not None:
            call = step.text_call.text_call
            if call is not None and not call.closed and step.finish_reason == "length":
                # Cut off by max_tokens mid-block: the code is incomplete and must not run.
                if step.text_call.started:
                    yield events.CallStatus(step.text_call.call_id, "incomplete")
                step.text_call = None
                return
            step.finish_reason = step.finish_reason or "tool_calls"
            return
        if step.finish_reason is None:
            for event in _abandon(step):
                yield event
            if step.chunks == 0:
                raise StreamError(
                    f"The model server at {self.shown_url} answered with an empty body (HTTP 200, no data): "
                    "the server failed while answering; its log says why." + self._empty_body_hint()
                )
            raise StreamError(
                f"The model server at {self.shown_url} ended its answer before the model finished "
                "(the stream closed without a finish_reason); what arrived is shown above. "
                "Run the cell again."
            )

    def _empty_body_hint(self) -> str:
        profile = self._profile
        if profile is not None and profile.kind == "llama-cpp-python" and self._tool_choice == "auto":
            return (
                ' llama-cpp-python fails this way with tool_choice "auto" while streaming: use '
                '`%config CodeInterpreter.tool_choice = "named"`.'
            )
        return ""

    def _read_chunk(
        self, chunk: ChatCompletionChunk, step: _Step, scanner: TextCallScanner | None, container_id: str
    ) -> list[events.Event]:
        emitted: list[events.Event] = []
        if chunk.usage is not None:
            used = chunk.usage
            step.usage += events.Usage(
                used.prompt_tokens or 0, used.completion_tokens or 0, used.total_tokens or 0
            )
        for choice in chunk.choices:
            if choice.index not in (0, None):
                continue  # we ask for one choice; ignore any server that sends more
            delta = choice.delta
            thinking = _reasoning_of(delta)
            if thinking:
                step.thinking += len(thinking)
                emitted.append(events.ThinkingDelta(thinking))
            if delta.content:
                if step.text_call is not None and step.text_call.text_call is not None:
                    pass  # after a call written as text comes the model inventing its output
                elif scanner is not None and not scanner.done and not step.calls:
                    emitted += self._text_pieces(scanner.feed(delta.content), step, container_id)
                else:
                    emitted += _text(step, delta.content)
            calls: list[Any] = list(delta.tool_calls or ())
            if not calls and delta.function_call is not None and step.text_call is None:
                # The legacy single-call shape; servers that send both mean the same call.
                calls = [_LegacyCall(delta.function_call)]
            for call in calls:
                emitted += self._tool_call_delta(call, step, scanner, container_id)
            if choice.finish_reason:
                step.finish_reason = choice.finish_reason
        return emitted

    def _tool_call_delta(
        self, call: Any, step: _Step, scanner: TextCallScanner | None, container_id: str
    ) -> list[events.Event]:
        emitted: list[events.Event] = []
        if not step.calls and scanner is not None:
            # Text held back as a possible marker is plain text after all: a native call follows.
            emitted += _text(step, scanner.abandon()) if not scanner.done else []
        if step.segment:
            emitted.append(events.TextDone(step.segment))
            step.segment = ""
        draft = step.draft_for(getattr(call, "index", None), getattr(call, "id", None))
        function = call.function
        if function is not None and function.name:
            draft.add_name(function.name)
        if not draft.started and draft.name in (TOOL_NAME, ""):
            draft.started = True
            emitted.append(events.CallStarted(draft.call_id, container_id))
        if function is not None and function.arguments:
            draft.unsent += draft.decoder.feed(function.arguments)
        if draft.started and draft.unsent:
            emitted.append(events.CodeDelta(draft.call_id, draft.unsent))
            draft.unsent = ""
        return emitted

    def _text_pieces(self, pieces: list[Piece], step: _Step, container_id: str) -> list[events.Event]:
        emitted: list[events.Event] = []
        for piece in pieces:
            if piece.kind == "text":
                emitted += _text(step, piece.text)
                continue
            draft = step.text_call
            if draft is None:
                if step.segment:
                    emitted.append(events.TextDone(step.segment))
                    step.segment = ""
                draft = step.text_call = _DraftCall(-1, f"call_{uuid.uuid4().hex[:24]}")
            call = piece.call
            if not draft.started and (piece.kind == "open" or (call is not None and call.name == TOOL_NAME)):
                draft.started = True
                emitted.append(events.CallStarted(draft.call_id, container_id))
            if piece.kind == "code":
                emitted.append(events.CodeDelta(draft.call_id, piece.text))
            elif call is not None:
                draft.text_call = call
                draft.name = call.name
                step.text = call.raw
        return emitted

    # -- errors ---------------------------------------------------------------------------------------

    def _overflow_error(self, overflow: _Overflow) -> BackendError:
        size = overflow.context_tokens or self.context_tokens
        said = overflow.error.message.split(": ", 1)[-1]
        return BackendError(
            f"The conversation does not fit the model's context of {size} tokens, even after leaving out "
            f"older turns and cutting long outputs (the server said: {said}). "
            "Start a new conversation with `%%ci --new` or `%ci_reset`, shorten the prompt, or serve the "
            "model with a larger context (llama-server: -c 16384) and tell ci-magic with "
            "`%config CodeInterpreter.context_tokens = 16384` if the server does not report it.",
            status_code=overflow.error.status_code,
        )

    def _status_error(self, err: openai.APIStatusError, model: str) -> BackendError:
        status, message = err.status_code, server_message(err)
        where = f"The model server at {self.shown_url}"
        if status in (401, 403):
            text = (
                f"{where} refused the API key (HTTP {status}: {message}). "
                'Set the key it expects with `%config CodeInterpreter.model_api_key = "..."` '
                "(or the CI_MAGIC_MODEL_API_KEY environment variable)."
            )
        elif status == 404:
            text = (
                f"{where} answered HTTP 404: {message}. Check that it serves the model {model!r} "
                f"(GET {self.shown_url}/models lists them; choose with `%config CodeInterpreter.model`) and "
                "that model_base_url is its OpenAI-compatible root, usually ending in /v1."
            )
        elif _OVERFLOW.search(message):
            text = f"{where} found the request too long for the model's context (HTTP {status}: {message})."
        elif _TOOLS_UNSUPPORTED.search(message):
            text = (
                f"{where} does not take tool calls as configured (HTTP {status}: {message}). Serve the model "
                "with tool calling enabled (llama-server --jinja; vLLM --enable-auto-tool-choice "
                "--tool-call-parser ...; an Ollama model with tool support), or keep "
                "CodeInterpreter.text_tool_calls = True so code written as text runs."
            )
        elif status == 422 or "validation error" in message.lower():
            text = (
                f"{where} refused the shape of the request (HTTP {status}: {_first_line(message)}). "
                "This conversation's history was left unchanged; run the cell again, or start over with "
                "`%ci_reset`."
            )
        elif status == 400:
            text = f"{where} rejected the request (HTTP 400: {message})."
        elif status == 429:
            text = f"{where} is rate limiting requests (HTTP 429: {message}). Wait, then run the cell again."
        elif status >= 500:
            text = f"{where} failed (HTTP {status}: {message}), also on retry. Try again, or read its log."
        else:
            text = f"{where} answered HTTP {status}: {message}."
        return BackendError(text, status_code=status)

    def _connection_error(self, err: openai.APIConnectionError) -> BackendError:
        service = Service(
            f"the model server at {self.shown_url}",
            timeout_hint="Check that it is running and not overloaded, or point ci-magic at another one "
            f"with {_CONFIG_HINT}.",
            connect_hint=f"Start it, or point ci-magic at the right one with {_CONFIG_HINT}.",
        )
        return sdk_error(err, service, doing="sending the request")


@dataclass
class _LegacyCall:
    """A ``function_call`` delta, read as tool call 0."""

    function: Any
    index: int = 0
    id: str | None = None


def _repeats_code(step: _Step, ran: list[str]) -> str | None:
    """The call id of a call written as text whose code already ran in this turn, if it is one."""
    draft = step.text_call
    if draft is None or draft.text_call is None:
        return None
    code = draft.text_call.code.strip()
    return draft.call_id if code and any(code == earlier.strip() for earlier in ran) else None


def _text(step: _Step, text: str) -> list[events.Event]:
    step.text += text
    step.segment += text
    return [events.TextDelta(text)]


def _reasoning_of(delta: Any) -> str:
    """``reasoning_content`` (llama.cpp, vLLM, DeepSeek) or ``reasoning`` (Ollama, newer vLLM)."""
    for name in ("reasoning_content", "reasoning"):
        value = getattr(delta, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


def _thinking_note(step: _Step) -> str:
    return f"it only thought, {step.thinking} characters; " if step.thinking else ""


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:300]


def _tokens(message: dict[str, Any]) -> int:
    size = len(str(message.get("content") or ""))
    for call in message.get("tool_calls") or ():
        size += len(call["function"]["arguments"]) + 40
    return size // _CHARS_PER_TOKEN + 8


def _cut(message: dict[str, Any], chars: int) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str) and len(content) > chars:
        return {**message, "content": _truncate(content, max(chars, _MIN_BUDGET))}
    return message


def _fit(
    system: dict[str, Any], history: list[dict[str, Any]], current: list[dict[str, Any]], budget: int
) -> list[dict[str, Any]]:
    """The messages to send within ``budget`` tokens: this turn whole if it can be, then recent turns.

    Older turns go first, whole (a turn starts at a user message, so no tool reply is ever parted from
    its call); long contents are cut before a turn is dropped; this turn's prompt is never cut.
    """
    budget = max(budget, 256)
    used = _tokens(system)
    messages = list(current)
    if used + sum(map(_tokens, messages)) > budget:
        # This turn alone is too long: cut its earlier steps' outputs and texts, evenly.
        later = len(messages) - 1
        room = max((budget - used - _tokens(messages[0])) * _CHARS_PER_TOKEN // max(later, 1), _MIN_BUDGET)
        messages = [messages[0], *(_cut(m, room) for m in messages[1:])]
    used += sum(map(_tokens, messages))
    per_message = max(budget * _CHARS_PER_TOKEN // 8, _MIN_BUDGET)
    starts = [i for i, m in enumerate(history) if m.get("role") == "user"]
    kept: list[dict[str, Any]] = []
    for start, end in reversed(list(zip(starts, [*starts[1:], len(history)][: len(starts)], strict=True))):
        older = [_cut(m, per_message) for m in history[start:end]]
        cost = sum(map(_tokens, older))
        if used + cost > budget:
            break
        kept[:0] = older
        used += cost
    return [system, *kept, *messages]


def _abandon(step: _Step) -> list[events.Event]:
    """Close what a broken stream left open: calls whose code never finished arriving."""
    drafts = [*step.calls.values(), *([step.text_call] if step.text_call else [])]
    return [events.CallStatus(d.call_id, "incomplete") for d in drafts if d.started]
