"""What a %%ci cell produced, built from the event stream alone (bound to ``_ci`` and ``-o NAME``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci_magic import events
from ci_magic.costs import TurnCost
from ci_magic.errors import BackendError, CIError

__all__ = [
    "LOG_KEEP_CHARS",
    "CallRecord",
    "LogText",
    "Output",
    "Result",
    "ResultBuilder",
    "SavedFile",
    "TextSegment",
    "Timings",
]

# A call's output longer than twice this is shown as its first and last LOG_KEEP_CHARS characters,
# and saved whole as a file in the output folder.
LOG_KEEP_CHARS = 20_000

SANDBOX_LINK = re.compile(r"sandbox:/mnt/data/([^\s)\]\"'<>]+)")


class LogText:
    """Consecutive text one call printed on one stream, as it grows (appending is O(1)).

    ``head_tail`` reads only the ends, so showing a 10 MB log costs what is shown, not 10 MB.
    ``saved_as`` is the local file holding all of it, once the session wrote it (long logs only).
    The sandbox decides how much it prints, so the host keeps at most ``memory_cap`` characters:
    past it, the first half stays and the rest is a rolling tail, with a line saying what was dropped.
    """

    memory_cap = 32 << 20  # characters of one call's stream held in host memory

    def __init__(self, call_id: str, stream: str) -> None:
        self.call_id = call_id
        self.stream = stream
        self.size = 0  # characters printed (all of them, kept or not)
        self._parts: list[str] = []  # all of it, or the tail once the cap was passed
        self._held = 0  # characters in _parts
        self._head: str | None = None  # set once the cap was passed
        self.dropped = 0  # characters not kept (between the head and the tail)
        self.saved_as: Path | None = None

    def append(self, text: str) -> None:
        self._parts.append(text)
        self.size += len(text)
        self._held += len(text)
        # Head and tail together stay within the cap: the tail may grow to half of it.
        if self._held > (self.memory_cap if self._head is None else self.memory_cap // 2):
            self._bound()

    def _bound(self) -> None:
        half = self.memory_cap // 2
        joined = "".join(self._parts)
        if self._head is None:
            self._head, joined = joined[:half], joined[half:]
        # Trim the tail to a quarter of the cap so the next trim is far away (appending stays O(1)).
        keep = half // 2
        self.dropped += max(0, len(joined) - keep)
        self._parts = [joined[-keep:]] if keep else []
        self._held = len(self._parts[0]) if self._parts else 0

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        tail = self._parts[0] if self._parts else ""
        if self._head is None:
            return tail
        return f"{self._head}\n[... {self.dropped:,} characters not kept ...]\n{tail}"

    def head_tail(self, keep: int) -> tuple[str, str]:
        """The first and last ``keep`` characters; ("all of it", "") when it is not longer than 2 x keep."""
        if self.size <= 2 * keep:
            return self.text, ""
        head_parts = [self._head] if self._head is not None else self._parts
        return _take(head_parts, keep), _take(reversed(self._parts), keep, from_end=True)

    def __repr__(self) -> str:
        return f"LogText({self.stream}, {self.size:,} characters)"


def _take(parts: Iterable[str], count: int, *, from_end: bool = False) -> str:
    taken: list[str] = []
    for part in parts:
        piece = part[-count:] if from_end else part[:count]
        taken.append(piece)
        count -= len(piece)
        if count <= 0:
            break
    return "".join(reversed(taken) if from_end else taken)


Output = LogText | events.Image | events.RichOutput | events.ExecutionError


@dataclass
class CallRecord:
    """One code interpreter call: its code and what running it printed or displayed."""

    call_id: str
    code: str = ""
    status: events.CallStatusName = "writing"
    outputs: list[Output] = field(default_factory=list)
    container_id: str | None = None

    @property
    def logs(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, LogText))

    @property
    def images(self) -> list[bytes]:
        return [o.data for o in self.outputs if isinstance(o, events.Image)]

    @property
    def error(self) -> events.ExecutionError | None:
        return next((o for o in self.outputs if isinstance(o, events.ExecutionError)), None)


class TextSegment:
    """One piece of the answer: text between calls (or ended by ``TextDone``)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.done: str | None = None  # TextDone's authoritative text

    def append(self, delta: str) -> None:
        self._parts.append(delta)

    @property
    def text(self) -> str:
        if self.done is not None:
            return self.done
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


@dataclass(frozen=True)
class SavedFile:
    """A container file copied into the output folder."""

    name: str  # sanitized, relative to the output folder
    path: Path  # local copy
    container_path: str  # /mnt/data/...
    file_id: str
    size: int
    cited: bool  # the model linked it in its answer (False: found by listing the container)
    displayed: bool = False  # an image the code displayed: on screen already, listed only

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


@dataclass
class Timings:
    """Where a turn's time went, in seconds: from its start to the first code, in the model (the
    stream's time less the code's), running code. None: not measured (no code, no stream)."""

    first_code: float | None = None
    model: float | None = None
    code: float = 0.0


@dataclass
class Result:
    prompt: str
    calls: list[CallRecord] = field(default_factory=list)
    text: str = ""
    citations: list[events.FileCited] = field(default_factory=list)
    files: list[SavedFile] = field(default_factory=list)
    notices: list[events.Notice] = field(default_factory=list)
    response_id: str | None = None
    container_id: str | None = None
    model: str | None = None
    usage: events.Usage = field(default_factory=events.Usage)
    wall_time: float = 0.0
    error: CIError | None = None  # why the turn stopped (raised by run()); None: it completed
    timings: Timings = field(default_factory=Timings)
    cost: TurnCost | None = None  # the estimate (costs.py), set by the session at the end
    provenance: dict[str, Any] | None = None  # the record saved with the cell (provenance.py)

    @property
    def failed_calls(self) -> list[CallRecord]:
        """Calls whose code raised or was stopped (the turn itself may still have completed)."""
        return [c for c in self.calls if c.status == "failed"]

    @property
    def code(self) -> str:
        """The code of every call, in order, as one script."""
        return "\n\n".join(c.code.rstrip("\n") for c in self.calls if c.code)

    @property
    def ok(self) -> bool:
        return self.error is None

    def local_path(self, container_name: str) -> Path | None:
        for saved in self.files:
            if saved.container_path == f"/mnt/data/{container_name}" or saved.name == container_name:
                return saved.path
        return None

    def text_with_local_links(self, link_base: Path | None = None) -> str:
        """The answer with ``sandbox:/mnt/data/x`` links pointing at the local copies."""

        def replace(match: re.Match[str]) -> str:
            local = self.local_path(match.group(1))
            if local is None:
                return match.group(0)
            if link_base is not None:
                try:
                    return local.resolve().relative_to(link_base.resolve()).as_posix()
                except ValueError:
                    pass
            return local.as_posix()

        return SANDBOX_LINK.sub(replace, self.text)

    def __repr__(self) -> str:
        status = "ok" if self.ok else f"failed: {self.error.message if self.error else ''}"
        files = ", ".join(f.name for f in self.files) or "none"
        return (
            f"<ci_magic.Result {status}; {len(self.calls)} call(s); files: {files}; "
            f"tokens: {self.usage.total_tokens}; {self.wall_time:.1f}s>"
        )

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class ResultBuilder:
    """Folds events into a Result: the only place that interprets the stream.

    The live view renders from this state (``calls``, ``segments``) instead of folding again.
    """

    def __init__(self, prompt: str) -> None:
        self.result = Result(prompt=prompt)
        self._calls: dict[str, CallRecord] = {}
        self.segments: list[TextSegment] = []  # the answer's pieces, in order
        self._open: TextSegment | None = None  # the segment text deltas go to now
        self._origin = time.monotonic()  # the turn's start, for the time to the first code
        self._stream_span: tuple[float, float] | None = None  # first and latest backend event
        self._call_started: dict[str, float] = {}
        self.call_seconds: dict[str, float] = {}  # call id -> execution time, from the events

    @property
    def stream_seconds(self) -> float | None:
        """From the backend's first event to its last (None: nothing streamed)."""
        return None if self._stream_span is None else self._stream_span[1] - self._stream_span[0]

    def call(self, call_id: str) -> CallRecord:
        record = self._calls.get(call_id)
        if record is None:
            record = CallRecord(call_id=call_id)
            self._calls[call_id] = record
            self.result.calls.append(record)
        if self._open is not None:
            self._open = None  # text after a call is a new segment below it
        return record

    @property
    def open_segment(self) -> TextSegment | None:
        return self._open

    def feed(self, event: events.Event) -> None:
        result = self.result
        if not isinstance(event, events.Notice):  # notices also come from the session, before the stream
            moment = time.monotonic()
            first = self._stream_span[0] if self._stream_span is not None else moment
            self._stream_span = (first, moment)
            if isinstance(event, events.CallStarted) and result.timings.first_code is None:
                result.timings.first_code = moment - self._origin
            self._time_call(event, moment)
        match event:
            case events.TurnStarted(response_id=rid, model=model):
                result.response_id = rid or result.response_id
                result.model = model or result.model
            case events.CallStarted(call_id=cid, container_id=container):
                self.call(cid).container_id = container
                result.container_id = container or result.container_id
            case events.CodeDelta(call_id=cid, delta=delta):
                self.call(cid).code += delta
            case events.CodeDone(call_id=cid, code=code):
                self.call(cid).code = code
            case events.CallStatus(call_id=cid, status=status):
                record = self.call(cid)
                if not (record.status == "failed" and status == "completed"):
                    record.status = status
            case events.Logs(call_id=cid, text=text, stream=stream):
                record = self.call(cid)
                last = record.outputs[-1] if record.outputs else None
                if not (isinstance(last, LogText) and last.stream == stream):
                    last = LogText(cid, stream)
                    record.outputs.append(last)
                last.append(text)
            case events.ExecutionError():
                record = self.call(event.call_id)
                record.outputs.append(event)
                record.status = "failed"  # the code raised (or was stopped): not "done"
            case events.Image() | events.RichOutput():
                self.call(event.call_id).outputs.append(event)
            case events.TextDelta(delta=delta):
                if self._open is None or self._open.done is not None:
                    self._open = TextSegment()
                    self.segments.append(self._open)
                self._open.append(delta)
                self._update_text()
            case events.TextDone(text=text):
                segment = self._open if self._open is not None and self._open.done is None else None
                if segment is None:
                    segment = TextSegment()
                    self.segments.append(segment)
                segment.done = text  # the segment's authoritative text replaces its deltas
                self._open = None
                self._update_text()
            case events.FileCited():
                result.citations.append(event)
            case events.Notice():
                result.notices.append(event)
            case events.Completed(response_id=rid, container_id=container, usage=usage):
                result.response_id = rid or result.response_id
                result.container_id = container or result.container_id
                result.usage = usage
            case events.Failed(message=message):
                self.fail(BackendError(message))

    def _time_call(self, event: events.Event, moment: float) -> None:
        """A call runs from its "running" status (or, for backends that send none, its complete code)
        to its final status."""
        if isinstance(event, events.CodeDone):
            self._call_started.setdefault(event.call_id, moment)
        elif isinstance(event, events.CallStatus) and event.call_id not in self.call_seconds:
            started = self._call_started.get(event.call_id)
            if event.status in ("running", "interpreting"):
                self._call_started[event.call_id] = moment
            elif event.status in ("completed", "failed", "incomplete") and started is not None:
                self.call_seconds[event.call_id] = moment - started

    def fail(self, error: CIError) -> None:
        """The turn stops with ``error``; it carries this Result (what arrived before it)."""
        error.result = self.result
        self.result.error = error

    def _update_text(self) -> None:
        # Segments are separate messages (before and after a tool call): keep them paragraphs apart.
        self.result.text = "\n\n".join(t.strip("\n") for t in (s.text for s in self.segments) if t)
