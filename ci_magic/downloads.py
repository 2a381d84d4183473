"""A turn's automatic downloads: the files the model made, fetched while the answer still streams.

Bounded: one file at most ``download_size_cap``, a turn's files together at most
``download_turn_budget``; each streamed to disk (``filenames.download_into``), never whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from ci_magic.backends.base import Backend, ContainerFile, size_text
from ci_magic.config import output_dir_message, output_dir_problem
from ci_magic.errors import CIError, ContainerFileError, FileTooLarge
from ci_magic.events import CallStarted, Event, FileCited, Notice, TextDelta
from ci_magic.filenames import download_into, safe_relative_name
from ci_magic.known_files import KnownFiles
from ci_magic.result import Result, SavedFile
from ci_magic.variables.formats import is_shown_image

__all__ = [
    "DEFAULT_DOWNLOAD_TURN_BUDGET",
    "DownloadAllowance",
    "TurnDownloads",
    "displayed_copies_marked",
    "is_show_image_file",
]

DEFAULT_DOWNLOAD_TURN_BUDGET = 1024 * 1024 * 1024  # all automatic downloads of one turn together


class DownloadAllowance:
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


class TurnDownloads:
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
        known: KnownFiles,
        output_dir: Path,
        concurrency: int,
        allowance: DownloadAllowance,
    ) -> None:
        self.backend = backend
        self.container_id = container_id
        self.known = known  # files not new to this turn are not downloaded
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
            if self.known.is_new(file) and not is_show_image_file(file):
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


def is_show_image_file(file: ContainerFile) -> bool:
    """OpenAI stores each plt.show() image as /mnt/data/cfile_<id>.png; it is shown from the outputs."""
    return is_shown_image(file.name)


def displayed_copies_marked(result: Result) -> list[SavedFile]:
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
