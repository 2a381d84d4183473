"""The typed events every backend emits and every consumer (renderer, Result builder) reads.

Backends translate what they speak (OpenAI Responses SSE, Chat Completions tool-call deltas,
Jupyter kernel messages) into these frozen dataclasses. Nothing downstream knows which backend
produced them.

A turn looks like::

    TurnStarted
    ( CallStarted  CodeDelta*  CodeDone  CallStatus(running)
      (Logs | Image | RichOutput | ExecutionError)*  CallStatus(completed|failed) )*
    ThinkingDelta*  TextDelta*  FileCited*  TextDone?
    Notice* (anywhere)
    Completed | Failed

Several calls and text segments may alternate; ``call_id`` ties code and outputs together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CallStarted",
    "CallStatus",
    "CallStatusName",
    "CodeDelta",
    "CodeDone",
    "Completed",
    "Event",
    "ExecutionError",
    "Failed",
    "FileCited",
    "Image",
    "Logs",
    "Notice",
    "RichOutput",
    "TextDelta",
    "TextDone",
    "ThinkingDelta",
    "TurnStarted",
    "Usage",
]

CallStatusName = Literal["writing", "running", "interpreting", "completed", "failed", "incomplete"]


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
        )


@dataclass(frozen=True)
class TurnStarted:
    """The model accepted the request (response id when the backend has one)."""

    response_id: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class CallStarted:
    """A new code interpreter call begins; its code streams next."""

    call_id: str
    container_id: str | None = None


@dataclass(frozen=True)
class CodeDelta:
    call_id: str
    delta: str


@dataclass(frozen=True)
class CodeDone:
    """The complete code of a call (authoritative: replaces the concatenated deltas)."""

    call_id: str
    code: str


@dataclass(frozen=True)
class CallStatus:
    call_id: str
    status: CallStatusName


@dataclass(frozen=True)
class Logs:
    """Text the code printed (stdout/stderr or OpenAI's ``logs`` output)."""

    call_id: str
    text: str
    stream: Literal["stdout", "stderr", "logs"] = "logs"


@dataclass(frozen=True)
class Image:
    """An image the code displayed (``plt.show()``), already decoded from its data URL."""

    call_id: str
    data: bytes
    mime: str = "image/png"


@dataclass(frozen=True)
class RichOutput:
    """Any other display output: a mime bundle (``text/html``, ``text/plain``...).

    ``display_id`` and ``update`` carry Jupyter's ``update_display_data`` semantics so live
    updates inside the sandbox are not lost.
    """

    call_id: str
    bundle: dict[str, object]
    display_id: str | None = None
    update: bool = False


@dataclass(frozen=True)
class ExecutionError:
    """The user's (model's) code raised: data, not an exception of ours."""

    call_id: str
    name: str
    value: str
    traceback: str = ""


@dataclass(frozen=True)
class TextDelta:
    delta: str


@dataclass(frozen=True)
class TextDone:
    """The complete text of one assistant message segment."""

    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of the model's reasoning (``reasoning_content`` / ``reasoning``): shown collapsed."""

    delta: str


@dataclass(frozen=True)
class FileCited:
    """The model cited (or produced) a container file.

    ``displayed``: the file is an image the code displayed, already shown through an ``Image``
    event, so it is neither downloaded nor shown again. (OpenAI cites each ``plt.show()`` image
    as a zero-length ``cfile_*.png`` citation; its translator sets the flag only when the call's
    outputs carried the image, since without them the cited file is the only copy.)
    """

    container_id: str
    file_id: str
    filename: str
    start_index: int = 0
    end_index: int = 0
    displayed: bool = False


@dataclass(frozen=True)
class Notice:
    """A one-line message to the user (container recreated, step cap reached...).

    ``kind="status"``: not a message but a caveat about the whole turn that its status line
    carries on every redraw (the local sandbox without isolation: "not isolated"); the backend
    sends it every turn, so the renderer needs to know nothing about backends.
    """

    text: str
    level: Literal["info", "warning"] = "info"
    kind: Literal["message", "status"] = "message"


@dataclass(frozen=True)
class Completed:
    response_id: str | None = None
    container_id: str | None = None
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Failed:
    """The stream itself said the turn failed: the API reported an error or an incomplete response
    (``api``), or the turn hit a limit such as the step cap (``limit``).

    Only in-band failures are events; errors raised on our side (HTTP, broken stream, sandbox,
    interrupt, configuration) stay exceptions and reach the user with their own class.
    """

    message: str
    kind: Literal["api", "limit"] = "api"


Event = (
    TurnStarted
    | CallStarted
    | CodeDelta
    | CodeDone
    | CallStatus
    | Logs
    | Image
    | RichOutput
    | ExecutionError
    | TextDelta
    | TextDone
    | ThinkingDelta
    | FileCited
    | Notice
    | Completed
    | Failed
)
