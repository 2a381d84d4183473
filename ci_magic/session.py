"""Session: the state of one kernel's code interpreter and the flow of one turn.

Owns the backend, the container (and its recreation when it expires), the conversation, the
registry of pushed files and usage totals. ``run_turn`` is the one flow:
container check -> push -> backend.stream -> view + ResultBuilder -> file downloads -> Result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ci_magic.backends.base import Backend, ContainerFile, ContainerInfo, Conversation, TurnRequest
from ci_magic.errors import BackendError, CIError, ContainerFileError, StreamError
from ci_magic.events import Event, Failed, FileCited, Image, Notice, Usage
from ci_magic.filenames import safe_relative_name, save_into
from ci_magic.result import Result, ResultBuilder, SavedFile

__all__ = ["Session", "TurnOptions", "View"]

RECREATED_NOTE = (
    "The previous container expired and was replaced by a new one: files sent from the notebook were "
    "uploaded again, but variables and other in-memory state from earlier code are gone; re-create "
    "what you need."
)


class View(Protocol):
    """What a turn reports to (the renderer's TurnView, or a silent one)."""

    def handle(self, event: Event) -> None: ...

    def tick(self) -> None: ...

    def finish(self, result: Result, *, link_base: Path | None = None) -> None: ...


class SilentView:
    def handle(self, event: Event) -> None:
        pass

    def tick(self) -> None:
        pass

    def finish(self, result: Result, *, link_base: Path | None = None) -> None:
        pass


@dataclass(frozen=True)
class TurnOptions:
    model: str
    instructions: str
    new_conversation: bool = False
    exec_code: str | None = None
    extra_headers: dict[str, str] | None = None


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
        on_new_container: Callable[[ContainerInfo], Awaitable[list[Notice]]] | None = None,
    ) -> None:
        self.backend = backend
        self.session_id = session_id
        self.memory_limit = memory_limit
        self.expires_after_minutes = expires_after_minutes
        self.output_dir = output_dir
        self.download_concurrency = max(1, download_concurrency)
        self.on_new_container = on_new_container
        self.container: ContainerInfo | None = None
        self.conversation = Conversation()
        self.usage = Usage()
        self.turns = 0
        self.last_result: Result | None = None

    # -- container lifecycle -------------------------------------------------------------------

    async def ensure_container(self) -> tuple[ContainerInfo, list[Notice]]:
        """The session's usable container, created or replaced as needed, with notices to show."""
        notices: list[Notice] = []
        if self.container is not None:
            current = await self.backend.get_container(self.container.id)
            if current is not None and current.usable:
                self.container = current
                return current, notices
            state = "is gone" if current is None else f"is {current.status}"
            notices.append(
                Notice(f"Container {self.container.id} {state}; started a new one and re-sent your files.")
            )
            if self.turns:
                self.conversation.notes.append(RECREATED_NOTE)
        self.container = await self.backend.create_container(
            name=f"ci-magic-{self.session_id}",
            memory_limit=self.memory_limit,  # type: ignore[arg-type]
            expires_after_minutes=self.expires_after_minutes,
        )
        if self.on_new_container is not None:
            notices.extend(await self.on_new_container(self.container))
        return self.container, notices

    async def reset(self) -> None:
        """A new container and a fresh conversation (the push registry is kept)."""
        old, self.container = self.container, None
        self.conversation.reset()
        if old is not None:
            with contextlib.suppress(CIError):
                await self.backend.delete_container(old.id)

    async def close(self, *, delete_container: bool) -> None:
        if delete_container and self.container is not None:
            with contextlib.suppress(CIError, OSError):
                await self.backend.delete_container(self.container.id)
        self.container = None
        await self.backend.aclose()

    # -- one turn ------------------------------------------------------------------------------

    async def run_turn(
        self,
        prompt: str,
        options: TurnOptions,
        view: View,
        *,
        context: Callable[[ContainerInfo], Awaitable[str]] | None = None,
        link_base: Path | None = None,
    ) -> Result:
        started = time.monotonic()
        builder = ResultBuilder(prompt)
        if options.new_conversation:
            self.conversation.reset()
        ticker = asyncio.ensure_future(_tick_every(view, 0.1))
        try:
            container, notices = await self.ensure_container()
            for notice in notices:
                _emit(notice, builder, view)
            before = {f.id for f in await self.backend.list_files(container.id)}
            request = TurnRequest(
                prompt=prompt,
                container_id=container.id,
                model=options.model,
                instructions=options.instructions,
                conversation=self.conversation,
                context=await context(container) if context is not None else "",
                exec_code=options.exec_code,
                extra_headers=dict(options.extra_headers or {}),
            )
            await self._stream(request, builder, view)
            builder.result.files = await self._collect_files(container, builder.result, before)
        except asyncio.CancelledError:
            _emit(
                Failed(
                    "Interrupted. The container, its files and the conversation are intact.", "interrupted"
                ),
                builder,
                view,
            )
        except BackendError as error:
            _emit(Failed(error.message, "stream" if isinstance(error, StreamError) else "api"), builder, view)
        except CIError as error:
            _emit(Failed(error.message, "config"), builder, view)
        finally:
            ticker.cancel()
        result = builder.result
        result.wall_time = time.monotonic() - started
        if self.container is not None:
            result.container_id = result.container_id or self.container.id
        self.turns += 1
        self.usage = self.usage + result.usage
        self.last_result = result
        view.finish(result, link_base=link_base)
        return result

    async def _stream(self, request: TurnRequest, builder: ResultBuilder, view: View) -> None:
        async for event in self.backend.stream(request):
            builder.feed(event)
            view.handle(event)

    async def _collect_files(
        self, container: ContainerInfo, result: Result, before: set[str]
    ) -> list[SavedFile]:
        """Download every cited file and every new file the model wrote without citing it."""
        listing = {f.id: f for f in await self.backend.list_files(container.id)}
        wanted: dict[str, tuple[str, str, bool]] = {}  # file_id -> (container id, name, cited)
        for cite in result.citations:
            if cite.zero_length or cite.file_id in wanted:
                continue  # plt.show() images: already shown from the call's outputs
            known = listing.get(cite.file_id)
            name = known.name if known is not None else cite.filename
            wanted[cite.file_id] = (cite.container_id, name, True)
        for file in listing.values():
            if file.id in before or file.id in wanted or file.source == "user":
                continue
            if _is_show_image(file, result.citations):
                continue
            wanted[file.id] = (container.id, file.name, False)
        limit = asyncio.Semaphore(self.download_concurrency)

        async def fetch(file_id: str, container_id: str, name: str, cited: bool) -> SavedFile | Notice:
            async with limit:
                try:
                    safe = safe_relative_name(name)
                    data = await self.backend.download_file(container_id, file_id)
                    path = save_into(self.output_dir, safe, data)
                except (CIError, OSError) as error:
                    return Notice(f"Could not save {name}: {error}", level="warning")
            return SavedFile(safe, path, f"/mnt/data/{safe}", file_id, len(data), cited)

        outcomes = await asyncio.gather(*(fetch(fid, *spec) for fid, spec in wanted.items()))
        saved = [o for o in outcomes if isinstance(o, SavedFile)]
        result.notices.extend(o for o in outcomes if isinstance(o, Notice))
        saved.extend(self._save_figures(result))
        return saved

    def _save_figures(self, result: Result) -> list[SavedFile]:
        """Images the code displayed become files too, so every frontend can point at them."""
        saved: list[SavedFile] = []
        for call in result.calls:
            images = [o for o in call.outputs if isinstance(o, Image)]
            for number, image in enumerate(images, start=1):
                suffix = ".jpg" if image.mime == "image/jpeg" else ".png"
                name = f"figures/{_short(call.call_id)}-{number}{suffix}"
                try:
                    path = save_into(self.output_dir, name, image.data)
                except (ContainerFileError, OSError):
                    continue
                saved.append(SavedFile(name, path, "", "", len(image.data), False))
        return saved

    async def files(self) -> list[ContainerFile]:
        if self.container is None:
            return []
        return await self.backend.list_files(self.container.id)

    def status(self) -> dict[str, Any]:
        container = self.container
        return {
            "backend": self.backend.name,
            "container_id": container.id if container else None,
            "container_status": container.status if container else "not created yet",
            "expires_at": container.expires_at if container else None,
            "previous_response_id": self.conversation.previous_response_id,
            "history_messages": len(self.conversation.messages),
            "turns": self.turns,
            "usage": self.usage,
        }


def _short(call_id: str) -> str:
    return call_id[-8:] if len(call_id) > 8 else call_id


def _is_show_image(file: ContainerFile, citations: list[FileCited]) -> bool:
    return any(c.zero_length and c.file_id == file.id for c in citations) or (
        file.name.startswith("cfile_") and file.name.endswith(".png")
    )


def _emit(event: Event, builder: ResultBuilder, view: View) -> None:
    builder.feed(event)
    view.handle(event)


async def _tick_every(view: View, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        view.tick()
