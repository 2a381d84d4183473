"""The view of one turn: throttled display updates while it streams, plain final outputs at the end.

Layout (each item is one display, in the order it first appeared)::

    status line            writing code (call 2) · 4 s   ->   done in 9.1 s · 2 calls · 7,670 tokens
    call block             code (highlighted), output (collapsed past 20 lines), errors, plain results
    image / rich output    one display per plt.show() image or rich (HTML, JSON...) output
    answer                 the assistant's Markdown (raw HTML escaped); one display per text segment
    notices                one line each
    files                  previews from render/files.py (images already shown are only listed)

The view folds nothing itself: ``handle`` feeds its ``ResultBuilder`` (the one fold of the
stream) and marks which display changed; each display draws from the builder's records. Drawing
(highlighting, Markdown) happens in ``_flush``, at most ``max_updates_per_second`` messages a
second and ``LIVE_BYTES_PER_SECOND`` bytes a second, so a fast stream of deltas, or a call
printing megabytes, costs a bounded number and size of display updates. A call's output is
shown capped: while it streams its first and last few KB, at the end its first and last
``LOG_KEEP_CHARS`` (the whole of it saved as a file and linked). ``--quiet`` shows nothing
until ``finish``, which then shows final outputs only, the code collapsed.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from ci_magic import events
from ci_magic.costs import dollars
from ci_magic.errors import Interrupted
from ci_magic.provenance import METADATA_KEY
from ci_magic.render.files import file_bundle, human_size, link_bundle, relative_path
from ci_magic.render.frontend import OUTPUT_METADATA, Frontend, MimeBundle, Slot, SlotRole
from ci_magic.render.safe_html import (
    DISPLAYED_MIMES,
    answer_bundle,
    cap_display_text,
    escape,
    safe_bundle,
    strip_ansi,
)
from ci_magic.result import CallRecord, LogText, Result, ResultBuilder, TextSegment

__all__ = ["TurnView"]


LOG_COLLAPSE_LINES = 20
LOG_KEEP_CHARS = 20_000  # final outputs: a call's output keeps its first and last 20 KB
LIVE_LOG_KEEP_CHARS = 2_000  # while streaming: the first and last 2 KB (the rest comes at the end)
LIVE_BYTES_PER_SECOND = 50_000  # live updates, all displays together (slower as more has been sent)
# stripnl=False: chunks highlighted separately must keep their blank lines to join back exactly.
_LEXER = PythonLexer(stripnl=False)
_FORMATTER = HtmlFormatter(nowrap=True, noclasses=True, style="default")
# A line starting at column 0 with code: the lexer is back in its root state there, unless a
# triple-quoted string is open (checked by counting quotes before it).
_TOP_LEVEL_LINE = re.compile(r"\n(?=[A-Za-z_@])")
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
        self.provenance: dict[str, Any] | None = None  # the turn's record, on the final status line
        self.caveats: list[str] = []  # status notices ("not isolated"): on every redraw of the line

    def bundle(self) -> MimeBundle:
        color = "#b00020" if self.failed else "#666"
        text = " · ".join([self.text, *self.caveats])
        bundle: MimeBundle = {
            "text/html": f'<div style="font-size:0.85em;color:{color}">ci · {escape(text)}</div>',
            "text/plain": f"ci: {text}",
        }
        if self.provenance is not None:
            bundle[OUTPUT_METADATA] = {METADATA_KEY: self.provenance}
        return bundle


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


class _Plain:
    """A rich output with nothing but text (an expression's value): shown with the output."""

    def __init__(self, output: events.RichOutput) -> None:
        plain = output.bundle.get("text/plain")
        # Capped like a call's logs: a display must not carry what the log cap keeps out.
        self.text = cap_display_text(strip_ansi(plain)) if isinstance(plain, str) else "[display output]"


_Item = LogText | _Plain | events.ExecutionError


class _Block(_Piece):
    """One code interpreter call, drawn from its record: the code as it streams, then its output."""

    role: ClassVar[SlotRole] = "stream"

    def __init__(self, index: int, number: int, record: CallRecord) -> None:
        super().__init__(index)
        self.number = number
        self.record = record
        self.live = True  # while streaming, output is cut shorter
        self.link_base: Path | None = None  # where links to saved logs are relative to (set at the end)
        self._highlight = _Highlighter()
        self._plain: dict[int, _Plain] = {}  # id(RichOutput) -> its text item

    def items(self) -> list[_Item]:
        items: list[_Item] = []
        for output in self.record.outputs:
            if isinstance(output, (LogText, events.ExecutionError)):
                items.append(output)
            elif (
                isinstance(output, events.RichOutput)
                and not output.update
                and output.bundle.keys().isdisjoint(DISPLAYED_MIMES)
            ):
                plain = self._plain.get(id(output))
                if plain is None:
                    plain = self._plain[id(output)] = _Plain(output)
                items.append(plain)
        return items

    def code(self) -> str:
        return self.record.code

    def code_html(self) -> str:
        code = self.code().replace("\r\n", "\n").rstrip("\n")
        return f'<pre style="{_CODE_STYLE}">{self._highlight(code)}</pre>'

    def items_html(self) -> str:
        keep = LIVE_LOG_KEEP_CHARS if self.live else LOG_KEEP_CHARS
        return "".join(_item_html(item, keep, self.link_base) for item in self.items())

    def plain(self) -> str:
        text = f"── call {self.number} {'─' * 30}\n" + self.code().replace("\r\n", "\n").rstrip("\n")
        items = self.items()
        if self.record.status != "writing" or items:
            # Only a finished code ends its last line: a terminal prints complete lines only.
            plain = (_item_plain(item, live=self.live, link_base=self.link_base) for item in items)
            text += "\n" + "".join(p + "\n" for p in plain)
        return text

    def bundle(self) -> MimeBundle:
        status = self.record.status
        label = _CALL_LABELS.get(status, status)
        color = "#b00020" if status == "failed" else "#777"
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
    """One segment of the assistant's answer, drawn from the builder's segment."""

    role: ClassVar[SlotRole] = "text"

    def __init__(self, index: int, segment: TextSegment) -> None:
        super().__init__(index)
        self.segment = segment
        self.final: str | None = None  # the segment with its sandbox: links made local
        self.complete = False  # a call followed it: no more text comes to this segment

    def bundle(self) -> MimeBundle:
        text = self.final if self.final is not None else self.segment.text
        # Untrusted (data the model read can steer it): HTML we rendered ourselves and plain text,
        # never text/markdown that a frontend's own parser could read differently.
        return answer_bundle(text)


class _Thinking(_Piece):
    """The model's reasoning (issue 11), collapsed: open it to read."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.parts: list[str] = []

    def bundle(self) -> MimeBundle:
        text = strip_ansi("".join(self.parts))
        summary = f"thinking ({len(text):,} characters)"
        return {
            "text/html": f'<details style="{_SMALL}"><summary>{summary}</summary>'
            f'<pre style="{_PRE_STYLE}">{escape(text)}</pre></details>',
            "text/plain": f"{summary}",
        }


class _Notices(_Piece):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.notices: list[events.Notice] = []

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
    """Shows one turn on ``frontend``: live while streaming, final at the end."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        prompt: str = "",
        quiet: bool = False,
        max_updates_per_second: float = 12.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.builder = ResultBuilder(prompt)
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
        self._texts: dict[int, _Text] = {}  # id(segment) -> its display
        self._notices: _Notices | None = None
        self._thinking: _Thinking | None = None
        self._rich: dict[str, list[_RichOut]] = {}
        self._live_bytes = 0  # text sent by live updates so far

    # -- public ------------------------------------------------------------------------------------

    def handle(self, event: events.Event) -> None:
        """Fold one event into the record; redraw only if the budget allows (``tick`` catches up)."""
        self.builder.feed(event)
        if self._quiet or self._finished:
            return  # quiet mode draws from the record at the end
        self._changed(event)
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

    def finish(self, result: Result | None = None, *, link_base: Path | None = None) -> None:
        """Bring every display to its final, persistent state and show notices and files.

        ``result`` is the builder's own (accepted from callers that hold it; anything else is a bug).
        """
        if result is not None and result is not self.builder.result:
            raise ValueError("finish() shows the view's own Result (view.builder.result)")
        if self._finished:
            return
        self._finished = True
        result = self.builder.result
        link_base = link_base if link_base is not None else Path.cwd()
        for record in result.calls:
            block = self._block(record.call_id)
            block.live, block.link_base = False, link_base
        messages = [n for n in result.notices if n.kind == "message"]
        if messages:
            self._notice_piece().notices = messages
        self._status.caveats = list(dict.fromkeys(n.text for n in result.notices if n.kind == "status"))
        if self._quiet:
            shown: list[_Piece] = [self._quiet_summary()] if self._blocks else []
            for record in result.calls:
                for output in record.outputs:
                    if isinstance(output, events.Image):
                        shown.append(_ImageOut(-1, output.data, output.mime))
                    elif isinstance(output, events.RichOutput):
                        self._changed(output)  # the latest state of each display, in order
            shown += [p for p in self._pieces if isinstance(p, _RichOut)]
            if result.text.strip():
                answer = _Text(-1, TextSegment())
                answer.final = result.text_with_local_links(link_base)
                shown.append(answer)
            if self._notices is not None:
                shown.append(self._notices)
        else:
            for segment in self.builder.segments:
                self._segment(segment).final = _local_links(segment.text, result, link_base)
            shown = [p for p in self._pieces if p is not self._status]
        shown += self._file_pieces(result, link_base)
        self._status.text = self._final_status(result)
        self._status.provenance = result.provenance
        self._status.failed = result.error is not None or self._ended_on_a_failed_call(result)
        if self._status.slot is None:
            self._status.slot = self._frontend.open(self._status.bundle(), role="status")
        for piece in shown:
            self._send(piece, final=True)
        self._send(self._status, final=True)
        self._dirty.clear()

    # -- what an event changed ----------------------------------------------------------------------

    def _changed(self, event: events.Event) -> None:
        match event:
            case events.TurnStarted(model=model):
                self._set_phase(f"waiting for {model}" if model else "waiting for the model")
            case (
                events.CallStarted(call_id=cid) | events.CodeDelta(call_id=cid) | events.CodeDone(call_id=cid)
            ):
                self._mark(self._block(cid))
            case events.CallStatus(call_id=cid, status=status):
                block = self._block(cid)
                if status in ("running", "interpreting"):
                    self._set_phase(f"running call {block.number}")
                elif status != "writing":
                    self._set_phase("reading results")
                self._mark(block)
            case events.Logs(call_id=cid) | events.ExecutionError(call_id=cid):
                self._mark(self._block(cid))
            case events.Image(call_id=cid, data=data, mime=mime):
                self._block(cid)
                self._add(_ImageOut, data, mime)
            case events.RichOutput():
                self._on_rich(event)
            case events.TextDelta() | events.TextDone():
                segment = self.builder.segments[-1] if self.builder.segments else None
                if segment is not None:
                    if id(segment) not in self._texts:
                        self._set_phase("writing the answer")
                    self._mark(self._segment(segment))
            case events.ThinkingDelta(delta=delta):
                if self._thinking is None:
                    self._thinking = self._add(_Thinking)
                    self._set_phase("thinking")
                self._thinking.parts.append(delta)
                self._mark(self._thinking)
            case events.Notice(kind="status", text=text):
                if text not in self._status.caveats:
                    self._status.caveats.append(text)
                    self._mark(self._status)
            case events.Notice():
                notices = self._notice_piece()
                notices.notices.append(event)
                self._mark(notices)
            case events.Completed():
                self._set_phase("saving files")
            case events.Failed():
                self._set_phase("stopped")

    def _on_rich(self, event: events.RichOutput) -> None:
        block = self._block(event.call_id)
        if event.update and event.display_id is not None:
            for piece in self._rich.get(event.display_id, []):
                piece.raw = event.bundle
                self._mark(piece)
            return
        if event.bundle.keys().isdisjoint(DISPLAYED_MIMES):
            self._mark(block)  # text only: drawn with the call's output
            return
        piece = self._add(_RichOut, event.bundle)
        if event.display_id is not None:
            self._rich.setdefault(event.display_id, []).append(piece)

    # -- state -------------------------------------------------------------------------------------

    def _add(self, kind: type, *args: object) -> Any:
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
            for text in self._texts.values():
                if not text.complete:  # the text before this call is whole: show it whole, above it
                    text.complete = True
                    self._mark(text)
            block = self._add(_Block, len(self._blocks) + 1, self.builder.call(call_id))
            self._blocks[call_id] = block
            self._set_phase(f"writing code (call {block.number})")
        return block

    def _segment(self, segment: TextSegment) -> _Text:
        piece = self._texts.get(id(segment))
        if piece is None:
            piece = self._texts[id(segment)] = self._add(_Text, segment)
        return piece

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
        # A complete answer segment is final for a terminal, which prints it before the call below it.
        sent = sum(self._send(piece, final=isinstance(piece, _Text) and piece.complete) for piece in dirty)
        self._live_bytes += sent
        # The budget counts messages and bytes: three displays updated at once cost three, and a
        # call printing megabytes slows its own redraws down, more so the more it has already sent
        # (each MB sent halves the byte rate again), instead of flooding every connected frontend.
        byte_rate = LIVE_BYTES_PER_SECOND / (1 + self._live_bytes / 1_000_000)
        self._next_flush = now + max(len(dirty) * self._interval, sent / byte_rate)

    def _send(self, piece: _Piece, *, final: bool = False) -> int:
        """Show ``piece`` as it is now; returns the bytes of text sent."""
        piece.dirty = False
        bundle = piece.bundle()
        if piece.slot is None:
            piece.slot = self._frontend.open(bundle, role=piece.role, final=final)
        else:
            piece.slot.update(bundle, final=final)
        return sum(len(value) for value in bundle.values() if isinstance(value, (str, bytes)))

    # -- the end -----------------------------------------------------------------------------------

    def _final_status(self, result: Result) -> str:
        elapsed = result.wall_time if result.wall_time > 0 else self._clock() - self._start
        calls = len(result.calls)
        if result.error is not None:
            verb = "interrupted" if isinstance(result.error, Interrupted) else "failed"
            # The message itself is the error the cell raises: said once, below the outputs.
            return f"{verb} after {elapsed:.1f} s"
        verb = "failed after" if self._ended_on_a_failed_call(result) else "done in"
        parts = [f"{verb} {elapsed:.1f} s", f"{calls} call{'s' if calls != 1 else ''}"]
        failed = len(result.failed_calls)
        if failed:
            parts[-1] += f" ({failed} failed)"
        usage = result.usage
        if usage.total_tokens:
            parts.append(
                f"{usage.total_tokens:,} tokens ({usage.input_tokens:,} in, {usage.output_tokens:,} out)"
            )
        parts.extend(_cost_and_times(result))
        return " · ".join(parts)

    def _ended_on_a_failed_call(self, result: Result) -> bool:
        """The last call failed (raised, timed out) and no answer followed it: the turn did not
        get done (%%ci_exec of failing code; a model that gave up)."""
        if not result.calls or result.calls[-1].status != "failed":
            return False
        last_call = self._block(result.calls[-1].call_id).index
        return not any(text.index > last_call and text.segment.text.strip() for text in self._texts.values())

    def _quiet_summary(self) -> _Piece:
        blocks = list(self._blocks.values())
        lines = sum(len(b.code().strip("\n").splitlines()) for b in blocks)
        what = f"{len(blocks)} call{'s' if len(blocks) != 1 else ''}, {lines} lines of code"
        failed = [b.number for b in blocks if b.record.status == "failed"]
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

    def _file_pieces(self, result: Result, link_base: Path) -> list[_Piece]:
        """One display per saved file; images the code displayed are on screen already: listed only."""
        pieces: list[_Piece] = []
        already = [saved for saved in result.files if saved.displayed]
        for saved in result.files:
            if not saved.displayed:
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


def _cost_and_times(result: Result) -> list[str]:
    """``~$0.0042`` (tokens and container fee), then where the time went: to the first code, in the
    model, running code."""
    parts: list[str] = []
    cost = result.cost
    if cost is None:
        return parts  # not measured: a turn the session did not finish (or no session at all)
    if cost.tokens is None:
        # The model's name can be a local file path (llama.cpp serves a .gguf by its path): not shown.
        parts.append("cost: no price for this model (CodeInterpreter.prices)")
    else:
        fee = f" incl. {dollars(cost.container)} container" if cost.container else ""
        parts.append(f"~{dollars(cost.total)}{fee}")
    times = result.timings
    if times.first_code is not None:
        parts.append(f"first code {times.first_code:.1f} s")
    if times.model is not None:
        parts.append(f"model {times.model:.1f} s")
    if result.calls:
        parts.append(f"code {times.code:.1f} s")
    return parts


def _local_links(text: str, result: Result, link_base: Path) -> str:
    """One answer segment with its sandbox: links pointing at the local copies (Result's rule)."""
    return Result(prompt="", text=text, files=result.files).text_with_local_links(link_base)


def _clean_logs(text: str) -> str:
    """Output as a terminal would leave it: no escape codes, progress bars at their last state."""
    text = strip_ansi(text.replace("\r\n", "\n"))
    if "\r" in text:
        text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text


def _stream_label(stream: str) -> str:
    # OpenAI's "logs" are stdout and stderr together; the local sandbox's stdout is the same thing.
    return "error output" if stream == "stderr" else "output"


def _log_parts(log: LogText, keep: int, link_base: Path | None) -> tuple[str, str, str]:
    """(head, what was cut, tail) of a call's output; the middle is "" when all of it fits."""
    head, tail = log.head_tail(keep)
    if not tail:
        return _clean_logs(head), "", ""
    omitted = log.size - len(head) - len(tail)
    where = f"; all of it is in {relative_path(log.saved_as, link_base)}" if log.saved_as is not None else ""
    note = f"[... {omitted:,} characters not shown{where} ...]"
    return _clean_logs(head), note, _clean_logs(tail)


def _item_html(item: _Item, keep: int, link_base: Path | None) -> str:
    if isinstance(item, events.ExecutionError):
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
    head, cut, tail = _log_parts(item, keep, link_base)
    color = ";color:#b00020" if item.stream == "stderr" else ""
    body = f'<pre style="{_PRE_STYLE}{color}">{escape(head.rstrip(chr(10)))}</pre>'
    if cut:
        link = ""
        if item.saved_as is not None:
            href = escape(relative_path(item.saved_as, link_base))
            link = f' <a href="{href}" target="_blank">open all of it</a>'
        body += f'<div style="{_SMALL}">{escape(cut)}{link}</div>'
        body += f'<pre style="{_PRE_STYLE}{color}">{escape(tail.rstrip(chr(10)))}</pre>'
    lines = (head + tail).count("\n") + (0 if (tail or head).endswith("\n") else 1)
    if lines <= LOG_COLLAPSE_LINES and not cut:
        return body
    size = f"{item.size:,} characters" if cut else f"{lines:,} lines"
    return (
        f'<details><summary style="{_SMALL};cursor:pointer">{_stream_label(item.stream)} · {size}'
        f"</summary>{body}</details>"
    )


def _item_plain(item: _Item, *, live: bool, link_base: Path | None) -> str:
    if isinstance(item, events.ExecutionError):
        trace = strip_ansi(item.traceback).rstrip("\n")
        return "── error ──\n" + (trace or f"{item.name}: {strip_ansi(item.value)}")
    if isinstance(item, _Plain):
        return "── result ──\n" + item.text.rstrip("\n")
    label = f"── {_stream_label(item.stream)} ──\n"
    if live:
        # Only the head while streaming: a terminal prints lines once, so the text must only grow.
        head, _tail = item.head_tail(LOG_KEEP_CHARS)
        return label + _clean_logs(head[: 2 * LIVE_LOG_KEEP_CHARS]).rstrip("\n")
    head, cut, tail = _log_parts(item, LOG_KEEP_CHARS, link_base)
    if not cut:
        return label + head.rstrip("\n")
    return label + head.rstrip("\n") + "\n" + cut + "\n" + tail.rstrip("\n")


def _describe_image(data: bytes, mime: str) -> str:
    kind = mime.split("/")[-1].split("+")[0].upper()
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return f"image: {kind} {width}×{height}, {human_size(len(data))}"
    return f"image: {kind}, {human_size(len(data))}"
