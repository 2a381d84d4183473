"""An in-memory Backend for file-transfer and Session tests (a test double: the real servers live in
tests/servers).

It keeps what matters for push/pull and turn-flow behaviour and nothing else: containers that can
expire, files keyed by path like a real file system (a second upload to a path replaces the first),
an optional OpenAI-style hash prefix on uploaded paths, scripted turns (``turns``: each a function of
the request that yields events, writes files or raises), a log of every call, and the peak number of
concurrent uploads.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ci_magic.backends.base import (
    ContainerFile,
    ContainerInfo,
    MemoryLimit,
    TurnRequest,
    check_reported_size,
    open_download_target,
    stream_past_cap,
)
from ci_magic.errors import BackendError, ConfigurationError
from ci_magic.events import Event

__all__ = ["FakeBackend", "Script"]

Script = Callable[[TurnRequest, "FakeBackend"], AsyncIterator[Event]]


@dataclass
class _Container:
    info: ContainerInfo
    files: dict[str, tuple[ContainerFile, bytes]] = field(default_factory=dict)  # by path


class FakeBackend:
    name = "fake"

    def __init__(self, *, hash_prefix: bool = False, upload_delay: float = 0.0) -> None:
        self.hash_prefix = hash_prefix  # OpenAI stores uploads as /mnt/data/<32 hex>-<name>
        self.upload_delay = upload_delay
        self.calls: list[tuple[str, ...]] = []
        self.peak_uploads = 0
        self._uploading = 0
        self._containers: dict[str, _Container] = {}
        self._clock = itertools.count(1_760_000_000)
        self._ids = itertools.count(1)
        self.fail_uploads: set[str] = set()  # file names whose upload answers 500
        self.turns: list[Script] = []  # what stream() plays, one script per turn
        self.requests: list[TurnRequest] = []

    # -- containers ------------------------------------------------------------------------------

    async def create_container(
        self, *, name: str = "test", memory_limit: MemoryLimit = "1g", expires_after_minutes: int = 20
    ) -> ContainerInfo:
        cid = f"cntr_fake{next(self._ids)}"
        info = ContainerInfo(
            cid, name, "running", next(self._clock), None, expires_after_minutes, memory_limit
        )
        self._containers[cid] = _Container(info)
        self.calls.append(("create_container", cid))
        return info

    async def get_container(self, container_id: str) -> ContainerInfo | None:
        box = self._containers.get(container_id)
        return box.info if box is not None else None

    async def delete_container(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    def expire(self, container_id: str) -> None:
        box = self._containers[container_id]
        box.info = ContainerInfo(box.info.id, box.info.name, "expired", box.info.created_at)
        box.files.clear()

    def _usable(self, container_id: str) -> _Container:
        box = self._containers.get(container_id)
        if box is None or not box.info.usable:
            raise BackendError(f"Container {container_id} not found or expired.", status_code=404)
        return box

    # -- files -----------------------------------------------------------------------------------

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        box = self._usable(container_id)
        data = source.read_bytes() if isinstance(source, Path) else bytes(source)
        self.calls.append(("upload", container_id, filename))
        self._uploading += 1
        self.peak_uploads = max(self.peak_uploads, self._uploading)
        try:
            await asyncio.sleep(self.upload_delay)
        finally:
            self._uploading -= 1
        if filename in self.fail_uploads:
            raise BackendError(f"The server failed while uploading {filename}.", status_code=500)
        path = f"/mnt/data/{secrets.token_hex(16) + '-' if self.hash_prefix else ''}{filename}"
        file = ContainerFile(
            f"cfile_{next(self._ids)}", container_id, path, len(data), next(self._clock), "user"
        )
        box.files[path] = (file, data)
        return file

    def add_model_file(self, container_id: str, path: str, data: bytes) -> ContainerFile:
        """A file the model's code wrote (OpenAI reports no size for those)."""
        box = self._usable(container_id)
        file = ContainerFile(
            f"cfile_{next(self._ids)}", container_id, path, None, next(self._clock), "assistant"
        )
        box.files[path] = (file, data)
        return file

    def remove_path(self, container_id: str, path: str) -> None:
        """The model's code deleted a file."""
        del self._usable(container_id).files[path]

    def content(self, container_id: str, name: str) -> bytes:
        """The bytes at /mnt/data/<name> (ignoring a hash prefix)."""
        for file, data in self._usable(container_id).files.values():
            if file.name == name or file.name.split("-", 1)[-1] == name:
                return data
        raise KeyError(name)

    async def list_files(self, container_id: str) -> list[ContainerFile]:
        self.calls.append(("list", container_id))
        return [file for file, _ in self._usable(container_id).files.values()]

    def _by_id(self, container_id: str, file_id: str) -> tuple[str, bytes]:
        for path, (file, data) in self._usable(container_id).files.items():
            if file.id == file_id:
                return path, data
        raise BackendError(f"No such file {file_id}.", status_code=404)

    async def download_file(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        """As the protocol says: refused on the reported size, else written, cut at ``max_bytes``."""
        self.calls.append(("download", container_id, file_id))
        path, data = self._by_id(container_id, file_id)
        file = self._usable(container_id).files[path][0]
        check_reported_size(path, file.bytes, max_bytes=max_bytes)
        if len(data) > max_bytes:
            raise stream_past_cap(path, max_bytes)
        fd = open_download_target(dest)
        with open(fd, "wb") as out:
            out.write(data)
        return len(data)

    async def delete_file(self, container_id: str, file_id: str) -> None:
        self.calls.append(("delete", container_id, file_id))
        path, _ = self._by_id(container_id, file_id)
        del self._containers[container_id].files[path]

    def count(self, call: str) -> int:
        return sum(1 for c in self.calls if c[0] == call)

    async def stream(self, request: TurnRequest) -> AsyncIterator[Event]:
        """Play the next scripted turn: ``script(request, backend)`` yields events (and may write
        files with ``add_model_file`` or raise as a real backend would)."""
        self.calls.append(("stream", request.container_id))
        self.requests.append(request)
        if not self.turns:
            raise ConfigurationError("The fake backend has no scripted turn left; it runs no model.")
        async for event in self.turns.pop(0)(request, self):
            yield event

    async def aclose(self) -> None:
        self._containers.clear()
