"""Session: the state of one kernel's code interpreter and the flow of one turn.

Owns the backend, the container, the conversation, the registry of pushed files, what it knows of
the container's files (:mod:`~ci_magic.known_files`) and usage totals; its settings
(:mod:`~ci_magic.session_settings`) are applied afresh before each use. ``run_turn`` is the one flow:
container check -> push -> backend.stream -> view + ResultBuilder -> file downloads -> Result.
Keeping the container usable across expiry and kernel restarts (replace, re-send, re-run, reattach,
carry the conversation over) is :mod:`~ci_magic.continuity`'s job, asked before each turn and push.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ci_magic.backends.base import Backend, ContainerInfo, Conversation, TurnRequest
from ci_magic.config import output_dir_message, output_dir_problem
from ci_magic.continuity import Continuity, container_still_usable
from ci_magic.costs import CostLedger
from ci_magic.downloads import DownloadAllowance, TurnDownloads, displayed_copies_marked
from ci_magic.errors import BackendError, CIError, ConfigurationError, ContainerFileError, Interrupted
from ci_magic.events import Event, Notice, Usage
from ci_magic.known_files import KnownFiles
from ci_magic.provenance import record_turn
from ci_magic.result import Result, ResultBuilder, SavedFile
from ci_magic.saved_outputs import save_figures, save_long_logs
from ci_magic.session_settings import SessionSettings
from ci_magic.status import Status, check_status
from ci_magic.transcript import CallTimer, Transcript, TurnKind, turn_record
from ci_magic.variables.progress import Progress
from ci_magic.variables.registry import PushRegistry, PushRequest
from ci_magic.variables.transfer import ContainerFiles, FileRow, PulledFile, PushOutcome

__all__ = ["Session", "SessionSettings", "SilentView", "Status", "TurnOptions", "View"]

INTERRUPTED = (
    "Interrupted. The kernel, the container, its files and the conversation are intact; "
    "run the cell again when ready."
)


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
    """How one turn runs: the model and instructions, and for ``%%ci_exec`` the code to run as is."""

    model: str
    instructions: str
    new_conversation: bool = False
    exec_code: str | None = None
    extra_headers: dict[str, str] | None = None
    kind: TurnKind | None = None  # how the transcript records it (None: "exec" with exec_code, else "ci")


class Session:
    """One kernel's code interpreter: its backend, container, conversation, pushed files and totals."""

    def __init__(
        self,
        backend: Backend,
        settings: SessionSettings,
        *,
        session_id: str,
        registry: PushRegistry | None = None,
        progress: Callable[[], Progress | None] = lambda: None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``session_id`` names its containers; ``registry``: pushed files to carry over from a previous
        session (default: a new one); ``progress`` makes the display large transfers report to;
        ``on_change`` is called after each turn, push and reset (to save the session's state)."""
        self.backend = backend
        self.session_id = session_id
        # Survives container expiry and backend changes: everything in it is re-sent to a new container.
        self.registry = registry if registry is not None else PushRegistry()
        self.progress = progress
        self.container: ContainerInfo | None = None
        self.conversation = Conversation()
        self.usage = Usage()
        self.turns = 0
        self.known_files = KnownFiles()
        self.transcript = Transcript()  # every turn and restore: what replay, export and restore read
        self.on_change = on_change
        self.ledger = CostLedger()  # the session's running cost and time totals
        self.model = ""  # the last turn's model: a restore outside a turn (%ci_push) uses it
        self.instructions = ""
        # Replaces, restores and reattaches the container, and carries the conversation over.
        self.continuity = Continuity(self)
        self.apply(settings)

    def apply(self, settings: SessionSettings) -> None:
        """The settings in force from the next turn, push or pull on (a change needs no restart)."""
        self.settings = settings
        self.ledger.set_prices(settings.prices)

    # -- taken over, reset, checked, closed ----------------------------------------------------

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
        self.continuity.resume(reattach=container is not None)

    async def reset(self, backend: Backend | None = None) -> None:
        """A new container and a fresh conversation (the push registry is kept); turns count from 0.

        ``backend``: replace the backend too (built from the current configuration and environment).
        """
        old, self.container = self.container, None
        self.conversation.reset()
        self.turns = 0
        self.transcript.clear()
        self.continuity.forget()
        if old is not None:
            with contextlib.suppress(CIError, OSError):
                await self.backend.delete_container(old.id)
        if backend is not None:
            previous, self.backend = self.backend, backend
            with contextlib.suppress(CIError, OSError, RuntimeError):
                await previous.aclose()

    async def status(self, *, model: str) -> Status:
        """The session as ``%ci_status`` shows it, with the container checked now (``status.py``)."""
        return await check_status(self, model=model)

    async def close(self, *, delete_container: bool) -> None:
        """Close the backend's connections, deleting the container first if asked."""
        if delete_container and self.container is not None:
            with contextlib.suppress(CIError, OSError):
                await self.backend.delete_container(self.container.id)
        self.container = None
        await self.backend.aclose()

    # -- files: push, pull, list ---------------------------------------------------------------

    def files(self, container: ContainerInfo, *, uploading: bool = False) -> ContainerFiles:
        """The file operations on ``container``, recording pushes in the session's registry
        (``uploading``: with a progress display for large uploads)."""
        settings = self.settings
        return ContainerFiles(
            self.backend,
            container.id,
            self.registry,
            size_cap=settings.upload_size_cap,
            concurrency=settings.download_concurrency,
            progress=self.progress() if uploading else None,
            download_cap=settings.download_size_cap,
            pull_memory_cap=settings.pull_memory_cap,
        )

    async def push(self, requests: Sequence[PushRequest]) -> tuple[list[PushOutcome], list[Notice]]:
        """Push now (``%ci_push``), into the container (made or replaced as needed); its notices too."""
        container, notices = await self.continuity.ready()
        outcomes = await self.files(container, uploading=True).push(requests)
        self._changed()
        return outcomes, notices

    async def pull(self, name: str) -> PulledFile:
        return await self.files(self._existing_container("pull files")).pull(name, self._pull_folder())

    async def pull_all(self) -> list[PulledFile]:
        return await self.files(self._existing_container("pull files")).pull_all(self._pull_folder())

    def _pull_folder(self) -> Path:
        """``output_dir``, checked again: sys.path may have gained it since it was set."""
        folder = self.settings.output_dir
        problem = output_dir_problem(folder)
        if problem is not None:
            raise ConfigurationError(output_dir_message(folder, problem, outcome="nothing was pulled"))
        return folder

    async def file_rows(self) -> list[FileRow]:
        """The container's files, as ``%ci_files`` lists them ([] before the first container), with
        what the session knows: sizes of files it saved, and files %%ci_exec wrote as the user's."""
        if self.container is None:
            return []
        return [self.known_files.describe(row) for row in await self.files(self.container).listing()]

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
        started, started_at = time.monotonic(), time.time()
        builder = view.builder
        builder.result.prompt = prompt
        if options.new_conversation:
            self.conversation.reset()
        self.model, self.instructions = options.model or self.model, options.instructions
        timer = CallTimer()
        ticker = asyncio.ensure_future(_tick_every(view, 0.1))
        try:
            await self._run_in_container(prompt, options, view, push, timer)
        except asyncio.CancelledError:
            # Ctrl-C: the bridge cancelled this task and waits for the Result it still returns.
            builder.fail(Interrupted(INTERRUPTED))
        except CIError as error:
            builder.fail(error)
        finally:
            ticker.cancel()
        result = builder.result
        result.wall_time = time.monotonic() - started
        if self.container is not None:
            result.container_id = result.container_id or self.container.id
        save_long_logs(result, self.settings.output_dir)
        result.files = displayed_copies_marked(result)
        self._record(builder, options, timer, started_at)
        self._changed()
        view.finish(result, link_base=link_base)
        return result

    async def _run_in_container(
        self,
        prompt: str,
        options: TurnOptions,
        view: View,
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
            unverified = attempt == 1 and self.continuity.can_check_beside_turn()
            container, notices = await self.continuity.ready(
                verify=not unverified,
                model=options.model,
                instructions=options.instructions,
                extra_headers=dict(options.extra_headers or {}),
            )
            for notice in notices:
                view.handle(notice)
            check = asyncio.ensure_future(self.backend.get_container(container.id)) if unverified else None
            downloads = self._downloads(container)
            streamed = False
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
                async for event in self.backend.stream(request):
                    streamed = True
                    view.handle(event)
                    downloads.observe(event)
                    timer.observe(event)
                view.builder.result.files = await self._collect_files(view.builder.result, downloads)
            except BackendError as error:
                if streamed or attempt == 3:
                    raise
                if check is not None and not await container_still_usable(check):
                    continue  # the container went away between cells: verify, replace, run again
                carried = None if carried_over else self.continuity.carry_over(error)
                if carried is None:
                    raise
                carried_over = True
                view.handle(carried)
                continue
            finally:
                downloads.cancel()
                if check is not None and not check.done():
                    check.cancel()
            if check is not None and check.done() and not check.cancelled() and check.exception() is None:
                self.container = check.result() or self.container
            return

    async def _push_for_turn(
        self, container: ContainerInfo, push: Sequence[PushRequest], report: Callable[[Notice], None]
    ) -> str:
        """Push what the prompt needs, one line per file sent; then the cards of every notebook file."""
        if push:
            for outcome in await self.files(container, uploading=True).push(push):
                if outcome.sent:
                    report(Notice(outcome.line))
        return self.registry.cards(container.id)

    def _downloads(self, container: ContainerInfo) -> TurnDownloads:
        """The turn's automatic downloads from ``container``, within the download settings."""
        s = self.settings
        allowance = DownloadAllowance(s.download_size_cap, s.download_turn_budget)
        return TurnDownloads(
            self.backend, container.id, self.known_files, s.output_dir, s.download_concurrency, allowance
        )

    async def _collect_files(self, result: Result, downloads: TurnDownloads) -> list[SavedFile]:
        """Every cited file, every new file the model wrote without citing it, and every figure the code
        displayed, saved locally."""
        listing = await downloads.final_listing()
        self.known_files.learn(listing or [])
        outcomes = await downloads.finished()
        shown_images = {c.file_id for c in result.citations if c.displayed}
        saved = [o for o in outcomes if isinstance(o, SavedFile) and o.file_id not in shown_images]
        result.notices.extend(o for o in outcomes if isinstance(o, Notice))
        saved.extend(save_figures(result, self.settings.output_dir))
        return saved

    def _record(
        self, builder: ResultBuilder, options: TurnOptions, timer: CallTimer, started_at: float
    ) -> None:
        """Count the finished turn in the session's totals, known files, transcript and provenance."""
        result = builder.result
        self.turns += 1
        self.usage = self.usage + result.usage
        self.known_files.record_turn(result, by_exec=options.exec_code is not None)
        kind: TurnKind = options.kind or ("exec" if options.exec_code is not None else "ci")
        entry = self.transcript.add(turn_record(result, kind=kind, timer=timer, started_at=started_at))
        container = self.container if self.container and self.container.id == result.container_id else None
        record_turn(
            result,
            entry,
            builder,
            backend=self.backend.name,
            ledger=self.ledger,
            inputs=list(self.registry),
            memory_limit=self.settings.memory_limit,
            container_created_at=float(container.created_at) if container and container.created_at else None,
            started_at=started_at,
        )

    def _changed(self) -> None:
        """Tell the owner the session changed (it saves the state a restarted kernel takes over)."""
        if self.on_change is not None:
            with contextlib.suppress(Exception):  # saving state never fails a cell
                self.on_change()


async def _tick_every(view: View, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        view.tick()
