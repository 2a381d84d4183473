"""The one protocol every backend implements: containers, container files, and a turn stream.

Shapes mirror OpenAI's Containers API so the local sandbox and OpenAI are interchangeable.
All methods are coroutines; the session calls them from the bridge's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ci_magic.events import Event

__all__ = [
    "Backend",
    "ContainerFile",
    "ContainerInfo",
    "Conversation",
    "TurnRequest",
]

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
    extra_headers: dict[str, str] = field(default_factory=dict)


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

    async def download_file(self, container_id: str, file_id: str) -> bytes: ...

    async def delete_file(self, container_id: str, file_id: str) -> None: ...

    def stream(self, request: TurnRequest) -> AsyncIterator[Event]:
        """Run one turn and yield its events; ends with Completed or Failed.

        Infrastructure errors raise ``ci_magic.errors.BackendError``/``SandboxError``;
        the code's own errors are ``ExecutionError`` events.
        Updates ``request.conversation`` in place when the turn completes.
        """

    async def aclose(self) -> None: ...
