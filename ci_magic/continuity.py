"""Continuity: the user's work carries on when the session's container does not.

A container is lost in three ways: it expires (OpenAI, after idle minutes), it is gone (a gateway
culled its kernel, someone deleted it), or it outlives the kernel that made it (a kernel restart,
after which the next cell must find it again). Each time, the user expects the next cell to work
as if nothing happened. :class:`Continuity` is the one place that makes it so:

- **replace**: a new container, with every pushed file and the ``always_push`` files re-sent;
- **restore**: the old container's successful code re-run there (:mod:`~ci_magic.restore` plans
  and runs it; here is when, with which paths, and what the model is told);
- **reattach**: after a kernel restart, the saved container is adopted and its files relinked;
- **carry over**: when the server refuses the conversation chained to an expired container, the
  session's own transcript goes as the conversation instead.

Named for what the user keeps (files, variables, the conversation), not for the container: the
turn itself (streaming, downloads, the Result) stays in :mod:`~ci_magic.session`, which owns a
``Continuity`` and asks it for a usable container before each turn and push.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

from ci_magic.backends.base import Backend, ContainerFile, ContainerInfo, Conversation
from ci_magic.downloads import is_show_image_file
from ci_magic.errors import BackendError, CIError
from ci_magic.events import Notice
from ci_magic.known_files import KnownFiles
from ci_magic.restore import defined_names, plan_restore, run_restore, summary_line
from ci_magic.session_settings import SessionSettings
from ci_magic.transcript import Transcript, TurnEntry
from ci_magic.variables.discover import always_push_items
from ci_magic.variables.registry import PushRegistry
from ci_magic.variables.transfer import ContainerFiles

__all__ = [
    "CARRIED_OVER",
    "RECREATED_NOTE",
    "RESTORED_NOTE",
    "Continuity",
    "OwningSession",
    "container_still_usable",
    "refuses_chain",
]

RECREATED_NOTE = (
    "The previous container expired and was replaced by a new one: files sent from the notebook were "
    "uploaded again, but variables and other in-memory state from earlier code are gone; re-create "
    "what you need."
)
RESTORED_NOTE = (
    "The previous container expired and was replaced by a new one: files sent from the notebook were "
    "uploaded again, and the code that had run successfully before was run again there, in order{names}."
)
CARRIED_OVER = (
    "The server no longer accepts the earlier conversation (its container expired), so the conversation "
    "was carried over: the model received the session's own record of it."
)
# Backends whose containers lose their in-memory state when the notebook's kernel restarts (the
# local sandbox dies with its parent by design); elsewhere the container keeps running remotely.
STATE_LOST_ON_RESTART = frozenset({"local"})
CHECKED_FIRST = frozenset({"local"})  # backends whose container check costs nothing: done before the turn


class OwningSession(Protocol):
    """What continuity reads and changes of the ``Session`` that owns it (settings are read at each
    use, since the session applies configuration changes between cells)."""

    backend: Backend
    session_id: str
    settings: SessionSettings
    container: ContainerInfo | None
    conversation: Conversation
    transcript: Transcript
    registry: PushRegistry
    known_files: KnownFiles
    turns: int
    model: str
    instructions: str

    def files(self, container: ContainerInfo, *, uploading: bool = False) -> ContainerFiles: ...


class Continuity:
    """Keeps a session's container usable, and what the user built in it, across loss and restarts."""

    def __init__(self, session: OwningSession) -> None:
        self.session = session
        self._restore_from: str | None = None  # the replaced container whose state is still to re-run
        self._moved_paths: dict[str, str] = {}  # pushed files' paths in the old container -> the new one
        self._reattaching = False  # the container came from a state file: check it and say so once

    def can_check_beside_turn(self) -> bool:
        """Whether the container check may run beside the model request (hiding its latency): not
        for a container to reattach (checked and announced first), nor where a check costs nothing."""
        s = self.session
        return s.container is not None and not self._reattaching and s.backend.name not in CHECKED_FIRST

    async def ready(
        self,
        *,
        verify: bool = True,
        model: str = "",
        instructions: str = "",
        extra_headers: dict[str, str] | None = None,
    ) -> tuple[ContainerInfo, list[Notice]]:
        """The session's usable container, created, replaced or reattached as needed and with the
        replaced one's state re-run (as ``model`` with ``instructions``, where that needs a model),
        with the notices to show. ``verify=False`` takes the current container unchecked (the turn
        checks it concurrently)."""
        container, notices = await self._container(verify=verify)
        if self._restore_from is not None:
            notices.extend(await self._restore_state(container, model, instructions, extra_headers))
        return container, notices

    def carry_over(self, error: BackendError) -> Notice | None:
        """After ``error`` refused the server-side chain (see :func:`refuses_chain`), continue without
        it: the transcript goes as the conversation's messages. None: not such a refusal."""
        conversation = self.session.conversation
        if not conversation.previous_response_id or not refuses_chain(error):
            return None
        conversation.previous_response_id = None
        conversation.messages[:] = self.session.transcript.as_messages()
        return Notice(CARRIED_OVER)

    def resume(self, *, reattach: bool) -> None:
        """The session took over a previous kernel's saved state: check (and announce) its container
        at the next use; with no server-side chain, the transcript is the conversation so far."""
        s = self.session
        self._reattaching = reattach
        if s.conversation.previous_response_id is None and s.transcript.conversation():
            # Chat backends keep history client-side, and it died with the kernel.
            s.conversation.messages[:] = s.transcript.as_messages()

    def forget(self) -> None:
        """The session was reset: nothing is left to restore or reattach."""
        self._restore_from = None
        self._moved_paths = {}
        self._reattaching = False

    # -- the container: checked, reattached, or replaced --------------------------------------

    async def _container(self, *, verify: bool) -> tuple[ContainerInfo, list[Notice]]:
        """The current container if it is usable (reattached, the first time after a restart), else a
        new one with the pushed files re-sent; its state's re-run is planned, not done, here."""
        s = self.session
        notices: list[Notice] = []
        if s.container is not None and not verify:
            return s.container, notices
        if s.container is not None:
            reattaching, self._reattaching = self._reattaching, False
            current = await self._current(s.container.id, reattaching)
            if current is not None and current.usable:
                s.container = current
                if reattaching:
                    notices.append(await self._reattached(current))
                return current, notices
            state = "is gone" if current is None else f"is {current.status}"
            notices.append(
                Notice(f"Container {s.container.id} {state}; started a new one and re-sent your files.")
            )
            self._replaced(s.container.id)
        old = s.container
        old_paths = {e.name: e.path for e in s.registry if old is not None and e.in_container(old.id)}
        s.known_files.new_container()
        new = s.container = await s.backend.create_container(
            name=f"ci-magic-{s.session_id}",
            memory_limit=s.settings.memory_limit,  # type: ignore[arg-type]
            expires_after_minutes=s.settings.expires_after_minutes,
        )
        notices.extend(await self._restore_files(new))
        # OpenAI stores an upload under a new random prefix in each container: recorded code that read
        # the old path reads the new one when it is re-run.
        self._moved_paths = {
            old_paths[e.name]: e.path
            for e in s.registry
            if e.name in old_paths and e.in_container(new.id) and old_paths[e.name] != e.path
        }
        return new, notices

    async def _current(self, container_id: str, reattaching: bool) -> ContainerInfo | None:
        """The container as the backend sees it; one from before a kernel restart is adopted first
        (a gateway kernel this process did not start)."""
        s = self.session
        adopt = getattr(s.backend, "adopt", None) if reattaching else None
        if adopt is not None:
            adopted: ContainerInfo | None = await adopt(
                container_id,
                expires_after_minutes=s.settings.expires_after_minutes,
                memory_limit=s.settings.memory_limit,
            )
            return adopted
        return await s.backend.get_container(container_id)

    async def _reattached(self, container: ContainerInfo) -> Notice:
        """Reattach to the container of the session before the kernel restart: learn its files (not
        new to this turn), and plan to re-run its state where the restart took it away."""
        s = self.session
        listing = await s.backend.list_files(container.id)
        s.known_files.learn(listing)
        relink_registry(s.registry, container.id, listing)
        if s.backend.name in STATE_LOST_ON_RESTART:
            self._replaced(container.id)
            return Notice(
                f"Reattached to container {container.id} after the kernel restart: its files are there; "
                "its in-memory state is re-run below."
                if self._restore_from
                else f"Reattached to container {container.id} after the kernel restart: its files are there."
            )
        return Notice(
            f"Reattached to container {container.id} after the kernel restart; the conversation continues."
        )

    def _replaced(self, old_id: str) -> None:
        """The container ``old_id`` lost its in-memory state: re-run it before the next turn (or, with
        restore off or nothing to re-run, tell the model it is gone)."""
        s = self.session
        if s.settings.restore_on_expiry == "replay" and s.transcript.code_in(old_id):
            self._restore_from = old_id
        elif s.turns or len(s.transcript):
            s.conversation.notes.append(RECREATED_NOTE)

    async def _restore_files(self, container: ContainerInfo) -> list[Notice]:
        """A new container gets back every pushed file, then the ``always_push`` files."""
        files = self.session.files(container, uploading=True)
        restored = await files.reupload()
        notices = [Notice(f"{o.name}: {o.note}", level="warning") for o in restored if not o.sent]
        always_push = self.session.settings.always_push
        if always_push:
            await files.push(always_push_items(always_push))
        return notices

    # -- the state: re-run where it was lost --------------------------------------------------

    async def _restore_state(
        self,
        container: ContainerInfo,
        model: str,
        instructions: str,
        extra_headers: dict[str, str] | None,
    ) -> list[Notice]:
        """Re-run the replaced container's successful code in ``container`` (``restore.py``)."""
        s = self.session
        old, self._restore_from = self._restore_from, None
        if old is None:
            return []
        blocks = [
            dataclasses.replace(b, code=with_paths(b.code, self._moved_paths))
            for b in s.transcript.code_in(old)
        ]
        plan = plan_restore(blocks, time_limit=s.settings.restore_time_limit)
        if plan.skip is not None:
            s.conversation.notes.append(RECREATED_NOTE)
            return [Notice(plan.skip, level="warning")]
        started = time.time()
        try:
            outcome = await run_restore(
                s.backend,
                container.id,
                plan.blocks,
                model=model or s.model,
                instructions=instructions or s.instructions,
                extra_headers=extra_headers,
            )
        except asyncio.CancelledError:
            self._restore_from = old  # Ctrl-C: the next turn restores again, from the start
            raise
        try:
            listing = await s.backend.list_files(container.id)
        except CIError:
            listing = []  # the count of files back is only for the summary line
        fresh = [f for f in listing if s.known_files.is_new(f)]
        s.known_files.learn(listing)
        files = [f for f in fresh if not is_show_image_file(f)]
        s.transcript.add(
            TurnEntry(
                kind="restore",
                prompt=f"restore of {old}",
                calls=list(outcome.ran) + ([outcome.failed] if outcome.failed else []),
                started_at=started,
                seconds=outcome.seconds,
                container_id=container.id,
                ok=outcome.failed is None and outcome.problem is None,
                error=outcome.problem or (outcome.failed.error if outcome.failed else None),
            )
        )
        names = list(dict.fromkeys(n for b in outcome.ran for n in defined_names(b.code)))
        if outcome.ran:
            listed = f" (so {', '.join(names[:12])} exist again)" if names else ""
            s.conversation.notes.append(RESTORED_NOTE.format(names=listed))
        else:
            s.conversation.notes.append(RECREATED_NOTE)
        complete = outcome.failed is None and outcome.problem is None
        line = summary_line(outcome, total=len(plan.blocks), files=len(files))
        return [Notice(line, level="info" if complete else "warning")]


def with_paths(code: str, moved: dict[str, str]) -> str:
    """``code`` reading each pushed file at its path in the new container."""
    for old, new in moved.items():
        code = code.replace(old, new)
    return code


def refuses_chain(error: BackendError) -> bool:
    """OpenAI's refusals of a ``previous_response_id``: its container expired (400 "Container is
    expired."), or the response itself is gone (400 "Previous response ... not found")."""
    text = error.message.lower()
    return error.status_code == 400 and (
        "container is expired" in text or ("previous response" in text and "not found" in text)
    )


def relink_registry(registry: PushRegistry, container_id: str, listing: Sequence[ContainerFile]) -> None:
    """Pushed files found again in a reattached container, by path (a gateway numbers files anew)."""
    by_path = {f.path: f for f in listing}
    by_id = {f.id for f in listing}
    for entry in registry:
        if entry.container_id != container_id or entry.file_id in by_id:
            continue
        found = by_path.get(entry.path)
        if found is None:
            registry.detach(entry.name)
        else:
            registry.put(dataclasses.replace(entry, file_id=found.id))


async def container_still_usable(check: asyncio.Future[ContainerInfo | None]) -> bool:
    """The outcome of the check that ran beside a failed request: False only when it found the
    container gone or expired (a check that failed cannot tell, so the turn's own error stands)."""
    try:
        current = await check
    except CIError:
        return True
    return current is not None and current.usable
