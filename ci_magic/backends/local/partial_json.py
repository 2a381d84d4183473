"""Incremental decoding of the ``python`` tool's arguments, so code streams while the model writes it.

Chat Completions servers stream a tool call's ``arguments`` as fragments of a JSON text such as
``{"code": "import pandas as pd\\nprint(\\"hi\\")"}``, split anywhere: inside an escape, between the two
halves of a surrogate pair, inside the key. :class:`CodeArgumentDecoder` turns each fragment into the
characters of the ``code`` value it completes, holding back half-read escapes, and ``finish()`` parses
the whole text with :func:`json.loads`, which stays the authority on the final code.

Three shapes are accepted, chosen by the first non-blank character:

- ``{`` a JSON object; its ``code`` string is streamed, whatever the key order or whitespace;
- ``"`` a bare JSON string (the code itself, JSON-encoded);
- anything else: the plain code (a few servers send the code unwrapped), streamed verbatim.
"""

from __future__ import annotations

import enum
import json
import re

__all__ = ["CodeArgumentDecoder", "ToolArgumentsError"]

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_STRING_SPECIAL = re.compile(r'["\\]')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")


class ToolArgumentsError(ValueError):
    """The arguments are not a usable ``python`` call; the message is written for the model to read."""


class _StringReader:
    """Decodes the inside of one JSON string, resuming across fragments.

    Matches :func:`json.loads`: ``\\uD83D\\uDE00`` becomes one character, a lone surrogate stays
    lone. A high surrogate is held back until the next character shows whether it pairs.
    """

    def __init__(self) -> None:
        self._escape: str | None = None  # "\\", "\\u", "\\u00"... while an escape is incomplete
        self._high: str | None = None

    def read(self, text: str, pos: int) -> tuple[str, int, bool]:
        """Decode from ``text[pos:]``; return (decoded, next position, whether the string closed)."""
        out: list[str] = []
        end = len(text)
        while pos < end:
            if self._escape is not None:
                pos = self._continue_escape(text, pos, out)
                continue
            match = _STRING_SPECIAL.search(text, pos)
            stop = match.start() if match else end
            if stop > pos:
                self._emit(text[pos:stop], out)
                pos = stop
            if match is None:
                break
            pos += 1
            if match.group() == '"':
                self._flush(out)
                return "".join(out), pos, True
            self._escape = "\\"
        return "".join(out), pos, False

    def _continue_escape(self, text: str, pos: int, out: list[str]) -> int:
        assert self._escape is not None
        if self._escape == "\\":
            char = text[pos]
            if char == "u":
                self._escape = "\\u"
                return pos + 1
            self._escape = None
            # An unknown escape is invalid JSON: show the character now, finish() reports the error.
            self._emit(_SIMPLE_ESCAPES.get(char, char), out)
            return pos + 1
        take = min(6 - len(self._escape), len(text) - pos)
        self._escape += text[pos : pos + take]
        pos += take
        if len(self._escape) == 6:
            digits, self._escape = self._escape[2:], None
            if _HEX4.fullmatch(digits):
                self._emit_code_point(int(digits, 16), out)
            else:
                self._emit("\\u" + digits, out)
        return pos

    def _emit_code_point(self, point: int, out: list[str]) -> None:
        if 0xD800 <= point <= 0xDBFF:
            self._flush(out)
            self._high = chr(point)
        elif 0xDC00 <= point <= 0xDFFF and self._high is not None:
            high, self._high = ord(self._high), None
            out.append(chr(0x10000 + ((high - 0xD800) << 10) + (point - 0xDC00)))
        else:
            self._emit(chr(point), out)

    def _emit(self, chars: str, out: list[str]) -> None:
        self._flush(out)
        out.append(chars)

    def _flush(self, out: list[str]) -> None:
        if self._high is not None:
            out.append(self._high)
            self._high = None


class _State(enum.Enum):
    START = "start"  # before the first non-blank character
    RAW = "raw"  # plain code, not JSON
    TOP_STRING = "top string"  # a bare JSON string
    EXPECT_KEY = "expect key"  # after "{" or ","
    KEY = "key"
    COLON = "colon"
    VALUE = "value"  # after ":", before the value starts
    STRING_VALUE = "string value"
    OTHER_VALUE = "other value"  # a number, literal, array or object we skip
    AFTER_VALUE = "after value"
    END = "end"


class CodeArgumentDecoder:
    """Feed argument fragments as they arrive; get back the new characters of the code.

    ``"".join(feed(f) for f in fragments)`` equals ``finish()`` whenever the arguments are a JSON
    object with one ``code`` string, a bare JSON string, or plain code.
    """

    def __init__(self, key: str = "code") -> None:
        self._key = key
        self._parts: list[str] = []
        self._state = _State.START
        self._reader = _StringReader()
        self._key_chars: list[str] = []
        self._streaming_key = False  # the string value being read belongs to ``key``
        self._streamed_key = False  # only the first ``key`` streams; json.loads decides duplicates
        self._depth = 0  # nesting inside a skipped array/object value
        self._skip_in_string = False
        self._skip_escape = False

    @property
    def text(self) -> str:
        """Everything fed so far, as received."""
        return "".join(self._parts)

    def feed(self, fragment: str) -> str:
        self._parts.append(fragment)
        out: list[str] = []
        pos = 0
        while pos < len(fragment):
            pos = self._step(fragment, pos, out)
        return "".join(out)

    def finish(self) -> str:
        """The code, parsed from the whole text; raises :class:`ToolArgumentsError` if unusable."""
        text = self.text
        stripped = text.strip()
        if not stripped:
            raise ToolArgumentsError(
                'The python tool was called without code; send {"code": "<python source>"}.'
            )
        if not stripped.startswith(("{", '"')):
            return text
        try:
            # strict=False: some local models put raw newlines and tabs inside the JSON string.
            value = json.loads(stripped, strict=False)
        except json.JSONDecodeError as err:
            raise ToolArgumentsError(
                f"The python tool's arguments are not valid JSON ({err.msg} at character {err.pos}). "
                'Call it again with {"code": "<python source>"}.'
            ) from err
        if isinstance(value, str):
            return value
        code = value.get(self._key) if isinstance(value, dict) else None
        if not isinstance(code, str):
            keys = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise ToolArgumentsError(
                f'The python tool takes one argument, "{self._key}" (a string of Python source); '
                f'got {keys or "nothing"}. Call it again with {{"{self._key}": "<python source>"}}.'
            )
        return code

    def _step(self, text: str, pos: int, out: list[str]) -> int:
        """Consume some of ``text`` from ``pos`` in the current state; return the new position."""
        state = self._state
        if state is _State.RAW:
            out.append(text[pos:])
            return len(text)
        if state in (_State.TOP_STRING, _State.KEY, _State.STRING_VALUE):
            return self._read_string(text, pos, out)
        if state is _State.OTHER_VALUE:
            return self._skip_value(text, pos)
        char = text[pos]
        if char.isspace() and state is not _State.START:
            return pos + 1
        if state is _State.START:
            if char.isspace():
                return pos + 1
            if char == "{":
                self._state = _State.EXPECT_KEY
            elif char == '"':
                self._state = _State.TOP_STRING
            else:
                # Plain code: replay the blank prefix we held back, then pass everything through.
                self._state = _State.RAW
                out.append(self.text[: len(self.text) - len(text) + pos])
                return pos
        elif state is _State.EXPECT_KEY:
            if char == '"':
                self._state, self._key_chars = _State.KEY, []
            elif char == "}":
                self._state = _State.END
        elif state is _State.COLON:
            if char == ":":
                self._state = _State.VALUE
        elif state is _State.VALUE:
            if char == '"':
                self._state = _State.STRING_VALUE
                self._streaming_key = "".join(self._key_chars) == self._key and not self._streamed_key
                self._streamed_key = self._streamed_key or self._streaming_key
            else:
                self._state, self._depth = _State.OTHER_VALUE, 0
                return pos
        elif state is _State.AFTER_VALUE:
            if char == ",":
                self._state = _State.EXPECT_KEY
            elif char == "}":
                self._state = _State.END
        # END, and stray characters elsewhere, are left for finish() to judge.
        return pos + 1

    def _read_string(self, text: str, pos: int, out: list[str]) -> int:
        decoded, pos, closed = self._reader.read(text, pos)
        state = self._state
        if state is _State.KEY:
            self._key_chars.append(decoded)
        elif state is _State.TOP_STRING or self._streaming_key:
            out.append(decoded)
        if closed:
            self._state = {
                _State.KEY: _State.COLON,
                _State.STRING_VALUE: _State.AFTER_VALUE,
                _State.TOP_STRING: _State.END,
            }[state]
            self._streaming_key = False
        return pos

    def _skip_value(self, text: str, pos: int) -> int:
        """Skip a non-string value (number, literal, nested array or object) of another key."""
        while pos < len(text):
            char = text[pos]
            if self._skip_in_string:
                if self._skip_escape:
                    self._skip_escape = False
                elif char == "\\":
                    self._skip_escape = True
                elif char == '"':
                    self._skip_in_string = False
            elif char == '"':
                self._skip_in_string = True
            elif char in "[{":
                self._depth += 1
            elif char in "]}":
                if self._depth == 0:
                    self._state = _State.AFTER_VALUE
                    return pos  # the object's own "}" is handled in AFTER_VALUE
                self._depth -= 1
            elif char == "," and self._depth == 0:
                self._state = _State.AFTER_VALUE
                return pos
            pos += 1
        return pos
