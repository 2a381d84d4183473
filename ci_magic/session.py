"""Session: the state of one kernel's code interpreter and the flow of one turn.

Owns the backend, the container (and its recreation when it expires), the conversation, the
registry of pushed files and usage totals. ``run_turn`` is the one flow:
container check -> push -> backend.stream -> view + ResultBuilder -> file downloads -> Result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ci_magic.backends.base import (
    DEFAULT_DOWNLOAD_SIZE_CAP,
    Backend,
    ContainerFile,
    ContainerInfo,
    Conversation,
    TurnRequest,
    size_text,
)
from ci_magic.config import Settings, output_dir_message, output_dir_problem
from ci_magic.costs import CostLedger
from ci_magic.errors import (
    BackendError,
    CIError,
    ConfigurationError,
    ContainerFileError,
    FileTooLarge,
    Interrupted,
)
from ci_magic.events import CallStarted, Event, FileCited, Image, Notice, TextDelta, Usage
from ci_magic.filenames import download_into, safe_relative_name, save_into
from ci_magic.provenance import record_turn
from ci_magic.restore import defined_names, plan_restore, run_restore, summary_line
from ci_magic.result import LOG_KEEP_CHARS, LogText, Result, ResultBuilder, SavedFile
from ci_magic.transcript import CallTimer, Transcript, TurnEntry, TurnKind, turn_record
from ci_magic.variables.discover import always_push_items
from ci_magic.variables.formats import extension_for_mime, is_shown_image
from ci_magic.variables.progress import Progress
from ci_magic.variables.registry import PushRegistry, PushRequest
from ci_magic.variables.transfer import (
    DEFAULT_PULL_MEMORY_CAP,
    DEFAULT_SIZE_CAP,
    ContainerFiles,
    FileRow,
    PulledFile,
    PushOutcome,
)

__all__ = [
    "DEFAULT_DOWNLOAD_TURN_BUDGET",
    "Session",
    "Status",
    "TurnOptions",
    "View",
    "kernel_session_id",
    "session_settings",
]

DEFAULT_DOWNLOAD_TURN_BUDGET = 1024 * 1024 * 1024  # all automatic downloads of one turn together

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


class View(Protocol):
    """What a turn reports to: it folds each event into its ``builder`` and shows what changed."""

    builder: ResultBuilder

    def handle(self, event: Event) -> None: ...

    def tick(self) -> None: ...

    def finish(self, result: Result | None = None, *, link_base: Path | None = None) -> None: ...


class SilentView:
    """Folds the events into the Result and shows nothing (``display=False``)."""

    def __init__(self, prompt: str = "") -> None:
        self.builder = ResultBuilder(prompt)

    def handle(self, event: Event) -> None:
        self.builder.feed(event)

    def tick(self) -> None:
        pass

    def finish(self, result: Result | None = None, *, link_base: Path | None = None) -> None:
        pass


@dataclass(frozen=True)
class TurnOptions:
    model: str
    instructions: str
    new_conversation: bool = False
    exec_code: str | None = None
    extra_headers: dict[str, str] | None = None
    kind: TurnKind | None = None  # how the transcript records it (None: "exec" with exec_code, else "ci")


class Session:
    def __init__(
        self,
        backend: Backend,
        *,
        session_id: str,
        memory_limit: str,
        expires_after_minutes: int,
        output_dir: Path,
        download_concurrency: int = 4,
        download_size_cap: int = DEFAULT_DOWNLOAD_SIZE_CAP,
        download_turn_budget: int = DEFAULT_DOWNLOAD_TURN_BUDGET,
        registry: PushRegistry | None = None,
        upload_size_cap: int = DEFAULT_SIZE_CAP,
        pull_memory_cap: int = DEFAULT_PULL_MEMORY_CAP,
        always_push: Sequence[str] = (),
        progress: Callable[[], Progress | None] = lambda: None,
        restore_on_expiry: str = "replay",
        restore_time_limit: float = 60.0,
        prices: dict[str, Any] | None = None,
        transcript: Transcript | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``registry``: pushed files to carry over from a previous session (default: a new one);
        ``always_push``: files and folders sent to every new container; ``progress`` makes the
        display large transfers report to; ``restore_on_expiry``/``restore_time_limit``: whether
        and within what a replacement container gets the old one's state re-run (``restore.py``);
        ``on_change`` is called after each turn, push and reset (to save the session's state)."""
        self.backend = backend
        self.session_id = session_id
        self.memory_limit = memory_limit
        self.expires_after_minutes = expires_after_minutes
        self.output_dir = output_dir
        self.download_concurrency = max(1, download_concurrency)
        self.download_size_cap = download_size_cap
        self.download_turn_budget = download_turn_budget
        # Survives container expiry and backend changes: everything in it is re-sent to a new container.
        self.registry = registry if registry is not None else PushRegistry()
        self.upload_size_cap = upload_size_cap
        self.pull_memory_cap = pull_memory_cap
        self.always_push = list(always_push)
        self.progress = progress
        self.container: ContainerInfo | None = None
        self.conversation = Conversation()
        self.usage = Usage()
        self.turns = 0
        self._made_by_exec: set[str] = set()  # file ids %%ci_exec code wrote: the user's, not the model's
        self._sizes: dict[str, int] = {}  # file id -> bytes saved locally (listings may not say)
        self._seen_files: set[str] = set()  # container file ids already known: not "new" in a turn
        self.restore_on_expiry = restore_on_expiry
        self.restore_time_limit = restore_time_limit
        self.transcript = transcript if transcript is not None else Transcript()
        self.on_change = on_change
        self.prices = dict(prices or {})  # CodeInterpreter.prices: overrides of costs.DEFAULT_PRICES
        self.ledger = CostLedger()  # the session's running cost and time totals
        self.model = ""  # the last turn's model: a restore outside a turn (%ci_push) uses it
        self.instructions = ""
        self._restore_from: str | None = None  # the replaced container whose state is still to re-run
        self._moved_paths: dict[str, str] = {}  # pushed files' paths in the old container -> the new one
        self._reattaching = False  # the container came from a state file: check it and say so once

    # -- container lifecycle -------------------------------------------------------------------

    async def ensure_container(self, *, verify: bool = True) -> tuple[ContainerInfo, list[Notice]]:
        """The session's usable container, created or replaced as needed, with notices to show.

        ``verify=False`` returns the current container unchecked (the turn checks it concurrently).
        """
        notices: list[Notice] = []
        if self.container is not None and not verify:
            return self.container, notices
        if self.container is not None:
            reattaching, self._reattaching = self._reattaching, False
            current = await self._current(self.container.id, reattaching)
            if current is not None and current.usable:
                self.container = current
                if reattaching:
                    notices.append(await self._reattached(current))
                return current, notices
            state = "is gone" if current is None else f"is {current.status}"
            notices.append(
                Notice(f"Container {self.container.id} {state}; started a new one and re-sent your files.")
            )
            self._replaced(self.container.id)
        old_paths = {
            e.name: e.path for e in self.registry if self.container and e.in_container(self.container.id)
        }
        self._seen_files.clear()
        self.container = await self.backend.create_container(
            name=f"ci-magic-{self.session_id}",
            memory_limit=self.memory_limit,  # type: ignore[arg-type]
            expires_after_minutes=self.expires_after_minutes,
        )
        notices.extend(await self._restore_files(self.container))
        # OpenAI stores an upload under a new random prefix in each container: recorded code that read
        # the old path reads the new one when it is re-run.
        self._moved_paths = {
            old_paths[e.name]: e.path
            for e in self.registry
            if e.name in old_paths and e.in_container(self.container.id) and old_paths[e.name] != e.path
        }
        return self.container, notices

    async def _current(self, container_id: str, reattaching: bool) -> ContainerInfo | None:
        """The container as the backend sees it; one from before a kernel restart is adopted first
        (a gateway kernel this process did not start)."""
        adopt = getattr(self.backend, "adopt", None) if reattaching else None
        if adopt is not None:
            adopted: ContainerInfo | None = await adopt(
                container_id, expires_after_minutes=self.expires_after_minutes, memory_limit=self.memory_limit
            )
            return adopted
        return await self.backend.get_container(container_id)

    async def _reattached(self, container: ContainerInfo) -> Notice:
        """Reattach to the container of the session before the kernel restart: learn its files (not
        new to this turn), and plan to re-run its state where the restart took it away."""
        listing = await self.backend.list_files(container.id)
        self._seen_files.update(f.id for f in listing)
        _relink_registry(self.registry, container.id, listing)
        if self.backend.name in STATE_LOST_ON_RESTART:
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
        if self.restore_on_expiry == "replay" and self.transcript.code_in(old_id):
            self._restore_from = old_id
        elif self.turns or len(self.transcript):
            self.conversation.notes.append(RECREATED_NOTE)

    async def _restore_state(self, container: ContainerInfo, options: TurnOptions | None) -> list[Notice]:
        """Re-run the replaced container's successful code in ``container`` (``restore.py``)."""
        old, self._restore_from = self._restore_from, None
        if old is None:
            return []
        blocks = [
            dataclasses.replace(b, code=_with_paths(b.code, self._moved_paths))
            for b in self.transcript.code_in(old)
        ]
        plan = plan_restore(blocks, time_limit=self.restore_time_limit)
        if plan.skip is not None:
            self.conversation.notes.append(RECREATED_NOTE)
            return [Notice(plan.skip, level="warning")]
        started = time.time()
        try:
            outcome = await run_restore(
                self.backend,
                container.id,
                plan.blocks,
                model=(options.model if options else "") or self.model,
                instructions=(options.instructions if options else "") or self.instructions,
                extra_headers=dict(options.extra_headers or {}) if options else None,
            )
        except asyncio.CancelledError:
            self._restore_from = old  # Ctrl-C: the next turn restores again, from the start
            raise
        try:
            listing = await self.backend.list_files(container.id)
        except CIError:
            listing = []  # the count of files back is only for the summary line
        fresh = [f for f in listing if f.id not in self._seen_files and f.source != "user"]
        self._seen_files.update(f.id for f in listing)
        files = [f for f in fresh if not _is_show_image(f)]
        self.transcript.add(
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
            self.conversation.notes.append(RESTORED_NOTE.format(names=listed))
        else:
            self.conversation.notes.append(RECREATED_NOTE)
        complete = outcome.failed is None and outcome.problem is None
        line = summary_line(outcome, total=len(plan.blocks), files=len(files))
        return [Notice(line, level="info" if complete else "warning")]

    def resume(
        self,
        container: ContainerInfo | None,
        *,
        previous_response_id: str | None,
        transcript: Transcript,
        turns: int,
        model: str,
    ) -> None:
        """Take over the session a previous kernel saved (``state_file.py``): its container is checked
        by the next cell, which reattaches (or replaces it and restores its state)."""
        self.container = container
        self.conversation.previous_response_id = previous_response_id
        self.transcript = transcript
        self.turns = turns
        self.model = model
        self._reattaching = container is not None
        if previous_response_id is None and transcript.conversation():
            # No server-side chain (chat backends keep history client-side, and it died with the
            # kernel): the transcript is the conversation so far.
            self.conversation.messages[:] = transcript.as_messages()

    async def reset(self, backend: Backend | None = None) -> None:
        """A new container and a fresh conversation (the push registry is kept); turns count from 0.

        ``backend``: replace the backend too (built from the current configuration and environment).
        """
        old, self.container = self.container, None
        self.conversation.reset()
        self.turns = 0
        self.transcript.clear()
        self._restore_from = None
        self._reattaching = False
        if old is not None:
            with contextlib.suppress(CIError, OSError):
                await self.backend.delete_container(old.id)
        if backend is not None:
            previous, self.backend = self.backend, backend
            with contextlib.suppress(CIError, OSError, RuntimeError):
                await previous.aclose()

    def describe_file(self, row: FileRow) -> FileRow:
        """A listing row with what the session knows: its size once saved, and who wrote it."""
        size = row.size if row.size is not None else self._sizes.get(row.file_id)
        source = "notebook" if row.file_id in self._made_by_exec else row.source
        return dataclasses.replace(row, size=size, source=source)

    async def close(self, *, delete_container: bool) -> None:
        if delete_container and self.container is not None:
            with contextlib.suppress(CIError, OSError):
                await self.backend.delete_container(self.container.id)
        self.container = None
        await self.backend.aclose()

    # -- files: push, re-upload, pull, list ----------------------------------------------------

    def files(self, container: ContainerInfo, *, uploading: bool = False) -> ContainerFiles:
        """The file operations on ``container``, recording pushes in the session's registry
        (``uploading``: with a progress display for large uploads)."""
        return ContainerFiles(
            self.backend,
            container.id,
            self.registry,
            size_cap=self.upload_size_cap,
            concurrency=self.download_concurrency,
            progress=self.progress() if uploading else None,
            download_cap=self.download_size_cap,
            pull_memory_cap=self.pull_memory_cap,
        )

    async def push(self, requests: Sequence[PushRequest]) -> tuple[list[PushOutcome], list[Notice]]:
        """Push now (``%ci_push``), into the container (made or replaced as needed); its notices too."""
        container, notices = await self.ensure_container()
        if self._restore_from is not None:
            notices.extend(await self._restore_state(container, None))
        outcomes = await self.files(container, uploading=True).push(requests)
        self._changed()
        return outcomes, notices

    async def _restore_files(self, container: ContainerInfo) -> list[Notice]:
        """A new container gets back every pushed file, then the ``always_push`` files."""
        files = self.files(container, uploading=True)
        restored = await files.reupload()
        notices = [Notice(f"{o.name}: {o.note}", level="warning") for o in restored if not o.sent]
        if self.always_push:
            await files.push(always_push_items(self.always_push))
        return notices

    async def _push_for_turn(
        self, container: ContainerInfo, push: Sequence[PushRequest], report: Callable[[Notice], None]
    ) -> str:
        """Push what the prompt needs, one line per file sent; then the cards of every notebook file."""
        if push:
            for outcome in await self.files(container, uploading=True).push(push):
                if outcome.sent:
                    report(Notice(outcome.line))
        return self.registry.cards(container.id)

    async def pull(self, name: str) -> PulledFile:
        return await self.files(self._existing_container("pull files")).pull(name, self._pull_folder())

    async def pull_all(self) -> list[PulledFile]:
        return await self.files(self._existing_container("pull files")).pull_all(self._pull_folder())

    def _pull_folder(self) -> Path:
        """``output_dir``, checked again: sys.path may have gained it since it was set."""
        problem = output_dir_problem(self.output_dir)
        if problem is not None:
            raise ConfigurationError(
                output_dir_message(self.output_dir, problem, outcome="nothing was pulled")
            )
        return self.output_dir

    async def file_rows(self) -> list[FileRow]:
        """The container's files, as ``%ci_files`` lists them ([] before the first container), with
        what the session knows: sizes of files it saved, and files %%ci_exec wrote as the user's."""
        if self.container is None:
            return []
        return [self.describe_file(row) for row in await self.files(self.container).listing()]

    def _existing_container(self, doing: str) -> ContainerInfo:
        if self.container is None:
            raise ContainerFileError(
                f"There is no container yet, so there is nothing to {doing} from. Run a %%ci cell or "
                "%ci_push first."
            )
        return self.container

    # -- one turn ------------------------------------------------------------------------------

    async def run_turn(
        self,
        prompt: str,
        options: TurnOptions,
        view: View,
        *,
        push: Sequence[PushRequest] = (),
        link_base: Path | None = None,
    ) -> Result:
        """One turn, after pushing ``push`` (one notice per file sent); returns its Result. A failure
        is ``result.error`` (raised by the caller), whose ``result`` is this Result: what arrived
        before it stays shown and recorded."""
        started = time.monotonic()
        started_at = time.time()
        builder = view.builder
        builder.result.prompt = prompt
        if options.new_conversation:
            self.conversation.reset()
        self.model, self.instructions = options.model or self.model, options.instructions
        timer = CallTimer()
        ticker = asyncio.ensure_future(_tick_every(view, 0.1))
        try:
            await self._run_in_container(prompt, options, view, builder, push, timer)
        except asyncio.CancelledError:
            # Ctrl-C: the bridge cancelled this task and waits for what it returns.
            builder.fail(
                Interrupted(
                    "Interrupted. The kernel, the container, its files and the conversation are intact; "
                    "run the cell again when ready."
                )
            )
        except CIError as error:
            builder.fail(error)
        finally:
            ticker.cancel()
        result = builder.result
        result.wall_time = time.monotonic() - started
        if self.container is not None:
            result.container_id = result.container_id or self.container.id
        self.turns += 1
        self.usage = self.usage + result.usage
        self._save_long_logs(result)
        result.files = _displayed_copies_marked(result)
        for saved in result.files:
            if saved.file_id:
                self._sizes[saved.file_id] = saved.size
                if options.exec_code is not None:
                    self._made_by_exec.add(saved.file_id)
        # Images cited as displayed are not downloaded: their size is the displayed image's (in order).
        shown = [c.file_id for c in result.citations if c.displayed]
        for file_id, data in zip(shown, (d for call in result.calls for d in call.images), strict=False):
            self._sizes[file_id] = len(data)
        kind: TurnKind = options.kind or ("exec" if options.exec_code is not None else "ci")
        entry = self.transcript.add(turn_record(result, kind=kind, timer=timer, started_at=started_at))
        self.ledger.set_prices(self.prices)
        container = self.container if self.container and self.container.id == result.container_id else None
        record_turn(
            result,
            entry,
            builder,
            backend=self.backend.name,
            ledger=self.ledger,
            inputs=list(self.registry),
            memory_limit=self.memory_limit,
            container_created_at=float(container.created_at) if container and container.created_at else None,
            started_at=started_at,
        )
        self._changed()
        view.finish(result, link_base=link_base)
        return result

    def _changed(self) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):  # saving state never fails a cell
                self.on_change()

    async def _run_in_container(
        self,
        prompt: str,
        options: TurnOptions,
        view: View,
        builder: ResultBuilder,
        push: Sequence[PushRequest],
        timer: CallTimer,
    ) -> None:
        """Stream the turn in the session's container, checking that container concurrently.

        The check ("is it still running?") runs beside the model request, so it costs no latency.
        If the request fails before anything streamed and the check finds the container gone or
        expired, a new container is made (files re-sent, state re-run, the model told) and the turn
        runs again. If the server then refuses the conversation chain itself (OpenAI answers
        "Container is expired." for a ``previous_response_id`` whose container expired), the turn
        runs once more without the chain, carrying the conversation over from the transcript.
        """
        carried_over = False
        for attempt in (1, 2, 3):
            # A container made just now, or one verified on the retry, needs no check; a local one is
            # checked first (in-process, no latency to hide), since its stream starts before it runs.
            unverified = (
                attempt == 1
                and self.container is not None
                and not self._reattaching
                and self.backend.name not in CHECKED_FIRST
            )
            container, notices = await self.ensure_container(verify=not unverified)
            if self._restore_from is not None:
                notices.extend(await self._restore_state(container, options))
            for notice in notices:
                view.handle(notice)
            check = asyncio.ensure_future(self.backend.get_container(container.id)) if unverified else None
            downloads = _Downloads(
                self.backend,
                container.id,
                self._seen_files,
                self.output_dir,
                self.download_concurrency,
                _Allowance(self.download_size_cap, self.download_turn_budget),
            )
            streamed: list[Event] = []
            try:
                request = TurnRequest(
                    prompt=prompt,
                    container_id=container.id,
                    model=options.model,
                    instructions=options.instructions,
                    conversation=self.conversation,
                    context=await self._push_for_turn(container, push, view.handle),
                    exec_code=options.exec_code,
                    extra_headers=dict(options.extra_headers or {}),
                )
                await self._stream(request, builder, view, downloads, streamed, timer)
                builder.result.files = await self._collect_files(container, builder.result, downloads)
            except BackendError as error:
                if streamed or attempt == 3:
                    raise
                if check is not None and not await _container_still_usable(check):
                    continue  # the container went away between cells: verify, replace, run again
                if carried_over or not self.conversation.previous_response_id or not _refuses_chain(error):
                    raise
                carried_over = True
                self._carry_over()
                view.handle(Notice(CARRIED_OVER))
                continue
            finally:
                downloads.cancel()
                if check is not None and not check.done():
                    check.cancel()
            if check is not None and check.done() and not check.cancelled() and check.exception() is None:
                self.container = check.result() or self.container
            return

    async def _stream(
        self,
        request: TurnRequest,
        builder: ResultBuilder,
        view: View,
        downloads: _Downloads,
        streamed: list[Event],
        timer: CallTimer,
    ) -> None:
        async for event in self.backend.stream(request):
            if not streamed:
                streamed.append(event)
            view.handle(event)
            downloads.observe(event)
            timer.observe(event)

    def _carry_over(self) -> None:
        """Continue without the server's chain: the transcript goes as the conversation's messages."""
        self.conversation.previous_response_id = None
        self.conversation.messages[:] = self.transcript.as_messages()

    async def _collect_files(
        self, container: ContainerInfo, result: Result, downloads: _Downloads
    ) -> list[SavedFile]:
        """Every cited file plus every new file the model wrote without citing it, saved locally."""
        listing = await downloads.final_listing()
        self._seen_files.update(f.id for f in listing or [])
        outcomes = await downloads.finished()
        shown_images = {c.file_id for c in result.citations if c.displayed}
        saved = [o for o in outcomes if isinstance(o, SavedFile) and o.file_id not in shown_images]
        result.notices.extend(o for o in outcomes if isinstance(o, Notice))
        saved.extend(self._save_figures(result))
        return saved

    def _save_figures(self, result: Result) -> list[SavedFile]:
        """Images the code displayed become files too, so every frontend can point at them."""
        saved: list[SavedFile] = []
        for call in result.calls:
            images = [o for o in call.outputs if isinstance(o, Image)]
            for number, image in enumerate(images, start=1):
                ext = extension_for_mime(image.mime, default="png")
                name = f"figures/{_short(call.call_id)}-{number}.{ext}"
                try:
                    path = save_into(self.output_dir, name, image.data)
                except (ContainerFileError, OSError):
                    continue
                saved.append(SavedFile(name, path, "", "", len(image.data), False, displayed=True))
        return saved

    def _save_long_logs(self, result: Result) -> None:
        """Output too long to show whole is kept whole in a file, which the view links."""
        for call in result.calls:
            for output in call.outputs:
                if isinstance(output, LogText) and output.size > 2 * LOG_KEEP_CHARS:
                    name = f"logs/{_short(call.call_id)}-{output.stream}.txt"
                    with contextlib.suppress(ContainerFileError, OSError):
                        output.saved_as = save_into(
                            self.output_dir, name, output.text.encode("utf-8", "replace")
                        )

    async def status(self, *, model: str) -> Status:
        """The session as ``%ci_status`` shows it, with the container checked now (never replaced: the
        next turn does that) and never failing: a check that fails is reported in the status."""
        container, files, state = self.container, None, "not created yet"
        if container is not None:
            try:
                current = await self.backend.get_container(container.id)
                if current is not None and current.usable:
                    self.container = container = current
                    files, state = await self.file_rows(), current.status
                else:
                    gone = "gone" if current is None else current.status
                    state = f"{gone}: the next cell starts a new container and re-sends the files you pushed"
            except BackendError as error:
                state = f"unknown, the check failed: {error.message}"
        talk = self.conversation
        return Status(
            backend=self.backend.name,
            model=model,
            container_id=container.id if container else None,
            container_status=state,
            expires_at=container.expires_at if container and files is not None else None,
            files=files,
            usage=self.usage,
            turns=self.turns,
            conversation=talk.previous_response_id or f"{len(talk.messages)} messages",
            costs=dataclasses.replace(self.ledger),
        )


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


def _displayed_copies_marked(result: Result) -> list[SavedFile]:
    """Files byte-identical to an image the code displayed are that image: listed, not shown again.
    (Only files of a displayed image's exact size are read to compare.)"""
    shown: dict[int, list[bytes]] = {}
    for call in result.calls:
        for data in call.images:
            shown.setdefault(len(data), []).append(data)
    marked = []
    for saved in result.files:
        if not saved.displayed and saved.size in shown:
            with contextlib.suppress(OSError):
                if saved.path.read_bytes() in shown[saved.size]:
                    saved = dataclasses.replace(saved, displayed=True)
        marked.append(saved)
    return marked


def session_settings(settings: Settings) -> dict[str, Any]:
    """What a session follows of the configuration, as ``Session``'s keyword arguments; applied again
    before each use, so a change takes effect at the next cell without a restart."""
    return {
        "memory_limit": settings.memory_limit,
        "expires_after_minutes": settings.expires_after_minutes,
        "output_dir": Path(settings.output_dir).expanduser(),
        "download_concurrency": max(1, settings.download_concurrency),
        "download_size_cap": settings.download_size_cap,
        "download_turn_budget": settings.download_turn_budget,
        "upload_size_cap": settings.upload_size_cap,
        "pull_memory_cap": settings.pull_memory_cap,
        "always_push": list(settings.always_push),
        "restore_on_expiry": settings.restore_on_expiry,
        "restore_time_limit": settings.restore_time_limit,
        "prices": dict(settings.prices),
    }


def kernel_session_id() -> str:
    """The kernel session's id when running in a kernel (stable container names), else random."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)  # None in terminal IPython and plain Python
    session = getattr(getattr(kernel, "session", None), "session", None)
    if isinstance(session, str) and session:
        return session.replace("-", "")[:12]
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _with_paths(code: str, moved: dict[str, str]) -> str:
    for old, new in moved.items():
        code = code.replace(old, new)
    return code


def _refuses_chain(error: BackendError) -> bool:
    """OpenAI's refusals of a ``previous_response_id``: its container expired (400 "Container is
    expired."), or the response itself is gone (400 "Previous response ... not found")."""
    text = error.message.lower()
    return error.status_code == 400 and (
        "container is expired" in text or ("previous response" in text and "not found" in text)
    )


def _relink_registry(registry: PushRegistry, container_id: str, listing: Sequence[ContainerFile]) -> None:
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


async def _container_still_usable(check: asyncio.Future[ContainerInfo | None]) -> bool:
    try:
        current = await check
    except CIError:
        return True  # cannot tell: report the turn's own error
    return current is not None and current.usable


class _Allowance:
    """How much a turn's automatic downloads may take: one file at most ``cap``, all of them ``budget``.

    A download reserves what it may use before it starts (its listed size, else the cap) and gives
    back what it did not use. A file that does not fit beside the downloads in flight waits for
    them; it is skipped only when it cannot fit in what the finished ones left.
    """

    def __init__(self, cap: int, budget: int) -> None:
        self.cap = cap
        self.budget = budget
        self.spent = 0  # bytes saved by finished downloads
        self.reserved = 0  # bytes held by downloads in flight
        self.changed = asyncio.Condition()

    def refusal(self, name: str, size: int | None) -> Notice | None:
        """A one-line note when a file of ``size`` (None: not reported) can never be taken this turn."""
        if size is not None and size > self.cap:
            return _skipped(
                name, f"is {size_text(size)}, over the {size_text(self.cap)} download cap", "size_cap"
            )
        if self.budget - self.spent <= 0 or (size is not None and size > self.budget - self.spent):
            return self._past_budget(name)
        return None

    async def take(self, size: int | None) -> int:
        """Reserve what the next file may use: its bound while it streams (0: nothing is left)."""
        async with self.changed:
            want = min(self.cap, self.cap if size is None else size, self.budget - self.spent)
            while self.reserved and want > self.budget - self.spent - self.reserved:
                await self.changed.wait()
                want = min(want, self.budget - self.spent)
            granted = max(0, min(want, self.budget - self.spent - self.reserved))
            self.reserved += granted
            return granted

    async def give_back(self, granted: int, used: int) -> None:
        async with self.changed:
            self.reserved -= granted
            self.spent += used
            self.changed.notify_all()

    def past_bound(self, name: str, granted: int) -> Notice:
        if granted >= self.cap:
            return _skipped(name, f"is over the {size_text(self.cap)} download cap", "size_cap")
        return self._past_budget(name)

    def _past_budget(self, name: str) -> Notice:
        return _skipped(
            name, f"would take this turn's downloads past {size_text(self.budget)}", "turn_budget"
        )


def _skipped(name: str, why: str, setting: str) -> Notice:
    return Notice(
        f"Not saved: {name} {why}. Raise %config CodeInterpreter.download_{setting} to take it, "
        "or fetch it alone with %ci_pull.",
        level="warning",
    )


class _Downloads:
    """Fetches a turn's files into the output folder while the turn is still streaming.

    Cited files start downloading when cited. Files only change while code runs, so once the
    model starts writing its answer after a call, the container is listed; new files found there
    (written but not cited) start downloading at once, and the listing is redone only if another
    call starts afterwards. At most ``concurrency`` downloads run at once. Each is streamed to
    disk and bounded: a file over the size cap, or past what is left of the turn's budget, is
    skipped with a note (checked on the listed size first, then while it streams).
    """

    def __init__(
        self,
        backend: Backend,
        container_id: str,
        seen: set[str],
        output_dir: Path,
        concurrency: int,
        allowance: _Allowance,
    ) -> None:
        self.backend = backend
        self.container_id = container_id
        self.seen = seen
        self.output_dir = output_dir
        self.limit = asyncio.Semaphore(concurrency)
        self.allowance = allowance
        # Checked every turn: sys.path may have gained the folder since output_dir was set.
        self.folder_problem = output_dir_problem(output_dir)
        self.listed_sizes: dict[str, int | None] = {}
        self.tasks: dict[str, asyncio.Task[SavedFile | Notice]] = {}
        self.cited: set[str] = set()
        self.listing: asyncio.Task[list[ContainerFile]] | None = None
        self.code_ran = False  # no code, no new files: a chat-only turn skips the listing

    def observe(self, event: Event) -> None:
        if isinstance(event, FileCited) and not event.displayed:
            self.cited.add(event.file_id)
            self.start(event.file_id, event.container_id, event.filename)
        elif isinstance(event, CallStarted):
            self.code_ran = True
            self._cancel_listing()
        elif isinstance(event, TextDelta) and self.code_ran and self.listing is None:
            self.listing = asyncio.ensure_future(self._list_and_fetch())

    async def final_listing(self) -> list[ContainerFile] | None:
        """The container's files after the turn's code ran (None: no code ran, nothing to list)."""
        if not self.code_ran:
            return None
        if self.listing is None:
            self.listing = asyncio.ensure_future(self._list_and_fetch())
        return await self.listing

    async def _list_and_fetch(self) -> list[ContainerFile]:
        listing = await self.backend.list_files(self.container_id)
        for file in listing:
            self.listed_sizes[file.id] = file.bytes
            if file.id not in self.seen and file.source != "user" and not _is_show_image(file):
                self.start(file.id, self.container_id, file.name)
        return listing

    def start(self, file_id: str, container_id: str, name: str) -> None:
        if file_id not in self.tasks:
            self.tasks[file_id] = asyncio.ensure_future(self._fetch(file_id, container_id, name))

    async def _fetch(self, file_id: str, container_id: str, name: str) -> SavedFile | Notice:
        async with self.limit:
            try:
                safe = safe_relative_name(name)
            except ContainerFileError as error:
                return Notice(f"Could not save {name}: {error}", level="warning")
            if self.folder_problem is not None:
                why = output_dir_message(
                    self.output_dir, self.folder_problem, outcome="nothing is saved there"
                )
                return Notice(f"Not saved: {safe}. {why}", level="warning")
            listed = self.listed_sizes.get(file_id)
            refusal = self.allowance.refusal(safe, listed)
            if refusal is not None:
                return refusal
            granted = await self.allowance.take(listed)
            if granted <= 0 and listed != 0:
                return self.allowance.past_bound(safe, granted)
            used = 0
            try:
                path, used = await download_into(
                    self.backend, container_id, file_id, self.output_dir, safe, max_bytes=granted
                )
            except FileTooLarge as error:
                if error.size is not None:
                    refusal = self.allowance.refusal(safe, error.size)
                return refusal or self.allowance.past_bound(safe, granted)
            except (CIError, OSError) as error:
                return Notice(f"Could not save {name}: {error}", level="warning")
            finally:
                await self.allowance.give_back(granted, used)
        return SavedFile(safe, path, f"/mnt/data/{safe}", file_id, used, cited=False)

    async def finished(self) -> list[SavedFile | Notice]:
        outcomes = await asyncio.gather(*self.tasks.values())
        return [
            dataclasses.replace(o, cited=True) if isinstance(o, SavedFile) and o.file_id in self.cited else o
            for o in outcomes
        ]

    def _cancel_listing(self) -> None:
        if self.listing is not None and not self.listing.done():
            self.listing.cancel()
        self.listing = None

    def cancel(self) -> None:
        self._cancel_listing()
        for task in self.tasks.values():
            task.cancel()


def _short(call_id: str) -> str:
    return call_id[-8:] if len(call_id) > 8 else call_id


def _is_show_image(file: ContainerFile) -> bool:
    """OpenAI stores each plt.show() image as /mnt/data/cfile_<id>.png; it is shown from the outputs."""
    return is_shown_image(file.name)


async def _tick_every(view: View, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        view.tick()
