"""Status: the session as ``%ci_status`` shows it, with its container checked now.

The check never replaces the container (the next turn does that, with its notices) and never fails:
a container that is gone, expired, or cannot be checked is said in the status itself. The data goes
back to the caller; :mod:`~ci_magic.render.reports` shows it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from ci_magic.backends.base import Backend, ContainerInfo, Conversation
from ci_magic.costs import CostLedger
from ci_magic.errors import BackendError
from ci_magic.events import Usage
from ci_magic.variables.transfer import FileRow

__all__ = ["Status", "StatusSource", "check_status"]


@dataclass(frozen=True)
class Status:
    """What ``%ci_status`` shows: the backend and model in force and the container as checked now."""

    backend: str
    model: str
    container_id: str | None
    container_status: str
    expires_at: int | None = None
    files: list[FileRow] | None = None  # None: not listed (no usable container)
    usage: Usage = dataclasses.field(default_factory=Usage)
    turns: int = 0
    conversation: str = "none yet"
    costs: CostLedger | None = None  # the session's cost and time totals so far


class StatusSource(Protocol):
    """What the status reads of a ``Session`` (and its container, refreshed when the check finds it)."""

    backend: Backend
    container: ContainerInfo | None
    conversation: Conversation
    usage: Usage
    turns: int
    ledger: CostLedger

    async def file_rows(self) -> list[FileRow]: ...


async def check_status(session: StatusSource, *, model: str) -> Status:
    """``session``'s status with ``model`` in force, its container checked now (and its files listed
    when it is usable)."""
    container, files, state = session.container, None, "not created yet"
    if container is not None:
        try:
            current = await session.backend.get_container(container.id)
            if current is not None and current.usable:
                session.container = container = current
                files, state = await session.file_rows(), current.status
            else:
                gone = "gone" if current is None else current.status
                state = f"{gone}: the next cell starts a new container and re-sends the files you pushed"
        except BackendError as error:
            state = f"unknown, the check failed: {error.message}"
    talk = session.conversation
    return Status(
        backend=session.backend.name,
        model=model,
        container_id=container.id if container else None,
        container_status=state,
        expires_at=container.expires_at if container and files is not None else None,
        files=files,
        usage=session.usage,
        turns=session.turns,
        conversation=talk.previous_response_id or f"{len(talk.messages)} messages",
        costs=dataclasses.replace(session.ledger),
    )
