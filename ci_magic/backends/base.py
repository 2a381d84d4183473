"""The one protocol every backend implements: containers, container files, and a turn stream.

Shapes mirror OpenAI's Containers API so the local sandbox and OpenAI are interchangeable.
All methods are coroutines; the session calls them from the bridge's event loop.

Every byte that comes from a container is bounded before it is read: ``download_file`` streams
into a destination file the caller names, checks the size the container reports before reading,
and stops at ``max_bytes`` whatever the reported size said (:class:`~ci_magic.errors.FileTooLarge`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ci_magic.errors import FileTooLarge
from ci_magic.events import Event

__all__ = [
    "DEFAULT_DOWNLOAD_SIZE_CAP",
    "DOWNLOAD_CHUNK_BYTES",
    "Backend",
    "ContainerFile",
    "ContainerInfo",
    "ContainerRecord",
    "Conversation",
    "FileRecord",
    "TurnRequest",
    "check_reported_size",
    "discard_download",
    "open_download_target",
    "size_text",
    "stream_past_cap",
]

DEFAULT_DOWNLOAD_SIZE_CAP = 256 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1 << 20  # what a download holds in memory at once
ALLOCATION_SLACK = 1 << 20  # blocks and extents round a file's allocation up by less than this

MemoryLimit = Literal["1g", "4g", "16g", "64g"]


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    status: str  # "running" | "active" | "expired" | "deleted" | ...
    created_at: int
    last_active_at: int | None = None
    expires_after_minutes: int | None = None
    memory_limit: str | None = None

    @property
    def usable(self) -> bool:
        return self.status in ("running", "active")

    @property
    def expires_at(self) -> int | None:
        if self.expires_after_minutes is None:
            return None
        anchor = self.last_active_at or self.created_at
        return anchor + 60 * self.expires_after_minutes


@dataclass
class FileRecord:
    """What a backend that keeps its own file table (local, gateway) knows of one container file."""

    id: str
    created_at: int
    source: str  # "user" | "assistant"
    bytes: int


@dataclass
class ContainerRecord:
    """A backend's own, mutable record of one container; :meth:`info` is what the session sees."""

    id: str
    name: str
    created_at: int
    last_active_at: int
    expires_after_minutes: int
    memory_limit: str
    status: str  # "running" | "expired"

    def info(self) -> ContainerInfo:
        return ContainerInfo(
            id=self.id,
            name=self.name,
            status=self.status,
            created_at=self.created_at,
            last_active_at=self.last_active_at,
            expires_after_minutes=self.expires_after_minutes,
            memory_limit=self.memory_limit,
        )


@dataclass(frozen=True)
class ContainerFile:
    id: str
    container_id: str
    path: str  # absolute path inside the container, e.g. /mnt/data/df.parquet
    bytes: int | None
    created_at: int
    source: str  # "user" | "assistant"

    @property
    def name(self) -> str:
        """The path relative to /mnt/data (may contain sub-folders; sanitize before saving)."""
        prefix = "/mnt/data/"
        return self.path[len(prefix) :] if self.path.startswith(prefix) else self.path.lstrip("/")


@dataclass
class Conversation:
    """Client-side conversation state; each backend uses the part it needs.

    ``previous_response_id`` chains OpenAI responses; ``messages`` is the Chat Completions
    history the local backend keeps. ``notes`` are system notes for the next turn only
    (e.g. "the container was recreated, in-memory state is lost").
    """

    previous_response_id: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.previous_response_id = None
        self.messages.clear()
        self.notes.clear()


@dataclass(frozen=True)
class TurnRequest:
    prompt: str
    container_id: str
    model: str
    instructions: str
    conversation: Conversation
    context: str = ""  # schema cards of notebook files, prepended to the prompt
    exec_code: str | None = None  # %%ci_exec: run this code verbatim, no model
    # Headers may carry credentials (Authorization, api-key): never in a repr or a log line.
    extra_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def user_text(self) -> str:
        """What the model reads as the user's turn: this turn's notes, the notebook files' schema
        cards, then the prompt. (Notes ride here, not in a system message: many chat templates
        reject a system message mid-conversation.)"""
        parts = [f"Note: {note}" for note in self.conversation.notes]
        if self.context.strip():
            parts.append(self.context.strip())
        parts.append(self.prompt)
        return "\n\n".join(parts)


@runtime_checkable
class Backend(Protocol):
    name: str

    async def create_container(
        self, *, name: str, memory_limit: MemoryLimit, expires_after_minutes: int
    ) -> ContainerInfo: ...

    async def get_container(self, container_id: str) -> ContainerInfo | None:
        """The container, or None when it no longer exists."""

    async def delete_container(self, container_id: str) -> None: ...

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        """Upload to /mnt/data/<filename>."""

    async def list_files(self, container_id: str) -> list[ContainerFile]: ...

    async def download_file(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        """Stream the file into ``dest`` (a new file: see ``open_download_target``); its byte count.

        Refuses with ``FileTooLarge`` before reading when the container reports more than
        ``max_bytes`` (apparent or allocated size), and stops reading at ``max_bytes`` when it
        reported less. Refuses anything that is not a regular file (symlink, FIFO, device).
        On any failure ``dest`` is removed, so nothing partial is left behind.
        """

    async def delete_file(self, container_id: str, file_id: str) -> None: ...

    def stream(self, request: TurnRequest) -> AsyncIterator[Event]:
        """Run one turn and yield its events; ends with Completed or Failed.

        Infrastructure errors raise ``ci_magic.errors.BackendError``/``SandboxError``;
        the code's own errors are ``ExecutionError`` events.
        Updates ``request.conversation`` in place when the turn completes.
        """

    async def aclose(self) -> None: ...


def size_text(size: int) -> str:
    """Bytes in binary units, as a person reads them: ``1.5 GB``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_reported_size(what: str, size: int | None, allocated: int | None = None, *, max_bytes: int) -> None:
    """Raise ``FileTooLarge`` when the reported size, or the allocated size, is over ``max_bytes``.

    Allocation is rounded up to blocks and extents (a 44-byte file holds 4 KB on disk), so only an
    allocation clearly past the cap counts: more than ``ALLOCATION_SLACK`` over it.
    """
    over = size is not None and size > max_bytes
    over_allocated = allocated is not None and allocated > max_bytes + ALLOCATION_SLACK
    if over or over_allocated:
        shown = max(known for known in (size, allocated) if known is not None)
        raise FileTooLarge(
            f"{what} is {size_text(shown)}, more than the {size_text(max_bytes)} a download may take, so "
            "nothing was read or saved.",
            size=shown,
            limit=max_bytes,
        )


def stream_past_cap(what: str, max_bytes: int) -> FileTooLarge:
    return FileTooLarge(
        f"{what} turned out larger than the {size_text(max_bytes)} a download may take (it grew, or its "
        "size was not reported), so the download was stopped and nothing was saved.",
        size=None,
        limit=max_bytes,
    )


def open_download_target(dest: Path) -> int:
    """A write descriptor on ``dest``, which must not exist yet: a symlink there is never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(dest, flags, 0o644)


def discard_download(dest: Path) -> None:
    """Remove a partial download (the caller's temporary file) after a failure."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
