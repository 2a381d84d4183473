"""What a %%ci cell produced, built from the event stream alone (bound to ``_ci`` and ``-o NAME``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
    Usage,
)

__all__ = ["CallRecord", "Output", "Result", "ResultBuilder", "SavedFile"]

Output = Logs | Image | RichOutput | ExecutionError

SANDBOX_LINK = re.compile(r"sandbox:/mnt/data/([^\s)\]\"'<>]+)")


@dataclass
class CallRecord:
    """One code interpreter call: its code and what running it printed or displayed."""

    call_id: str
    code: str = ""
    status: CallStatusName = "writing"
    outputs: list[Output] = field(default_factory=list)
    container_id: str | None = None

    @property
    def logs(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, Logs))

    @property
    def images(self) -> list[bytes]:
        return [o.data for o in self.outputs if isinstance(o, Image)]

    @property
    def error(self) -> ExecutionError | None:
        return next((o for o in self.outputs if isinstance(o, ExecutionError)), None)


@dataclass(frozen=True)
class SavedFile:
    """A container file copied into the output folder."""

    name: str  # sanitized, relative to the output folder
    path: Path  # local copy
    container_path: str  # /mnt/data/...
    file_id: str
    size: int
    cited: bool  # the model linked it in its answer (False: found by listing the container)

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


@dataclass
class Result:
    prompt: str
    calls: list[CallRecord] = field(default_factory=list)
    text: str = ""
    citations: list[FileCited] = field(default_factory=list)
    files: list[SavedFile] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    response_id: str | None = None
    container_id: str | None = None
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    wall_time: float = 0.0
    error: Failed | None = None

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

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(repr(self))


class ResultBuilder:
    """Folds events into a Result; the only place that interprets the stream for the record."""

    def __init__(self, prompt: str) -> None:
        self.result = Result(prompt=prompt)
        self._calls: dict[str, CallRecord] = {}
        self._segments: list[str] = []  # finished assistant text segments
        self._current: list[str] = []  # deltas of the segment being streamed

    def call(self, call_id: str) -> CallRecord:
        record = self._calls.get(call_id)
        if record is None:
            record = CallRecord(call_id=call_id)
            self._calls[call_id] = record
            self.result.calls.append(record)
        return record

    def feed(self, event: Event) -> None:
        result = self.result
        match event:
            case TurnStarted(response_id=rid, model=model):
                result.response_id = rid or result.response_id
                result.model = model or result.model
            case CallStarted(call_id=cid, container_id=container):
                self.call(cid).container_id = container
                result.container_id = container or result.container_id
            case CodeDelta(call_id=cid, delta=delta):
                self.call(cid).code += delta
            case CodeDone(call_id=cid, code=code):
                self.call(cid).code = code
            case CallStatus(call_id=cid, status=status):
                self.call(cid).status = status
            case Logs() | Image() | RichOutput() | ExecutionError():
                self.call(event.call_id).outputs.append(event)
            case TextDelta(delta=delta):
                self._current.append(delta)
                self._update_text()
            case TextDone(text=text):
                # The segment's authoritative text replaces its deltas.
                self._current.clear()
                self._segments.append(text)
                self._update_text()
            case FileCited():
                result.citations.append(event)
            case Notice():
                result.notices.append(event)
            case Completed(response_id=rid, container_id=container, usage=usage):
                result.response_id = rid or result.response_id
                result.container_id = container or result.container_id
                result.usage = usage
            case Failed():
                result.error = event

    def _update_text(self) -> None:
        parts = [*self._segments, "".join(self._current)] if self._current else self._segments
        # Segments are separate messages (before and after a tool call): keep them paragraphs apart.
        self.result.text = "\n\n".join(p.strip("\n") for p in parts if p)
