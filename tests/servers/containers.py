"""Containers and container files as OpenAI's Containers API presents them, backed by real folders.

Each container owns a folder on disk (its ``/mnt/data``) and, once code runs, a long-lived
Python worker. Files that code writes into the folder are picked up on the next look and
listed as ``source: "assistant"`` with ``bytes: null``, as OpenAI lists model-written files.
Time comes from a ``Clock`` tests can advance: a container whose ``last_active_at`` plus its
``expires_after.minutes`` has passed is expired, its files are deleted and its worker killed.
"""

from __future__ import annotations

import mimetypes
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tests.servers.sandbox_worker import DATA_DIR, ExecResult, Worker

__all__ = [
    "ApiError",
    "Clock",
    "Container",
    "ContainerStore",
    "StoredFile",
    "new_id",
]

DEFAULT_EXPIRY_MINUTES = 20
MEMORY_LIMITS = ("1g", "4g", "16g", "64g")


def new_id(prefix: str, hex_chars: int) -> str:
    return f"{prefix}_{secrets.token_hex(hex_chars // 2)}"


class ApiError(Exception):
    """An error the server answers with OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Clock:
    """Wall-clock seconds plus an offset that tests move forward."""

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


@dataclass
class StoredFile:
    id: str
    container_id: str
    relative: str  # path inside the container folder, "/"-separated
    created_at: int
    source: str  # "user" | "assistant"
    bytes: int | None

    @property
    def path(self) -> str:
        return f"{DATA_DIR}/{self.relative}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "container.file",
            "created_at": self.created_at,
            "bytes": self.bytes,
            "container_id": self.container_id,
            "path": self.path,
            "source": self.source,
        }


@dataclass
class Container:
    id: str
    name: str
    created_at: int
    last_active_at: int
    expiry_minutes: int
    memory_limit: str
    network_policy: dict[str, Any]
    folder: Path
    worker: Worker
    files: dict[str, StoredFile] = field(default_factory=dict)
    expired: bool = False
    # One call at a time per container, as one kernel runs one cell at a time.
    run_lock: threading.Lock = field(default_factory=threading.Lock)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "container",
            "created_at": self.created_at,
            "status": "expired" if self.expired else "running",
            "expires_after": {"anchor": "last_active_at", "minutes": self.expiry_minutes},
            "last_active_at": self.last_active_at,
            "memory_limit": self.memory_limit,
            "name": self.name,
            "network_policy": self.network_policy,
        }

    def file_by_path(self, path: str) -> StoredFile | None:
        relative = path.removeprefix(DATA_DIR + "/")
        return next((f for f in self.files.values() if f.relative == relative), None)


class ContainerStore:
    """All containers of one server; every method is safe to call from request threads."""

    def __init__(self, root: Path, clock: Clock, *, exec_timeout: float = 60.0) -> None:
        self.root = root
        self.clock = clock
        self.exec_timeout = exec_timeout
        self._containers: dict[str, Container] = {}
        self._lock = threading.RLock()

    # -- containers ------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> Container:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(
                400, "Missing required parameter: 'name'.", param="name", code="missing_required_parameter"
            )
        expires = body.get("expires_after") or {"anchor": "last_active_at", "minutes": DEFAULT_EXPIRY_MINUTES}
        minutes = expires.get("minutes") if isinstance(expires, dict) else None
        if not isinstance(minutes, int) or minutes < 1 or expires.get("anchor") != "last_active_at":
            raise ApiError(
                400,
                "Invalid 'expires_after': expected {'anchor': 'last_active_at', 'minutes': "
                "<positive integer>}.",
                param="expires_after",
            )
        memory_limit = body.get("memory_limit") or "1g"
        if memory_limit not in MEMORY_LIMITS:
            raise ApiError(
                400,
                f"Invalid 'memory_limit': expected one of {', '.join(MEMORY_LIMITS)}, got {memory_limit!r}.",
                param="memory_limit",
            )
        if body.get("file_ids"):
            # This server has no Files API, so no file id can exist.
            raise ApiError(404, f"No such File object: {body['file_ids'][0]}", param="file_ids")
        now = int(self.clock.now())
        container_id = new_id("cntr", 48)
        folder = self.root / "containers" / container_id
        folder.mkdir(parents=True)
        container = Container(
            id=container_id,
            name=name,
            created_at=now,
            last_active_at=now,
            expiry_minutes=minutes,
            memory_limit=memory_limit,
            network_policy=body.get("network_policy") or {"type": "disabled"},
            folder=folder,
            worker=Worker(folder, self.root / "scratch" / container_id, timeout=self.exec_timeout),
        )
        with self._lock:
            self._containers[container_id] = container
        return container

    def get(self, container_id: str) -> Container:
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise ApiError(404, f"Container with id '{container_id}' not found.")
            self._check_expiry(container)
            return container

    def usable(self, container_id: str) -> Container:
        """The container for an operation that uses it: must be running; marks it active."""
        container = self.get(container_id)
        if container.expired:
            raise ApiError(400, "Container is expired.")
        container.last_active_at = int(self.clock.now())
        return container

    def list(
        self, *, order: str = "desc", after: str | None = None, limit: int = 20, name: str | None = None
    ) -> tuple[list[Container], bool]:
        with self._lock:
            items = list(self._containers.values())  # insertion order == creation order
            for container in items:
                self._check_expiry(container)
        if name is not None:
            items = [c for c in items if c.name == name]
        return _page(items, order=order, after=after, limit=limit)

    def delete(self, container_id: str) -> None:
        with self._lock:
            container = self.get(container_id)
            del self._containers[container_id]
        container.worker.close()
        shutil.rmtree(container.folder, ignore_errors=True)
        shutil.rmtree(container.worker.scratch_dir, ignore_errors=True)

    def expire(self, container_id: str) -> None:
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise KeyError(container_id)
            self._mark_expired(container)

    def close(self) -> None:
        with self._lock:
            containers = list(self._containers.values())
            self._containers.clear()
        for container in containers:
            container.worker.close()

    def _check_expiry(self, container: Container) -> None:
        if (
            not container.expired
            and self.clock.now() >= container.last_active_at + 60 * container.expiry_minutes
        ):
            self._mark_expired(container)

    def _mark_expired(self, container: Container) -> None:
        container.expired = True
        container.worker.close()
        container.files.clear()
        shutil.rmtree(container.folder, ignore_errors=True)

    # -- files -----------------------------------------------------------------------------

    def add_file(
        self,
        container: Container,
        filename: str,
        data: bytes,
        *,
        source: str = "user",
        file_id: str | None = None,
    ) -> StoredFile:
        relative = _safe_relative(filename)
        target = container.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        with self._lock:
            for old in [f for f in container.files.values() if f.relative == relative]:
                del container.files[old.id]
            stored = StoredFile(
                id=file_id or new_id("cfile", 32),
                container_id=container.id,
                relative=relative,
                created_at=int(self.clock.now()),
                source=source,
                bytes=len(data) if source == "user" else None,
            )
            container.files[stored.id] = stored
        return stored

    def sync_files(self, container: Container) -> list[StoredFile]:
        """Register files code wrote into the folder, forget deleted ones; returns the new ones."""
        if container.expired:
            return []
        on_disk = {
            p.relative_to(container.folder).as_posix() for p in container.folder.rglob("*") if p.is_file()
        }
        added: list[StoredFile] = []
        with self._lock:
            for stored in list(container.files.values()):
                if stored.relative not in on_disk:
                    del container.files[stored.id]
            known = {f.relative for f in container.files.values()}
            now = int(self.clock.now())
            for relative in sorted(on_disk - known):
                stored = StoredFile(new_id("cfile", 32), container.id, relative, now, "assistant", None)
                container.files[stored.id] = stored
                added.append(stored)
        return added

    def list_files(
        self, container: Container, *, order: str = "desc", after: str | None = None, limit: int = 20
    ) -> tuple[list[StoredFile], bool]:
        self.sync_files(container)
        with self._lock:
            items = list(container.files.values())
        return _page(items, order=order, after=after, limit=limit)

    def get_file(self, container: Container, file_id: str) -> StoredFile:
        self.sync_files(container)
        stored = container.files.get(file_id)
        if stored is None:
            raise ApiError(404, f"Container file with id '{file_id}' not found.")
        return stored

    def read_file(self, container: Container, file_id: str) -> tuple[StoredFile, bytes, str]:
        stored = self.get_file(container, file_id)
        data = (container.folder / stored.relative).read_bytes()
        return stored, data, content_type(stored.relative)

    def open_file(self, container: Container, file_id: str) -> tuple[StoredFile, BinaryIO, int, str]:
        """The file opened for streaming, with its size: a large file is sent, not held in memory."""
        stored = self.get_file(container, file_id)
        handle = (container.folder / stored.relative).open("rb")
        return stored, handle, os.fstat(handle.fileno()).st_size, content_type(stored.relative)

    def delete_file(self, container: Container, file_id: str) -> None:
        stored = self.get_file(container, file_id)
        (container.folder / stored.relative).unlink(missing_ok=True)
        with self._lock:
            container.files.pop(file_id, None)

    # -- execution -------------------------------------------------------------------------

    def run(self, container: Container, code: str) -> tuple[ExecResult, list[StoredFile]]:
        """Run code in the container's worker; returns the result and the files it created."""
        with container.run_lock:
            result = container.worker.run(code)
        container.last_active_at = int(self.clock.now())
        return result, self.sync_files(container)


def content_type(name: str) -> str:
    guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def upload_path(filename: str) -> str:
    """Where OpenAI keeps an uploaded file: ``<32 hex>-<name>``, as in the genuine
    CanUploadGetAndDeleteContainerFile record (``test-get-file.txt`` became
    ``/mnt/data/946e6dc94ac6aca10fa2bda7a127cba8-test-get-file.txt``). A sub-folder in the
    upload name is kept (unrecorded: whether OpenAI keeps it is unknown)."""
    folder, _, base = _safe_relative(filename).rpartition("/")
    prefixed = f"{secrets.token_hex(16)}-{base}"
    return f"{folder}/{prefixed}" if folder else prefixed


def _safe_relative(filename: str) -> str:
    """A path under /mnt/data from an upload name or a /mnt/data path; never escapes the folder."""
    relative = filename.removeprefix(DATA_DIR + "/").replace("\\", "/")
    parts = [part for part in relative.split("/") if part not in ("", ".", "..")]
    if not parts:
        raise ApiError(400, f"Invalid file name {filename!r}.", param="file")
    return "/".join(parts)


def _page(items: list[Any], *, order: str, after: str | None, limit: int) -> tuple[list[Any], bool]:
    if order not in ("asc", "desc"):
        raise ApiError(
            400, f"Invalid value for 'order': expected 'asc' or 'desc', got {order!r}.", param="order"
        )
    if not 1 <= limit <= 100:
        raise ApiError(
            400, f"Invalid 'limit': expected an integer between 1 and 100, got {limit}.", param="limit"
        )
    # Creation order breaks created_at ties, so paging is stable within one second.
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.id for item in ordered]
        if after not in ids:
            raise ApiError(400, f"Invalid 'after': no object with id {after!r}.", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    return ordered[:limit], len(ordered) > limit
