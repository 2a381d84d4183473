"""Local containers with the semantics of OpenAI's Containers API, each backed by a sandbox kernel.

A container is a folder ``<root>/cntr_<hex>/`` holding ``container.json`` (name, times, memory
tier, status, the file table) and ``data/`` (the sandbox's ``/mnt/data``). Its kernel is
ephemeral: killed on expiry or deletion, restarted after a crash, started afresh when a container
from an earlier session is used again. The files outlive all of that.

Files carry stable ids (``cfile_<hex>``) and a ``source``: ``user`` for uploads, ``assistant``
for files the code wrote (discovered by scanning). Reading the folder back never follows a
symlink (:mod:`.datadir`): the sandbox can create any symlink it likes in /mnt/data, and the host
must not read through it. Idle expiry is enforced lazily on every access and by a cheap periodic sweep.

A warm pool of already-started kernels (each with its own empty data folder) makes ``create``
return a container that answers immediately.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from ci_magic.backends.base import ContainerFile, ContainerInfo, ContainerRecord, FileRecord
from ci_magic.backends.local.budget import CgroupV2, parse_size
from ci_magic.backends.local.datadir import (
    DATA_PREFIX,
    container_path,
    copy_out,
    delete_file,
    remove_tree,
    scan,
    write_file,
)
from ci_magic.backends.local.isolation import (
    Isolation,
    LaunchPaths,
    PythonInfo,
    build_font_cache,
    detect_isolation,
    limits_for_tier,
    probe_python,
)
from ci_magic.backends.local.kernel import KernelSetup, LocalKernel, _wait_idle, execute, new_context, warm_up
from ci_magic.errors import ConfigurationError, ContainerFileError, SandboxError
from ci_magic.events import Event, Notice

__all__ = ["SandboxManager", "default_root"]

log = logging.getLogger(__name__)

CONTAINER_ID = re.compile(r"^cntr_[0-9a-f]{32}$")
META = "container.json"
DATA = "data"
SWEEP_SECONDS = 30.0
STALE_POOL_SECONDS = 24 * 3600  # folders of pool kernels a crashed session left behind
EXPIRED_KEEP_SECONDS = 7 * 24 * 3600  # expired containers' files stay this long, then go
DISK_PER_MEMORY = 2  # default disk_limit: twice the memory tier ("2g" for "1g")
# A new container's first run goes before the pool's refill, which forks, mounts and imports
# ~0.3 s of CPU beside it (on a loaded two-core laptop, 40-60 ms more for a warm `print(1)`);
# a container that is not run refills the pool after this many seconds.
REFILL_AFTER = 2.0


def default_root() -> Path:
    """``$XDG_CACHE_HOME/ci-magic/containers`` (``~/.cache/...``), private to the user."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ci-magic" / "containers"


@dataclass
class _Container(ContainerRecord):
    files: dict[str, FileRecord] = field(default_factory=dict)  # keyed by path below /mnt/data
    saved_active_at: int = field(default=0, repr=False)  # last_active_at as last written to disk
    kernel: LocalKernel | None = field(default=None, repr=False)
    starting: asyncio.Task[None] | None = field(default=None, repr=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def expires_at(self) -> int:
        return self.last_active_at + 60 * self.expires_after_minutes

    def touch(self, now: float) -> None:
        self.last_active_at = int(now)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "last_active_at": self.last_active_at,
            "expires_after_minutes": self.expires_after_minutes,
            "memory_limit": self.memory_limit,
            "status": self.status,
            "files": {path: asdict(record) for path, record in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Container:
        files = {str(p): FileRecord(**r) for p, r in dict(data.get("files") or {}).items()}
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            created_at=int(data["created_at"]),
            last_active_at=int(data["last_active_at"]),
            expires_after_minutes=int(data["expires_after_minutes"]),
            memory_limit=str(data["memory_limit"]),
            status=str(data["status"]),
            files=files,
        )


@dataclass
class _PoolEntry:
    id: str
    memory_limit: str
    kernel: LocalKernel
    starting: asyncio.Task[None]


class SandboxManager:
    """Creates, runs and cleans up local containers; one per session."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        python: str | None = None,
        pool_size: int = 1,
        execution_timeout: float = 120.0,
        isolation: str = "auto",
        disk_limit: str | int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``disk_limit``: what /mnt/data may hold, e.g. ``"2g"``; default: twice the memory tier."""
        if pool_size < 0:
            raise ConfigurationError(f"The sandbox pool size must be 0 or more, not {pool_size}.")
        if not execution_timeout > 0:
            raise ConfigurationError(
                "The sandbox execution timeout must be a positive number of seconds, "
                f"not {execution_timeout!r}."
            )
        self.root = Path(root) if root is not None else default_root()
        self.python = python or sys.executable
        self.pool_size = pool_size
        self.execution_timeout = float(execution_timeout)
        self.isolation_request = isolation
        self.disk_limit = parse_size(disk_limit, what="CodeInterpreter.disk_limit") if disk_limit else None
        self._cgroup: CgroupV2 | None = None
        self._clock = clock  # wall-clock seconds; a parameter so expiry can be tested without waiting
        self._containers: dict[str, _Container] = {}
        self._loaded = False
        self._pool: list[_PoolEntry] = []
        self._pool_tier = "1g"
        self._font_cache = self.root / ".matplotlib"
        self._font_cache_task: asyncio.Task[None] | None = None
        self._fill_task: asyncio.Task[None] | None = None
        self._refill_after_first_run: set[str] = set()  # new containers not run yet
        self._background: set[asyncio.Task[None]] = set()
        self._sweep_task: asyncio.Task[None] | None = None
        self._setup: tuple[PythonInfo, Isolation] | None = None
        self._setup_lock: asyncio.Lock | None = None
        self._context: zmq.asyncio.Context | None = None
        self._notices: list[Notice] = []
        self._closed = False

    # ----------------------------------------------------------------- setup

    async def _ready(self) -> tuple[PythonInfo, Isolation]:
        """Probe the interpreter and the isolation once (about 0.1 s, off the event loop)."""
        if self._closed:
            raise SandboxError("The local sandbox manager was closed; create a new one.")
        if self._setup is not None:
            return self._setup
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._setup is None:
                python = await asyncio.to_thread(probe_python, self.python)
                isolation = await asyncio.to_thread(detect_isolation, self.isolation_request, python)
                if isolation.namespaced:
                    self._cgroup = await asyncio.to_thread(CgroupV2.detect)
                if isolation.warning:
                    self._notices.append(Notice(isolation.warning, "warning"))
                if python.missing:
                    missing = ", ".join(python.missing)
                    self._notices.append(
                        Notice(
                            f"The sandbox Python ({python.executable}) lacks {missing}: code importing "
                            "them will fail. Install them there or set CodeInterpreter.sandbox_python.",
                            "warning",
                        )
                    )
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                await asyncio.to_thread(LaunchPaths.remove_stale)
                if "matplotlib" not in python.missing:
                    self._font_cache_task = asyncio.create_task(
                        asyncio.to_thread(build_font_cache, python, self._font_cache)
                    )
                self._context = new_context()
                self._setup = (python, isolation)
        return self._setup

    def take_notices(self) -> list[Notice]:
        """Warnings to show the user once (reduced isolation, missing packages); then cleared."""
        notices, self._notices = self._notices, []
        return notices

    @property
    def isolation(self) -> Isolation | None:
        """The isolation in use, once the first container was created."""
        return self._setup[1] if self._setup else None

    def pool_ready(self) -> int:
        """How many pre-started kernels are waiting for a ``create``."""
        return sum(
            e.starting.done() and not e.starting.cancelled() and e.starting.exception() is None
            for e in self._pool
        )

    async def warm(self) -> None:
        """Probe now and start filling the warm pool, so the first ``create`` is instant."""
        await self._ready()
        self._schedule_fill()

    # ------------------------------------------------------------ containers

    async def create(
        self, *, name: str, memory_limit: str = "1g", expires_after_minutes: int = 20
    ) -> ContainerInfo:
        limits_for_tier(memory_limit)  # reject unknown tiers before doing anything
        if expires_after_minutes < 1:
            raise ConfigurationError(
                f"expires_after_minutes must be at least 1, not {expires_after_minutes}."
            )
        await self._ready()
        self._load()
        entry = self._take_from_pool(memory_limit)
        now = int(self._clock())
        if entry is not None:
            cid, kernel, starting = entry.id, entry.kernel, entry.starting
        else:
            cid = self._new_folder()
            kernel = self._new_kernel(cid, memory_limit)
            starting = _start(kernel)
        container = _Container(
            id=cid,
            name=name,
            created_at=now,
            last_active_at=now,
            expires_after_minutes=expires_after_minutes,
            memory_limit=memory_limit,
            status="running",
            kernel=kernel,
            starting=starting,
        )
        self._containers[cid] = container
        self._save(container)
        self._pool_tier = memory_limit
        if self.pool_size:
            self._refill_after_first_run.add(cid)
            asyncio.get_running_loop().call_later(REFILL_AFTER, self._first_run_over, cid)
        self._ensure_sweeper()
        return container.info()

    async def get(self, container_id: str) -> ContainerInfo | None:
        container = await self._lookup(container_id)
        return container.info() if container else None

    async def containers(self) -> list[ContainerInfo]:
        self._load()
        for container in list(self._containers.values()):
            await self._check_expiry(container)
        return sorted((c.info() for c in self._containers.values()), key=lambda i: i.created_at, reverse=True)

    async def delete(self, container_id: str) -> None:
        """Stop the kernel and remove the container with its files (unknown ids: nothing to do)."""
        container = await self._lookup(container_id)
        if container is None:
            return
        await self._stop_kernel(container)
        self._containers.pop(container.id, None)
        await asyncio.to_thread(remove_tree, self._folder(container.id))

    async def _lookup(self, container_id: str) -> _Container | None:
        if not CONTAINER_ID.match(container_id or ""):
            return None
        self._load()
        container = self._containers.get(container_id)
        if container is None:
            container = self._read(container_id)  # created by another session with the same root
            if container is None:
                return None
            self._containers[container_id] = container
        await self._check_expiry(container)
        return container

    async def _usable(self, container_id: str) -> _Container:
        await self._ready()  # a container from an earlier session may be the first thing we touch
        container = await self._lookup(container_id)
        if container is None:
            raise SandboxError(
                f"There is no local container {container_id!r} (it was deleted or never existed); "
                "create a new one."
            )
        if container.status != "running":
            raise SandboxError(
                f"The local container {container_id} expired after {container.expires_after_minutes} "
                "idle minutes; create a new one (its files can still be listed and downloaded)."
            )
        return container

    async def _check_expiry(self, container: _Container) -> None:
        if container.status == "running" and self._clock() >= container.expires_at:
            container.status = "expired"
            await self._stop_kernel(container)
            self._save(container)

    async def _stop_kernel(self, container: _Container) -> None:
        starting, container.starting = container.starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        kernel, container.kernel = container.kernel, None
        if kernel is not None:
            await kernel.kill()

    async def _kernel_for(self, container: _Container) -> LocalKernel:
        if container.kernel is None:
            # A container from an earlier session: its files are here, its kernel is not.
            container.kernel = self._new_kernel(container.id, container.memory_limit)
            container.starting = _start(container.kernel)
        if container.starting is not None:
            try:
                await asyncio.shield(container.starting)
            except SandboxError:
                container.starting = None
                kernel, container.kernel = container.kernel, None
                await kernel.kill()
                raise
            container.starting = None
        return container.kernel

    # ------------------------------------------------------------- execution

    async def execute(
        self, container_id: str, code: str, *, call_id: str, timeout: float | None = None
    ) -> AsyncGenerator[Event, None]:
        """Run code in the container's kernel: its outputs, then ``CallStatus(completed|failed)``."""
        container = await self._usable(container_id)
        async with container.lock:
            kernel = await self._kernel_for(container)
            container.touch(self._clock())
            # aclosing: when our consumer stops early, the kernel-side generator must clean up
            # (interrupt the code) now, not whenever it is garbage collected.
            events = execute(kernel, code, call_id=call_id, timeout=timeout or self.execution_timeout)
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
            finally:
                # Saved by the sweep or at close: a rename per execution would double a 5 ms round trip.
                container.touch(self._clock())
                self._first_run_over(container.id)

    # ----------------------------------------------------------------- files

    async def upload(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        container = await self._usable(container_id)
        relative = container_path(filename)
        if isinstance(source, (bytes, bytearray, memoryview)):
            payload: bytes | Path = bytes(source)
        else:
            payload = Path(source)
            if not payload.is_file():
                raise ContainerFileError(f"Cannot upload {str(source)!r}: it is not a readable file.")
        user = self._sandbox_user(container.id)
        size = await asyncio.to_thread(write_file, self._data_dir(container.id), relative, payload, user)
        record = FileRecord(id=_new_id("cfile_"), created_at=int(self._clock()), source="user", bytes=size)
        container.files[relative] = record
        container.touch(self._clock())
        self._save(container)
        return _as_file(container.id, relative, record)

    async def list_files(self, container_id: str) -> builtins.list[ContainerFile]:
        container = await self._known(container_id)
        await asyncio.to_thread(self._sync_files, container)
        return [_as_file(container.id, path, rec) for path, rec in sorted(container.files.items())]

    async def get_file(self, container_id: str, file_id: str) -> ContainerFile:
        """One file's metadata (OpenAI's "retrieve container file")."""
        container = await self._known(container_id)
        relative = await self._path_of(container, file_id)
        return _as_file(container.id, relative, container.files[relative])

    async def download(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        """Copy a file into the new file ``dest``, bounded by ``max_bytes`` (``datadir.copy_out``)."""
        container = await self._known(container_id)
        relative = await self._path_of(container, file_id)
        try:
            return await asyncio.to_thread(
                copy_out, self._data_dir(container.id), relative, dest, max_bytes=max_bytes
            )
        except FileNotFoundError:
            container.files.pop(relative, None)
            self._save(container)
            raise ContainerFileError(
                f"/mnt/data/{relative} was removed from container {container.id} before it could be read."
            ) from None

    async def delete_file(self, container_id: str, file_id: str) -> None:
        container = await self._known(container_id)
        relative = await self._path_of(container, file_id)
        await asyncio.to_thread(delete_file, self._data_dir(container.id), relative)
        container.files.pop(relative, None)
        container.touch(self._clock())
        self._save(container)

    async def _known(self, container_id: str) -> _Container:
        container = await self._lookup(container_id)
        if container is None:
            raise ContainerFileError(f"There is no local container {container_id!r}, so it has no files.")
        return container

    async def _path_of(self, container: _Container, file_id: str) -> str:
        for attempt in range(2):
            for path, record in container.files.items():
                if record.id == file_id:
                    return path
            if attempt == 0:
                await asyncio.to_thread(self._sync_files, container)
        raise ContainerFileError(f"Container {container.id} has no file with id {file_id!r}.")

    def _sync_files(self, container: _Container) -> None:
        """Bring the file table up to date with the folder: new files are the assistant's."""
        found = dict(scan(self._data_dir(container.id)))
        changed = False
        for path in list(container.files):
            if path not in found:
                del container.files[path]
                changed = True
        for path, (size, mtime) in found.items():
            record = container.files.get(path)
            if record is None:
                container.files[path] = FileRecord(
                    id=_new_id("cfile_"), created_at=int(mtime), source="assistant", bytes=size
                )
                changed = True
            elif record.bytes != size:
                record.bytes = size
                changed = True
        if changed:
            self._save(container)

    # ------------------------------------------------------------------ pool

    def _take_from_pool(self, memory_limit: str) -> _PoolEntry | None:
        for entry in list(self._pool):
            if entry.memory_limit != memory_limit:
                continue
            self._pool.remove(entry)
            failed = entry.starting.done() and (entry.starting.cancelled() or entry.starting.exception())
            if failed:
                self._discard_later(entry)
                continue
            return entry
        return None

    def _first_run_over(self, cid: str) -> None:
        """The container's first run ended (or it was not run in time): refill the pool now."""
        if cid in self._refill_after_first_run:
            self._refill_after_first_run.discard(cid)
            self._schedule_fill()

    def _schedule_fill(self) -> None:
        if self.pool_size and not self._closed and (self._fill_task is None or self._fill_task.done()):
            self._fill_task = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        # One kernel at a time: a burst of starts would compete with the user's own work.
        while not self._closed:
            for entry in [e for e in self._pool if e.memory_limit != self._pool_tier]:
                self._pool.remove(entry)
                await self._discard(entry)
            if len(self._pool) >= self.pool_size or self._refill_after_first_run:
                return  # full, or a new container's first run goes first (_first_run_over refills)
            cid = self._new_folder()
            kernel = self._new_kernel(cid, self._pool_tier)
            entry = _PoolEntry(cid, self._pool_tier, kernel, _start(kernel, warm=True))
            self._pool.append(entry)
            await asyncio.wait([entry.starting])
            if not entry.starting.cancelled() and entry.starting.exception() is not None:
                log.warning("ci-magic: could not pre-start a sandbox: %s", entry.starting.exception())
                return  # create() will report the error; retrying here would only spin

    def _discard_later(self, entry: _PoolEntry) -> None:
        task = asyncio.create_task(self._discard(entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _discard(self, entry: _PoolEntry) -> None:
        if not entry.starting.done():
            entry.starting.cancel()
        with contextlib.suppress(BaseException):
            await entry.starting
        await entry.kernel.kill()
        await asyncio.to_thread(remove_tree, self._folder(entry.id))

    # ------------------------------------------------------------ lifecycle

    def _ensure_sweeper(self) -> None:
        if self._sweep_task is None or self._sweep_task.done():
            self._sweep_task = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while not self._closed:
            await asyncio.sleep(SWEEP_SECONDS)
            for container in list(self._containers.values()):
                await self._check_expiry(container)
                self._save_if_active(container)

    async def aclose(self) -> None:
        """Kill every kernel and the pool; the containers' files stay until they expire."""
        self._closed = True
        for task in (self._fill_task, self._sweep_task, self._font_cache_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        pool, self._pool = self._pool, []
        for entry in pool:
            await self._discard(entry)
        for container in self._containers.values():
            await self._stop_kernel(container)
            self._save_if_active(container)
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    # ------------------------------------------------------------- plumbing

    def _folder(self, cid: str) -> Path:
        return self.root / cid

    def _data_dir(self, cid: str) -> Path:
        return self.root / cid / DATA

    def _sandbox_user(self, cid: str) -> tuple[int, int] | None:
        return self._setup[1].sandbox_user(cid) if self._setup else None

    def _new_folder(self) -> str:
        cid = _new_id("cntr_")
        data = self._data_dir(cid)
        data.mkdir(parents=True, mode=0o700)
        os.chmod(data, 0o755)
        user = self._sandbox_user(cid)
        if user:
            os.chown(data, *user)
        return cid

    def _new_kernel(self, cid: str, memory_limit: str) -> LocalKernel:
        python, isolation = self._setup or (None, None)
        if python is None or isolation is None or self._context is None:
            raise SandboxError("The local sandbox manager is not ready.")
        setup = KernelSetup(
            isolation=isolation,
            python=python,
            data_dir=self._data_dir(cid),
            limits=limits_for_tier(memory_limit, disk_bytes=self._disk_limit_for(memory_limit)),
            user=isolation.sandbox_user(cid),
            font_cache=self._font_cache,
            cgroup=self._cgroup,
            tier=memory_limit,
        )
        return LocalKernel(setup, context=self._context)

    def _disk_limit_for(self, memory_limit: str) -> int:
        return self.disk_limit or DISK_PER_MEMORY * limits_for_tier(memory_limit).memory_bytes

    def _save(self, container: _Container) -> None:
        folder = self._folder(container.id)
        if not folder.is_dir():
            return  # deleted meanwhile
        tmp = folder / f".{META}.tmp"
        tmp.write_text(json.dumps(container.to_json()))
        os.replace(tmp, folder / META)
        container.saved_active_at = container.last_active_at

    def _save_if_active(self, container: _Container) -> None:
        if container.saved_active_at != container.last_active_at:
            self._save(container)

    def _read(self, cid: str) -> _Container | None:
        try:
            return _Container.from_json(json.loads((self._folder(cid) / META).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load(self) -> None:
        """Read containers left by earlier sessions; clean what nobody can use any more."""
        if self._loaded:
            return
        self._loaded = True
        if not self.root.is_dir():
            return
        now = self._clock()
        for folder in self.root.iterdir():
            if not CONTAINER_ID.match(folder.name) or folder.name in self._containers:
                continue
            container = self._read(folder.name)
            try:
                age = now - folder.stat().st_mtime
            except OSError:
                continue
            if container is None:
                if age > STALE_POOL_SECONDS:
                    remove_tree(folder)
                continue
            if container.status == "running" and now >= container.expires_at:
                container.status = "expired"
            if container.status == "expired" and now - container.expires_at > EXPIRED_KEEP_SECONDS:
                remove_tree(folder)
                continue
            self._containers[container.id] = container


# -- first cell fast (issue 11): pooled kernels import the data stack before they are handed out --
# ``__import__`` binds no name in the user's namespace; silent and unstored, so the sandbox's history
# and execution count start clean. A missing package is ignored here (``create`` warns about it).
PRE_IMPORT = (
    "for _ci_module in ('numpy', 'pandas', 'matplotlib.pyplot'):\n"
    "    try:\n        __import__(_ci_module)\n    except Exception:\n        pass\n"
    "del _ci_module"
)


async def _pre_import(kernel: LocalKernel, *, timeout: float = 30.0) -> None:
    msg_id = kernel.client.execute(PRE_IMPORT, silent=True, store_history=False, allow_stdin=False)
    await _wait_idle(kernel, msg_id, timeout)


# -- end of first cell fast --


def _start(kernel: LocalKernel, *, warm: bool = False) -> asyncio.Task[None]:
    async def start() -> None:
        await kernel.start()
        if warm:
            await warm_up(kernel)
            await _pre_import(kernel)

    task = asyncio.create_task(start())
    # Whoever uses the container reports a failed start; nobody may, so mark it as seen.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _as_file(cid: str, relative: str, record: FileRecord) -> ContainerFile:
    return ContainerFile(
        id=record.id,
        container_id=cid,
        path=DATA_PREFIX + relative,
        bytes=record.bytes,
        created_at=record.created_at,
        source=record.source,
    )
