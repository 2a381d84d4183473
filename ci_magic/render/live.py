"""The view of one turn: events in, throttled display updates out, plain final outputs at the end.

Layout (each item is one display, in the order it first appeared)::

    status line            writing code (call 2) · 4 s   ->   done in 9.1 s · 2 calls · 7,670 tokens
    call block             code (highlighted), logs (collapsed past 20 lines), errors, plain results
    image / rich output    one display per plt.show() image or rich (HTML, JSON...) output
    answer                 the assistant's Markdown (raw HTML escaped); one display per text segment
    notices                one line each
    files                  previews from render/files.py (images already shown are only listed)

``handle`` only records the event and marks what changed (appending a delta is O(1)); rendering
(highlighting, Markdown) happens in ``_flush``, which runs at most ``max_updates_per_second``
times a second counted in frontend messages, so a fast stream of deltas costs a bounded number of
display updates. ``--quiet`` shows nothing until ``finish``, which then shows final outputs only,
the code collapsed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from ci_magic.events import (
    CallStarted,
    CallStatus,
    CallStatusName,
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
)
from ci_magic.render.files import file_bundle, human_size, link_bundle, relative_path
from ci_magic.render.frontend import Frontend, MimeBundle, Slot, SlotRole
from ci_magic.render.safe_html import (
    DISPLAYED_MIMES,
    escape,
    escape_markdown,
    markdown_to_html,
    safe_bundle,
    strip_ansi,
)
from ci_magic.result import Result, SavedFile

__all__ = ["TurnView"]

LOG_COLLAPSE_LINES = 20
LOG_MAX_CHARS = 200_000
# stripnl=False: chunks highlighted separately must keep their blank lines to join back exactly.
_LEXER = PythonLexer(stripnl=False)
_FORMATTER = HtmlFormatter(nowrap=True, noclasses=True, style="default")
# A line starting at column 0 with code: the lexer is back in its root state there, unless a
# triple-quoted string is open (checked by counting quotes before it).
_TOP_LEVEL_LINE = re.compile(r"\n(?=[A-Za-z_@])")
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif"})
_BLOCK_STYLE = "border-left:3px solid #8fb3de;padding:2px 0 2px 10px;margin:6px 0"
_CODE_STYLE = (
    "background:#f6f8fa;color:#1f2328;border-radius:4px;padding:6px 8px;margin:2px 0;"
    "overflow-x:auto;font-size:12.5px;line-height:1.35"
)
_PRE_STYLE = "margin:2px 0;padding:4px 8px;white-space:pre-wrap;font-size:12.5px;background:none"
_SMALL = "font-size:0.85em;color:#777"
_CALL_LABELS: dict[str, str] = {
    "writing": "writing",
    "running": "running",
    "interpreting": "running",
    "completed": "done",
    "failed": "failed",
    "incomplete": "incomplete",
}


# -- pieces: one display each ------------------------------------------------------------------------


class _Piece:
    role: ClassVar[SlotRole] = "output"

    def __init__(self, index: int) -> None:
        self.index = index
        self.slot: Slot | None = None
        self.dirty = False

    def bundle(self) -> MimeBundle:
        raise NotImplementedError


class _Status(_Piece):
    role: ClassVar[SlotRole] = "status"

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.phase = "starting"
        self.key: tuple[str, int] | None = None  # (phase, whole seconds) last rendered
        self.text = ""
        self.failed = False

    def bundle(self) -> MimeBundle:
        color = "#b00020" if self.failed else "#666"
        return {
            "text/html": f'<div style="font-size:0.85em;color:{color}">ci · {escape(self.text)}</div>',
            "text/plain": f"ci: {self.text}",
        }


class _Logs:
    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return _clean_logs(self.parts[0]) if self.parts else ""


@dataclasses.dataclass
class _Plain:
    """A rich output with nothing but text (an expression's value): shown with the logs."""

    text: str


_Item = _Logs | _Plain | ExecutionError


class _Highlighter:
    """Highlights growing code, re-lexing only what follows the last top-level statement boundary.

    Highlighting the whole code at every flush would cost O(length) each time (a 200-line script
    is ~25 ms in Pygments); chunks before a root-state boundary are final and cached.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.source = ""  # the prefix whose HTML is final
        self.html = ""
        self.open_quotes = (0, 0)  # parity of """ and ''' in source
        self.tail = ("", "")  # (source, html) of the rest, as last highlighted

    def __call__(self, code: str) -> str:
        if not code.startswith(self.source):
            self._reset()  # the code was replaced (CodeDone differs): start over
        rest = code[len(self.source) :]
        boundary, quotes = self._last_boundary(rest)
        if boundary:
            self.html += highlight(rest[:boundary], _LEXER, _FORMATTER)
            self.source += rest[:boundary]
            self.open_quotes = quotes
            rest = rest[boundary:]
        if self.tail[0] != rest:
            self.tail = (rest, highlight(rest, _LEXER, _FORMATTER) if rest else "")
        return self.html + self.tail[1]

    def _last_boundary(self, rest: str) -> tuple[int, tuple[int, int]]:
        """Where the last chunk that can be highlighted on its own ends (0: none), and the quote parity."""
        double, single = self.open_quotes
        found, found_quotes, start = 0, self.open_quotes, 0
        for match in _TOP_LEVEL_LINE.finditer(rest):
            end = match.start() + 1
            double = (double + rest.count('"""', start, end)) % 2
            single = (single + rest.count("'''", start, end)) % 2
            start = end
            if not double and not single:
                found, found_quotes = end, (double, single)
        return found, found_quotes


class _Block(_Piece):
    """One code interpreter call: its code as it streams, then what running it printed."""

    role: ClassVar[SlotRole] = "stream"

    def __init__(self, index: int, number: int, call_id: str) -> None:
        super().__init__(index)
        self.number = number
        self.call_id = call_id
        self.parts: list[str] = []
        self.done_code: str | None = None  # CodeDone: authoritative
        self.status: CallStatusName = "writing"
        self.items: list[_Item] = []
        self._highlight = _Highlighter()

    def code(self) -> str:
        if self.done_code is not None:
            return self.done_code
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def code_html(self) -> str:
        code = self.code().replace("\r\n", "\n").rstrip("\n")
        return f'<pre style="{_CODE_STYLE}">{self._highlight(code)}</pre>'

    def items_html(self) -> str:
        return "".join(_item_html(item) for item in self.items)

    def plain(self) -> str:
        text = f"── call {self.number} {'─' * 30}\n" + self.code().replace("\r\n", "\n").rstrip("\n")
        if self.done_code is not None or self.status != "writing" or self.items:
            # Only a finished code ends its last line: a terminal prints complete lines only.
            text += "\n" + "".join(_item_plain(item) + "\n" for item in self.items)
        return text

    def bundle(self) -> MimeBundle:
        label = _CALL_LABELS.get(self.status, self.status)
        color = "#b00020" if self.status == "failed" else "#777"
        header = f'<div style="font-size:0.85em;color:{color}">call {self.number} · {escape(label)}</div>'
        return {
            "text/html": f'<div style="{_BLOCK_STYLE}">{header}{self.code_html()}{self.items_html()}</div>',
            "text/plain": self.plain(),
        }


class _ImageOut(_Piece):
    def __init__(self, index: int, data: bytes, mime: str) -> None:
        super().__init__(index)
        self.data = data
        self.mime = mime
        self._bundle: MimeBundle | None = None

    def bundle(self) -> MimeBundle:
        if self._bundle is None:
            svg = self.mime == "image/svg+xml"
            payload: bytes | str = self.data.decode("utf-8", "replace") if svg else self.data
            plain = f"[{_describe_image(self.data, self.mime)}]"
            self._bundle = safe_bundle({self.mime: payload, "text/plain": plain})
        return self._bundle


class _RichOut(_Piece):
    """A sandbox display; sanitized when drawn, so a burst of updates costs one sanitizing pass."""

    def __init__(self, index: int, raw: dict[str, object]) -> None:
        super().__init__(index)
        self.raw = raw
        self._safe: tuple[dict[str, object], MimeBundle] | None = None

    def bundle(self) -> MimeBundle:
        if self._safe is None or self._safe[0] is not self.raw:
            self._safe = (self.raw, safe_bundle(self.raw))
        return self._safe[1]


class _Text(_Piece):
    """One segment of the assistant's answer."""

    role: ClassVar[SlotRole] = "text"

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.parts: list[str] = []
        self.done: str | None = None  # TextDone (or the final text with local links)
        self.closed = False

    def text(self) -> str:
        if self.done is not None:
            return self.done
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def bundle(self) -> MimeBundle:
        text = self.text()
        return {
            "text/markdown": escape_markdown(text),
            "text/html": f"<div>{markdown_to_html(text)}</div>",
            "text/plain": strip_ansi(text),
        }


class _Notices(_Piece):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.notices: list[Notice] = []

    def bundle(self) -> MimeBundle:
        rows = [(n.level, " ".join(strip_ansi(n.text).split())) for n in self.notices]
        colors = {"warning": "#8a5300", "info": "#555"}
        return {
            "text/html": "".join(
                f'<div style="font-size:0.9em;color:{colors[level]}">{level}: {escape(text)}</div>'
                for level, text in rows
            ),
            "text/plain": "\n".join(f"{level}: {text}" for level, text in rows),
        }


class _Fixed(_Piece):
    """A final bundle computed once (a file preview, the quiet code summary)."""

    def __init__(self, index: int, bundle: MimeBundle) -> None:
        super().__init__(index)
        self._bundle = bundle

    def bundle(self) -> MimeBundle:
        return self._bundle


# -- the view ----------------------------------------------------------------------------------------


class TurnView:
    """Turns one turn's events into displays on ``frontend``: live while streaming, final at the end."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        quiet: bool = False,
        max_updates_per_second: float = 12.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._frontend = frontend
        self._quiet = quiet
        self._interval = 1.0 / max_updates_per_second if max_updates_per_second > 0 else 0.0
        self._clock = clock
        self._start = clock()
        self._next_flush = self._start
        self._finished = False
        self._pieces: list[_Piece] = []
        self._dirty: list[_Piece] = []
        self._status = self._add(_Status)
        self._blocks: dict[str, _Block] = {}
        self._current_block: _Block | None = None
        self._text: _Text | None = None
        self._notices: _Notices | None = None
        self._rich: dict[str, list[_RichOut]] = {}
        self._handlers: dict[type, Callable[[Any], None]] = {
            TurnStarted: self._on_turn_started,
            CallStarted: self._on_call_started,
            CodeDelta: self._on_code_delta,
            CodeDone: self._on_code_done,
            CallStatus: self._on_call_status,
            Logs: self._on_logs,
            Image: self._on_image,
            RichOutput: self._on_rich,
            ExecutionError: self._on_error,
            TextDelta: self._on_text_delta,
            TextDone: self._on_text_done,
            FileCited: _ignore,  # shown through the files and the answer's links at the end
            Notice: self._on_notice,
            Completed: self._on_completed,
            Failed: self._on_failed,
        }

    # -- public ------------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Record one event; redraw only if the update budget allows (``tick`` catches up later)."""
        if self._quiet or self._finished:
            return  # quiet mode renders from the Result alone
        # An event type newer than this view is recorded in the Result, just not drawn live.
        self._handlers.get(type(event), _ignore)(event)
        now = self._clock()
        if now >= self._next_flush:
            self._flush(now)

    def tick(self) -> None:
        """Keep the elapsed time current and send what the budget held back (call every ~100 ms)."""
        if self._quiet or self._finished:
            return
        now = self._clock()
        if now >= self._next_flush:
            self._flush(now)

    def finish(self, result: Result, *, link_base: Path | None = None) -> None:
        """Bring every display to its final, persistent state and show notices and files."""
        if self._finished:
            return
        self._finished = True
        link_base = link_base if link_base is not None else Path.cwd()
        self._reconcile(result)
        shown_images = self._shown_images()
        if result.notices:
            self._notice_piece().notices = list(result.notices)
        if self._quiet:
            shown: list[_Piece] = [self._quiet_summary()] if self._blocks else []
            shown += [p for p in self._pieces if isinstance(p, (_ImageOut, _RichOut))]
            if result.text.strip():
                answer = _Text(-1)
                answer.done = result.text_with_local_links(link_base)
                shown.append(answer)
            if self._notices is not None:
                shown.append(self._notices)
        else:
            texts = [p for p in self._pieces if isinstance(p, _Text)]
            for text in texts:
                text.done = _local_links(text.text(), result, link_base)
            if not texts and result.text.strip():
                self._add(_Text).done = result.text_with_local_links(link_base)
            shown = [p for p in self._pieces if p is not self._status]
        shown += self._file_pieces(result, link_base, shown_images)
        self._status.text = self._final_status(result)
        self._status.failed = result.error is not None
        if self._status.slot is None:
            self._status.slot = self._frontend.open(self._status.bundle(), role="status")
        for piece in shown:
            self._send(piece, final=True)
        self._send(self._status, final=True)
        self._dirty.clear()

    # -- events ------------------------------------------------------------------------------------

    def _on_turn_started(self, event: TurnStarted) -> None:
        self._set_phase(f"waiting for {event.model}" if event.model else "waiting for the model")

    def _on_call_started(self, event: CallStarted) -> None:
        self._block(event.call_id)

    def _on_code_delta(self, event: CodeDelta) -> None:
        block = self._block(event.call_id)
        block.parts.append(event.delta)
        self._mark(block)

    def _on_code_done(self, event: CodeDone) -> None:
        block = self._block(event.call_id)
        block.done_code = event.code
        self._mark(block)

    def _on_call_status(self, event: CallStatus) -> None:
        block = self._block(event.call_id)
        block.status = event.status
        if event.status in ("running", "interpreting"):
            self._set_phase(f"running call {block.number}")
        elif event.status != "writing":
            self._set_phase("reading results")
        self._mark(block)

    def _on_logs(self, event: Logs) -> None:
        block = self._block(event.call_id)
        last = block.items[-1] if block.items else None
        if not (isinstance(last, _Logs) and last.stream == event.stream):
            last = _Logs(event.stream)
            block.items.append(last)
        last.parts.append(event.text)
        self._mark(block)

    def _on_image(self, event: Image) -> None:
        self._block(event.call_id)
        self._add(_ImageOut, event.data, event.mime)

    def _on_rich(self, event: RichOutput) -> None:
        block = self._block(event.call_id)
        if event.update and event.display_id is not None:
            for piece in self._rich.get(event.display_id, []):
                piece.raw = event.bundle
                self._mark(piece)
            return
        if event.bundle.keys().isdisjoint(DISPLAYED_MIMES):
            plain = event.bundle.get("text/plain")
            block.items.append(_Plain(strip_ansi(plain) if isinstance(plain, str) else "[display output]"))
            self._mark(block)
            return
        piece = self._add(_RichOut, event.bundle)
        if event.display_id is not None:
            self._rich.setdefault(event.display_id, []).append(piece)

    def _on_error(self, event: ExecutionError) -> None:
        block = self._block(event.call_id)
        block.items.append(event)
        self._mark(block)

    def _on_text_delta(self, event: TextDelta) -> None:
        text = self._text
        if text is None or text.closed:
            text = self._text = self._add(_Text)
            self._set_phase("writing the answer")
        text.parts.append(event.delta)
        self._mark(text)

    def _on_text_done(self, event: TextDone) -> None:
        text = self._text if self._text is not None and not self._text.closed else self._add(_Text)
        text.done = event.text
        text.closed = True
        self._mark(text)

    def _on_notice(self, event: Notice) -> None:
        notices = self._notice_piece()
        notices.notices.append(event)
        self._mark(notices)

    def _on_completed(self, event: Completed) -> None:
        self._set_phase("saving files")

    def _on_failed(self, event: Failed) -> None:
        self._set_phase("stopped")

    # -- state -------------------------------------------------------------------------------------

    def _add(self, kind: type, *args: object) -> _Piece:
        piece = kind(len(self._pieces), *args)
        self._pieces.append(piece)
        self._mark(piece)
        return piece

    def _mark(self, piece: _Piece) -> None:
        if not piece.dirty:
            piece.dirty = True
            self._dirty.append(piece)

    def _block(self, call_id: str) -> _Block:
        block = self._blocks.get(call_id)
        if block is None:
            block = self._add(_Block, len(self._blocks) + 1, call_id)
            self._blocks[call_id] = block
            self._set_phase(f"writing code (call {block.number})")
        if block is not self._current_block:
            self._current_block = block
            if self._text is not None:
                self._text.closed = True  # text after this call is a new segment below it
        return block

    def _notice_piece(self) -> _Notices:
        if self._notices is None:
            self._notices = self._add(_Notices)
        return self._notices

    def _set_phase(self, phase: str) -> None:
        self._status.phase = phase

    # -- drawing -----------------------------------------------------------------------------------

    def _flush(self, now: float) -> None:
        status = self._status
        key = (status.phase, int(now - self._start))
        if key != status.key:
            status.key = key
            status.text = f"{key[0]} · {key[1]} s"
            self._mark(status)
        if not self._dirty:
            return
        dirty = sorted(self._dirty, key=lambda p: p.index)
        self._dirty.clear()
        for piece in dirty:
            self._send(piece)
        # The budget counts messages, not flushes: three displays updated at once cost three.
        self._next_flush = now + len(dirty) * self._interval

    def _send(self, piece: _Piece, *, final: bool = False) -> None:
        piece.dirty = False
        bundle = piece.bundle()
        if piece.slot is None:
            piece.slot = self._frontend.open(bundle, role=piece.role, final=final)
        else:
            piece.slot.update(bundle, final=final)

    # -- the end -----------------------------------------------------------------------------------

    def _reconcile(self, result: Result) -> None:
        """Take the record's code and status; calls this view never saw are added with their outputs."""
        for record in result.calls:
            known = record.call_id in self._blocks
            block = self._block(record.call_id)
            if record.code:
                block.done_code = record.code
            block.status = record.status
            if not known:
                for output in record.outputs:
                    self._handlers.get(type(output), _ignore)(output)

    def _final_status(self, result: Result) -> str:
        elapsed = result.wall_time if result.wall_time > 0 else self._clock() - self._start
        calls = len(self._blocks)
        if result.error is not None:
            verb = "interrupted" if result.error.kind == "interrupted" else "failed"
            # The message itself is the error the cell raises: said once, below the outputs.
            return f"{verb} after {elapsed:.1f} s"
        parts = [f"done in {elapsed:.1f} s", f"{calls} call{'s' if calls != 1 else ''}"]
        usage = result.usage
        if usage.total_tokens:
            parts.append(
                f"{usage.total_tokens:,} tokens ({usage.input_tokens:,} in, {usage.output_tokens:,} out)"
            )
        return " · ".join(parts)

    def _quiet_summary(self) -> _Piece:
        blocks = list(self._blocks.values())
        lines = sum(len(b.code().strip("\n").splitlines()) for b in blocks)
        what = f"{len(blocks)} call{'s' if len(blocks) != 1 else ''}, {lines} lines of code"
        failed = [b.number for b in blocks if any(isinstance(i, ExecutionError) for i in b.items)]
        if failed:
            what += f"; errors in call {', '.join(map(str, failed))}"
        inner = "".join(
            f'<div style="{_BLOCK_STYLE}"><div style="{_SMALL}">call {b.number}</div>'
            f"{b.code_html()}{b.items_html()}</div>"
            for b in blocks
        )
        return _Fixed(
            -1,
            {
                "text/html": f'<details><summary style="{_SMALL};cursor:pointer">'
                f"code: {escape(what)}</summary>{inner}</details>",
                "text/plain": f"code: {what} (hidden by --quiet; the result's .code has it)",
            },
        )

    def _shown_images(self) -> set[bytes]:
        digests: set[bytes] = set()
        for piece in self._pieces:
            if isinstance(piece, _ImageOut):
                digests.add(_digest(piece.data))
            elif isinstance(piece, _RichOut):
                bundle = piece.bundle()
                for mime in ("image/png", "image/jpeg", "image/gif"):
                    if isinstance(bundle.get(mime), str):
                        digests.add(_digest(base64.b64decode(bundle[mime])))
        return digests

    def _file_pieces(self, result: Result, link_base: Path, shown: set[bytes]) -> list[_Piece]:
        """One display per saved file; images already on screen are only listed, in one line each."""
        show_ids = {c.file_id for c in result.citations if c.zero_length}
        pieces: list[_Piece] = []
        already: list[SavedFile] = []
        for saved in result.files:
            if saved.suffix in _IMAGE_SUFFIXES:
                # A zero-length citation is the plt.show() image itself, already shown if any was.
                if (saved.file_id and saved.file_id in show_ids and shown) or _file_digest(saved) in shown:
                    already.append(saved)
                    continue
                digest = _file_digest(saved)
                if digest is not None:
                    shown.add(digest)
            pieces.append(self._add(_Fixed, file_bundle(saved, link_base=link_base)))
        if already:
            links = [link_bundle(s, link_base=link_base, note="image shown above") for s in already]
            pieces.append(
                self._add(
                    _Fixed,
                    {
                        "text/html": "".join(str(b["text/html"]) for b in links),
                        # Plain-text frontends (terminal IPython) showed no picture: say where it is.
                        "text/plain": "\n".join(
                            f"image saved: {relative_path(s.path, link_base)} ({human_size(s.size)})"
                            for s in already
                        ),
                    },
                )
            )
        return pieces


# -- helpers ------------------------------------------------------------------------------------------


def _ignore(event: object) -> None:
    pass


def _local_links(text: str, result: Result, link_base: Path) -> str:
    """One answer segment with its sandbox: links pointing at the local copies (Result's rule)."""
    return dataclasses.replace(result, text=text).text_with_local_links(link_base)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _file_digest(saved: SavedFile) -> bytes | None:
    try:
        return _digest(saved.path.read_bytes())
    except OSError:
        return None


def _clean_logs(text: str) -> str:
    """Logs as a terminal would leave them: no escape codes, progress bars at their last state."""
    text = strip_ansi(text.replace("\r\n", "\n"))
    if "\r" in text:
        text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text


def _item_html(item: _Item) -> str:
    if isinstance(item, ExecutionError):
        head = f"{item.name}: {strip_ansi(item.value)}"
        html_text = f'<pre style="{_PRE_STYLE};color:#b00020">{escape(head)}</pre>'
        if item.traceback:
            html_text += (
                f'<details><summary style="{_SMALL};cursor:pointer">traceback</summary>'
                f'<pre style="{_PRE_STYLE}">{escape(strip_ansi(item.traceback))}</pre></details>'
            )
        return html_text
    if isinstance(item, _Plain):
        return f'<pre style="{_PRE_STYLE}">{escape(item.text)}</pre>'
    text = item.text()
    note = ""
    if len(text) > LOG_MAX_CHARS:
        note = f"showing the last {human_size(LOG_MAX_CHARS)}; the result's .calls[i].logs has all of it"
        text = text[-LOG_MAX_CHARS:]
    color = ";color:#b00020" if item.stream == "stderr" else ""
    body = f'<pre style="{_PRE_STYLE}{color}">{escape(text.rstrip(chr(10)))}</pre>'
    if note:
        body = f'<div style="{_SMALL}">{escape(note)}</div>' + body
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    if lines <= LOG_COLLAPSE_LINES:
        return body
    return (
        f'<details><summary style="{_SMALL};cursor:pointer">{escape(item.stream)} · {lines:,} lines'
        f"</summary>{body}</details>"
    )


def _item_plain(item: _Item) -> str:
    if isinstance(item, ExecutionError):
        trace = strip_ansi(item.traceback).rstrip("\n")
        return "── error ──\n" + (trace or f"{item.name}: {strip_ansi(item.value)}")
    if isinstance(item, _Plain):
        return "── result ──\n" + item.text.rstrip("\n")
    return f"── {item.stream} ──\n" + item.text().rstrip("\n")


def _describe_image(data: bytes, mime: str) -> str:
    kind = mime.split("/")[-1].split("+")[0].upper()
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return f"image: {kind} {width}×{height}, {human_size(len(data))}"
    return f"image: {kind}, {human_size(len(data))}"
