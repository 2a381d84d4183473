"""Code the model wrote as text instead of calling the tool, found while the text streams.

A model (or a server) without tool-call parsing sends its call in the answer's text, in one of two
shapes:

- a fenced block: ```` ```python\\n<code>\\n``` ```` (also ```` ```py ````, ```` ```python3 ````);
- Hermes-style: ``<tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>``.

:class:`TextCallScanner` is fed the text deltas and returns :class:`Piece` s: plain text to show,
the code of a fenced block as it arrives, and the finished call. Text that could still become an
opening marker (a trailing ````` `` ````` or ``<tool_c``) is held back until the next delta decides.
After a finished call the rest of the answer is not the model's to write (it usually invents the
output), so the caller stops reading the stream.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Literal

from ci_magic.backends.local.partial_json import CodeArgumentDecoder, ToolArgumentsError

__all__ = ["Piece", "Shape", "TextCall", "TextCallScanner", "reply_in_shape"]

Shape = Literal["fence", "hermes"]

_LANGS = "(?:python3|python|py)"
# An opening fence starts a line: at the start of the text or after a newline.
_FENCE_OPEN = re.compile(r"(?:\A|(?<=\n))[ \t]{0,3}```[ \t]*" + _LANGS + r"[ \t]*\n")
_FENCE_OPEN_PREFIX = re.compile(
    r"[ \t]{0,3}(?:`{1,3}|```[ \t]*(?:p|py|pyt|pyth|pytho|python|python3)?[ \t]*)\Z"
)
_FENCE_CLOSE = re.compile(r"(?:\A|\n)[ \t]{0,3}```[ \t]*(?=\n|\Z)")
_FENCE_CLOSE_PREFIX = re.compile(r"(?:\A|\n)[ \t]{0,3}`{0,3}[ \t]*\Z")
_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class TextCall:
    """A finished call written as text. ``error`` (for the model to read) when it is unusable."""

    shape: Shape
    code: str
    raw: str  # the model's text up to and including the call, as it goes back into history
    name: str = "python"
    error: str | None = None
    closed: bool = True  # False: the text ended before the closing marker


@dataclass(frozen=True)
class Piece:
    kind: Literal["text", "open", "code", "call"]
    text: str = ""
    call: TextCall | None = None


class TextCallScanner:
    """Feed text deltas; get back what to show and, once, the call the text contained."""

    def __init__(self, *, fences: bool = True) -> None:
        self._fences = fences
        self._mode: Literal["text", "fence", "hermes", "done"] = "text"
        self._pending = ""  # received, not yet released
        self._line_start = True  # ``_pending`` starts a line
        self._released: list[str] = []  # everything released as text or consumed by a call
        self._code: list[str] = []

    @property
    def done(self) -> bool:
        return self._mode == "done"

    def feed(self, delta: str) -> list[Piece]:
        if self._mode == "done":
            return []
        self._pending += delta
        return self._scan(final=False)

    def abandon(self) -> str:
        """Stop scanning (a native tool call arrived); the text held back, as plain text."""
        held, self._pending = self._pending, ""
        self._mode = "done"
        return held

    def finish(self) -> list[Piece]:
        """The stream ended: release what was held back; a call left open ends here."""
        if self._mode == "done":
            return []
        return self._scan(final=True)

    # -- scanning ------------------------------------------------------------------------------------

    def _scan(self, *, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while self._pending or final:
            before = (self._mode, len(self._pending))
            if self._mode == "text":
                self._scan_text(pieces, final)
            elif self._mode == "fence":
                self._scan_fence(pieces, final)
            elif self._mode == "hermes":
                self._scan_hermes(pieces, final)
            if self._mode == "done" or (self._mode, len(self._pending)) == before:
                break
        return pieces

    def _release_text(self, count: int, pieces: list[Piece]) -> None:
        if count <= 0:
            return
        text, self._pending = self._pending[:count], self._pending[count:]
        self._line_start = text.endswith("\n")
        self._released.append(text)
        if pieces and pieces[-1].kind == "text":
            pieces[-1] = Piece("text", pieces[-1].text + text)
        else:
            pieces.append(Piece("text", text))

    def _consume(self, count: int) -> str:
        taken, self._pending = self._pending[:count], self._pending[count:]
        self._released.append(taken)
        return taken

    def _scan_text(self, pieces: list[Piece], final: bool) -> None:
        text = self._pending
        starts: list[tuple[int, int, str]] = []  # (start, end of marker, mode)
        if self._fences:
            for match in _FENCE_OPEN.finditer(text):
                if match.start() > 0 or self._line_start:
                    starts.append((match.start(), match.end(), "fence"))
                    break
        hermes = text.find(_HERMES_OPEN)
        if hermes >= 0:
            starts.append((hermes, hermes + len(_HERMES_OPEN), "hermes"))
        if starts:
            start, end, mode = min(starts)
            self._release_text(start, pieces)
            self._consume(end - start)
            self._mode = "fence" if mode == "fence" else "hermes"
            self._code = []
            if mode == "fence":
                pieces.append(Piece("open"))
            return
        if final:
            self._release_text(len(text), pieces)
            self._mode = "done"
            return
        self._release_text(len(text) - self._held_back(text), pieces)

    def _held_back(self, text: str) -> int:
        """How many trailing characters could still begin an opening marker."""
        held = 0
        for size in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(_HERMES_OPEN[:size]):
                held = size
                break
        if self._fences:
            line = text.rfind("\n") + 1
            if (line > 0 or self._line_start) and _FENCE_OPEN_PREFIX.fullmatch(text[line:]):
                held = max(held, len(text) - line)
        return held

    def _scan_fence(self, pieces: list[Piece], final: bool) -> None:
        text = self._pending
        line_start = not self._code or self._code[-1].endswith("\n")
        for close in _FENCE_CLOSE.finditer(text):
            if close.start() == 0 and not text.startswith("\n") and not line_start:
                continue  # ``` in the middle of a line of code
            if close.end() == len(text) and not final:
                break  # "```" at the end so far: it may go on as "```bash"; wait
            self._emit_code(text[: close.start()], pieces)
            self._consume(close.end() + (1 if text[close.end() : close.end() + 1] == "\n" else 0))
            self._finish_fence(pieces, closed=True)
            return
        if final:
            self._emit_code(self._consume(len(text)), pieces)
            self._finish_fence(pieces, closed=False)
            return
        tail = _FENCE_CLOSE_PREFIX.search(text)
        keep = (
            len(text) - tail.start()
            if tail and (tail.start() > 0 or text.startswith("\n") or line_start)
            else 0
        )
        self._emit_code(self._consume(len(text) - keep), pieces)

    def _emit_code(self, code: str, pieces: list[Piece]) -> None:
        if code:
            self._code.append(code)
            pieces.append(Piece("code", code))

    def _finish_fence(self, pieces: list[Piece], *, closed: bool) -> None:
        code = "".join(self._code)
        error = None if code.strip() else "The ```python block was empty; put the code to run inside it."
        raw = "".join(self._released).rstrip()
        pieces.append(Piece("call", call=TextCall("fence", code, raw, error=error, closed=closed)))
        self._mode = "done"

    def _scan_hermes(self, pieces: list[Piece], final: bool) -> None:
        text = self._pending
        close = text.find(_HERMES_CLOSE)
        if close < 0 and not final:
            return  # the JSON is short: wait for all of it
        body = text[:close] if close >= 0 else text
        self._consume(close + len(_HERMES_CLOSE) if close >= 0 else len(text))
        call = _hermes_call(body, "".join(self._released).rstrip())
        if close < 0:
            call = dataclasses.replace(call, closed=False)
        pieces.append(Piece("call", call=call))
        self._mode = "done"


def _hermes_call(body: str, raw: str) -> TextCall:
    try:
        value = json.loads(body, strict=False)
    except json.JSONDecodeError as err:
        reason = (
            f"The <tool_call> was not valid JSON ({err.msg} at character {err.pos}). Write "
            '<tool_call>{"name": "python", "arguments": {"code": "<python source>"}}</tool_call>.'
        )
        return TextCall("hermes", "", raw, error=reason)
    if not isinstance(value, dict):
        value = {}
    name = value.get("name")
    name = name if isinstance(name, str) else "python"
    arguments = value.get("arguments", value.get("parameters", {}))
    decoder = CodeArgumentDecoder()
    decoder.feed(arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
    try:
        code = decoder.finish()
    except ToolArgumentsError as err:
        return TextCall("hermes", "", raw, name=name, error=str(err))
    return TextCall("hermes", code, raw, name=name)


def reply_in_shape(shape: Shape, output: str) -> str:
    """The call's result told back the way the model wrote the call (a user message)."""
    if shape == "hermes":
        return f"<tool_response>\n{output}\n</tool_response>"
    return f"The ```python block ran. Its output:\n```\n{output}\n```"
