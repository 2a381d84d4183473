"""Containers and container files as OpenAI's Containers API presents them, served by any ``Backend``.

The server keeps OpenAI's side of each container (its ``cntr_<48 hex>`` id, name, expiry on a
``Clock`` tests can advance, the file table with OpenAI's ``cfile_<32 hex>`` ids) and leaves the
real work to a :class:`ci_magic.backends.base.Backend`: the backend container (started lazily, on
the first upload or code run), its files, and running code. By default that is a
``LocalBackend``, so code runs in a real sandbox kernel, isolated as the product isolates it.

Files code writes are picked up on the next look and listed as ``source: "assistant"`` with
``bytes: null``, as OpenAI lists model-written files. A container whose ``last_active_at`` plus
its ``expires_after.minutes`` has passed is expired: its backend container is deleted, files and all.
Downloads go through ``Backend.download_file`` (streamed into a temporary file, at most
``DOWNLOAD_CAP`` bytes), so the server never reads the sandbox's folder itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import mimetypes
import os
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ci_magic.backends.base import Backend, ContainerFile, Conversation, TurnRequest
from ci_magic.errors import CIError
from ci_magic.events import Completed, Event
from tests.servers.http_base import ApiError

__all__ = [
    "DATA_DIR",
    "BackendRunner",
    "Clock",
    "Container",
    "ContainerStore",
    "StoredFile",
    "local_backend",
    "new_id",
    "sandbox_problem",
    "shared_local_backend",
    "upload_path",
]

DATA_DIR = "/mnt/data"
DEFAULT_EXPIRY_MINUTES = 20
MEMORY_LIMITS = ("1g", "4g", "16g", "64g")
DOWNLOAD_CAP = 1 << 30
# The server enforces expiry on its own clock (tests move it); the backend container must not
# expire first in real time. 20 minutes is also the longest OpenAI's containers accept.
_BACKEND_EXPIRY_MINUTES = 20
T = TypeVar("T")


def new_id(prefix: str, hex_chars: int) -> str:
    return f"{prefix}_{secrets.token_hex(hex_chars // 2)}"


class Clock:
    """Wall-clock seconds plus an offset that tests move forward; :meth:`freeze` stops the wall clock."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._frozen_at: float | None = None

    def now(self) -> float:
        return (time.time() if self._frozen_at is None else self._frozen_at) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def freeze(self) -> None:
        """From now on only :meth:`advance` moves the clock: a test that steps up to one second
        before a deadline (timestamps are whole seconds) stays there however slow the machine."""
        self._frozen_at = time.time()


class BackendRunner:
    """A backend and the event loop it lives on (a daemon thread): request threads call ``run``.
    ``folder``: removed when the runner closes (a local backend's containers)."""

    def __init__(self, backend: Backend, folder: Path | None = None) -> None:
        self.backend = backend
        self.folder = folder
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="backend-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self.backend.aclose())
        self.run(_settle())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


async def _settle(timeout: float = 30.0) -> None:
    """Let the backend's background work end (a sandbox builds its font cache in a thread, which
    cancelling its task does not stop), so nothing writes into the folder after it is removed."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=timeout)
    await asyncio.get_running_loop().shutdown_default_executor()


DEFAULT_EXEC_TIMEOUT = 60.0
# What a hosted container may hold on disk: more than the local default (twice the 1g tier), so
# files of a few GiB (sparse ones count whole) can be made there as on OpenAI's containers.
SERVER_DISK_LIMIT = "8g"
_shared: list[BackendRunner] = []
_shared_lock = threading.Lock()


def local_backend(exec_timeout: float = DEFAULT_EXEC_TIMEOUT, *, pool_size: int = 0) -> BackendRunner:
    """A new ``LocalBackend`` (a real sandbox per container) on its own runner."""
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.sandbox import SandboxManager

    root = Path(tempfile.mkdtemp(prefix="ci-openai-server-"))
    sandbox = SandboxManager(
        root, pool_size=pool_size, execution_timeout=exec_timeout, disk_limit=SERVER_DISK_LIMIT
    )
    backend = LocalBackend(sandbox, model_client=None, model="")
    runner = BackendRunner(backend, root)
    if pool_size:
        with contextlib.suppress(CIError):  # no sandbox here: said on first use, not at startup
            runner.run(backend.warm())  # the pool starts filling now, before the first container
    return runner


def shared_local_backend() -> BackendRunner:
    """One ``LocalBackend`` for the whole process, its warm pool shared by every server that
    keeps the default timeout: a test's first container comes from the pool, not a cold start."""
    with _shared_lock:
        if not _shared:
            _shared.append(local_backend(pool_size=2))
            _at_exit(_close_shared)
        return _shared[0]


@functools.cache
def sandbox_problem() -> str | None:
    """Why local sandboxes cannot run here (no working bubblewrap...), or None when they can."""
    from ci_magic.backends.local.isolation import detect_isolation, probe_python
    from ci_magic.errors import CIError

    try:
        detect_isolation("auto", probe_python(sys.executable))
    except CIError as error:
        return str(error)
    return None


def _at_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` as the interpreter exits, while thread pools still take work (closing the
    backend kills its kernels through ``asyncio.to_thread``): ``atexit`` runs after they shut down."""
    register = getattr(threading, "_register_atexit", None)
    (register or atexit.register)(callback)


def _close_shared() -> None:
    with _shared_lock:
        runners = list(_shared)
        _shared.clear()
    for runner in runners:
        runner.close()


@dataclass
class StoredFile:
    id: str
    container_id: str
    relative: str  # path inside /mnt/data, "/"-separated
    created_at: int
    source: str  # "user" | "assistant"
    bytes: int | None
    backend_id: str = ""  # the backend's id of the same file

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
    backend_id: str | None = None  # created on first use
    files: dict[str, StoredFile] = field(default_factory=dict)
    expired: bool = False
    # One call at a time per container, as one kernel runs one cell at a time.
    run_lock: threading.Lock = field(default_factory=threading.Lock)
    # Starting and dropping the backend container, which must not wait for a running call.
    backend_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def __init__(self, runner: BackendRunner, clock: Clock) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.clock = clock
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
        container = Container(
            id=new_id("cntr", 48),
            name=name,
            created_at=now,
            last_active_at=now,
            expiry_minutes=minutes,
            memory_limit=memory_limit,
            network_policy=body.get("network_policy") or {"type": "disabled"},
        )
        with self._lock:
            self._containers[container.id] = container
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

    def all(
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
        self._drop_backend(container)

    def expire(self, container_id: str) -> None:
        with self._lock:
            container = self._containers.get(container_id)
        if container is None:
            raise KeyError(container_id)
        self._mark_expired(container)

    def close(self) -> None:
        """Delete every backend container this store started (the backend itself stays)."""
        with self._lock:
            containers = list(self._containers.values())
            self._containers.clear()
        for container in containers:
            self._drop_backend(container)

    def backend_id(self, container: Container) -> str:
        """The backend container behind ``container``, started now if it was not yet."""
        with container.backend_lock:
            if container.backend_id is None:
                info = self.runner.run(
                    self.backend.create_container(
                        name=container.name,
                        memory_limit=container.memory_limit,  # type: ignore[arg-type]
                        expires_after_minutes=max(container.expiry_minutes, _BACKEND_EXPIRY_MINUTES),
                    )
                )
                container.backend_id = info.id
            return container.backend_id

    def _check_expiry(self, container: Container) -> None:
        if (
            not container.expired
            and self.clock.now() >= container.last_active_at + 60 * container.expiry_minutes
        ):
            self._mark_expired(container)

    def _mark_expired(self, container: Container) -> None:
        container.expired = True
        container.files.clear()
        self._drop_backend(container)

    def _drop_backend(self, container: Container) -> None:
        with container.backend_lock:
            backend_id, container.backend_id = container.backend_id, None
        if backend_id is not None:
            self.runner.run(self.backend.delete_container(backend_id))

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
        uploaded = self.runner.run(self.backend.upload_file(self.backend_id(container), relative, data))
        relative = uploaded.name  # where the backend put it (OpenAI's own prefixes the name again)
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
                backend_id=uploaded.id,
            )
            container.files[stored.id] = stored
        return stored

    def sync_files(self, container: Container) -> list[StoredFile]:
        """Register files code wrote, forget deleted ones; returns the new ones."""
        if container.expired or container.backend_id is None:
            return []
        listed: list[ContainerFile] = self.runner.run(self.backend.list_files(container.backend_id))
        on_backend = {file.name: file for file in listed}
        added: list[StoredFile] = []
        with self._lock:
            for stored in list(container.files.values()):
                if stored.relative not in on_backend:
                    del container.files[stored.id]
                else:
                    stored.backend_id = on_backend[stored.relative].id
            known = {f.relative for f in container.files.values()}
            now = int(self.clock.now())
            for relative in sorted(set(on_backend) - known):
                stored = StoredFile(
                    new_id("cfile", 32),
                    container.id,
                    relative,
                    now,
                    "assistant",
                    None,
                    on_backend[relative].id,
                )
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

    def open_file(self, container: Container, file_id: str) -> tuple[StoredFile, BinaryIO, int, str]:
        """The file opened for streaming, with its size: a large file is sent, not held in memory."""
        stored = self.get_file(container, file_id)
        backend_id = self.backend_id(container)
        opened = _open_local(self.backend, backend_id, stored.relative)
        if opened is None:
            opened = self._download(backend_id, stored.backend_id)
        return stored, opened[0], opened[1], content_type(stored.relative)

    def _download(self, backend_id: str, file_id: str) -> tuple[BinaryIO, int]:
        """Any backend: ``download_file`` into a temporary file, opened and unlinked at once."""
        folder = Path(tempfile.mkdtemp(prefix="ci-openai-download-"))
        target = folder / "file"
        try:
            size = self.runner.run(
                self.backend.download_file(backend_id, file_id, target, max_bytes=DOWNLOAD_CAP)
            )
            return target.open("rb"), size
        finally:
            target.unlink(missing_ok=True)
            folder.rmdir()

    def delete_file(self, container: Container, file_id: str) -> None:
        stored = self.get_file(container, file_id)
        self.runner.run(self.backend.delete_file(self.backend_id(container), stored.backend_id))
        with self._lock:
            container.files.pop(file_id, None)

    # -- execution -------------------------------------------------------------------------

    def run(self, container: Container, code: str, *, model: str = "") -> list[Event]:
        """Run code in the backend container (as ``%%ci_exec`` does): the events it produced.
        ``model``: for a backend that asks a model to run the code verbatim (the openai one)."""
        request = TurnRequest(
            prompt="",
            container_id=self.backend_id(container),
            model=model,
            instructions="",
            conversation=Conversation(),
            exec_code=code,
        )
        with container.run_lock:
            events = self.runner.run(_collect(self.backend, request))
        container.last_active_at = int(self.clock.now())
        return events


def _open_local(backend: Backend, backend_id: str, relative: str) -> tuple[BinaryIO, int] | None:
    """A local backend's file opened in place, so a huge (even sparse) file streams to the client
    as OpenAI would send it, which a bounded ``download_file`` cannot do. Opened as the backend
    reads its files (``datadir``): no symlink followed at any step, regular single-link files only.
    None for other backends."""
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.datadir import _open_dirs

    if not isinstance(backend, LocalBackend):
        return None
    *folders, name = relative.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        with _open_dirs(backend.sandbox._data_dir(backend_id), tuple(folders)) as dir_fd:
            fd = os.open(name, flags, dir_fd=dir_fd)
    except (OSError, CIError) as error:
        raise ApiError(404, f"Container file /mnt/data/{relative} cannot be read: {error}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise ApiError(404, f"Container file /mnt/data/{relative} is not a regular file.")
    return os.fdopen(fd, "rb"), info.st_size


async def _collect(backend: Backend, request: TurnRequest) -> list[Event]:
    events: list[Event] = []
    async for event in backend.stream(request):
        events.append(event)
        if isinstance(event, Completed):
            break
    return events


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
