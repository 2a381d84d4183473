"""GatewayBackend: the Backend protocol on kernels run by Jupyter Kernel Gateway / Enterprise Gateway.

A container is one gateway kernel (``POST /api/kernels``); its id is the kernel's id. Code runs
over the kernel's WebSocket channels and its messages become events through the same translation
the local sandbox uses (:mod:`ci_magic.backends.kernel_messages`). The model side is the local
backend's Chat Completions loop (:class:`~ci_magic.backends.local.model_loop.ChatModelLoop`):
only where code runs differs.

Files go through the kernel itself (:mod:`._kernel_io`), in chunks of ``chunk_bytes`` with a
SHA-256 per chunk and per file; every operation is idempotent, so after a dropped socket the
transfer resumes where the kernel is. The data folder is ``/mnt/data`` when the kernelspec starts
the kernel through ci-magic's sandbox launcher (it starts there), else a per-kernel folder in
the kernel's temp directory; file paths and schema cards carry the real path.

Lifecycle: a kernel that is gone (culled, deleted, the gateway restarted) answers 404; that is
reported as a gone container, so the session starts a new kernel and re-sends the files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ci_magic import events
from ci_magic.backends.base import (
    ContainerFile,
    ContainerInfo,
    ContainerRecord,
    FileRecord,
    MemoryLimit,
    TurnRequest,
    check_reported_size,
    discard_download,
    open_download_target,
    size_text,
    stream_past_cap,
)
from ci_magic.backends.gateway.client import ChannelClosed, GatewayClient, KernelChannels, KernelGone
from ci_magic.backends.kernel_messages import events_from_message, idle_after
from ci_magic.backends.local.datadir import container_path
from ci_magic.errors import BackendError, CIError, ConfigurationError, ContainerFileError, StreamError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ci_magic.backends.local.model_loop import ChatModelLoop

__all__ = ["SANDBOX_DATA", "GatewayBackend", "GatewayFile", "Progress"]

SANDBOX_DATA = "/mnt/data"
IO_MIME = "application/x-ci-magic-io+json"
IO_SOURCE = (Path(__file__).with_name("_kernel_io.py")).read_text(encoding="utf-8")
CHUNK_BYTES = 1 << 20
IO_TIMEOUT = 120.0  # seconds one file operation may take in the kernel
INTERRUPT_GRACE = 3.0
START_TIMEOUT = 180.0  # a new kernel on a busy gateway (or a pod being scheduled) may take minutes
POLL = 0.25
SILENCE_CHECK = 3.0  # seconds without a message before asking the gateway whether the kernel still exists
MAX_DROPS = 3  # reconnects one file transfer may need before it gives up
_KERNEL_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # a gateway kernel id, safe in a URL path

Progress = Callable[[str, int, int], None]
"""``progress(name, bytes_done, bytes_total)`` during a file transfer."""

NO_MODEL_MESSAGE = (
    "The gateway backend runs code on the gateway, but prompts need a model server, and none is "
    "configured. Point it at any OpenAI-compatible Chat Completions server with "
    '`%config CodeInterpreter.model_base_url = "http://localhost:11434/v1"` (or the '
    "CI_MAGIC_MODEL_BASE_URL environment variable). %%ci_exec runs code on the gateway without a model."
)


@dataclass(frozen=True)
class GatewayFile(ContainerFile):
    """A container file whose data folder may be a per-kernel folder rather than /mnt/data."""

    folder: str = SANDBOX_DATA

    @property
    def name(self) -> str:
        prefix = self.folder.rstrip("/") + "/"
        return self.path[len(prefix) :] if self.path.startswith(prefix) else super().name


@dataclass
class _Kernel(ContainerRecord):
    """One container: a gateway kernel, its channels and the files we know of."""

    channels: KernelChannels
    data_dir: str = SANDBOX_DATA
    files: dict[str, FileRecord] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def as_file(self, relative: str, record: FileRecord) -> GatewayFile:
        return GatewayFile(
            id=record.id,
            container_id=self.id,
            path=f"{self.data_dir.rstrip('/')}/{relative}",
            bytes=record.bytes,
            created_at=record.created_at,
            source=record.source,
            folder=self.data_dir,
        )


class GatewayBackend:
    name = "gateway"

    def __init__(
        self,
        client: GatewayClient,
        *,
        kernel_name: str = "",
        model_client: AsyncOpenAI | None = None,
        model: str = "",
        max_steps: int = 12,
        loop_options: dict[str, Any] | None = None,
        execution_timeout: float = 120.0,
        upload_size_cap: int = 512 * 1024 * 1024,
        chunk_bytes: int = CHUNK_BYTES,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not execution_timeout > 0:
            raise ConfigurationError(
                f"execution_timeout must be a positive number of seconds, not {execution_timeout!r}."
            )
        self.client = client
        self.kernel_name = kernel_name
        self.model_client = model_client
        self.model = model
        self.max_steps = max_steps
        self.loop_options = dict(loop_options or {})  # ChatModelLoop's settings, as the local backend's
        self._loop: ChatModelLoop | None = None  # one per backend: it remembers the server's model
        self.execution_timeout = float(execution_timeout)
        self.upload_size_cap = upload_size_cap
        self.chunk_bytes = max(4096, min(chunk_bytes, CHUNK_BYTES * 4))
        self.progress = progress
        self._clock = clock
        self._kernels: dict[str, _Kernel] = {}

    def __repr__(self) -> str:
        return f"GatewayBackend({self.client.shown_url!r}, kernel_name={self.kernel_name!r})"

    # ------------------------------------------------------------ containers

    async def create_container(
        self, *, name: str, memory_limit: MemoryLimit, expires_after_minutes: int
    ) -> ContainerInfo:
        kernel_name = self.kernel_name or await self.client.default_kernel_name()
        # Gateways pass KERNEL_* variables to the kernel; ci-magic's kernelspec reads the memory tier.
        env = {"KERNEL_CI_MAGIC_MEMORY_LIMIT": str(memory_limit), "KERNEL_CI_MAGIC_CONTAINER": name}
        model = await self.client.start_kernel(kernel_name, env)
        now = int(self._clock())
        kernel = _Kernel(
            id=model.id,
            name=name,
            created_at=now,
            last_active_at=now,
            expires_after_minutes=expires_after_minutes,
            memory_limit=str(memory_limit),
            status="running",
            channels=KernelChannels(self.client, model.id),
        )
        try:
            await kernel.channels.connect(timeout=START_TIMEOUT)
            answer = await self._io(kernel, {"op": "setup", "folder": _folder_name(model.id)})
        except BaseException:
            await kernel.channels.close()
            with contextlib.suppress(BackendError):
                await self.client.delete_kernel(model.id)
            raise
        root = answer.get("root")
        if not isinstance(root, str) or not root.startswith("/"):
            raise BackendError("The gateway kernel did not report its data folder.")
        kernel.data_dir = root
        self._kernels[kernel.id] = kernel
        return kernel.info()

    async def get_container(self, container_id: str) -> ContainerInfo | None:
        kernel = self._kernels.get(container_id)
        if kernel is None:
            return None  # a kernel this session did not start: its data folder is unknown
        if (
            kernel.status == "running"
            and self._clock() >= kernel.last_active_at + 60 * kernel.expires_after_minutes
        ):
            kernel.status = "expired"
            await self._stop(kernel)
        if kernel.status != "running":
            return kernel.info()
        if await self.client.get_kernel(container_id) is None:
            await self._forget(kernel)
            return None
        return kernel.info()

    async def adopt(
        self, container_id: str, *, expires_after_minutes: int = 20, memory_limit: str = "1g"
    ) -> ContainerInfo | None:
        """A kernel this backend did not start: the session's own, from before the notebook's kernel
        restarted (the gateway kept it, with its memory). Connects, learns its data folder and files;
        None when the gateway no longer has it."""
        if container_id in self._kernels:
            return await self.get_container(container_id)
        if not _KERNEL_ID.fullmatch(container_id) or await self.client.get_kernel(container_id) is None:
            return None
        now = int(self._clock())
        kernel = _Kernel(
            id=container_id,
            name="",
            created_at=now,
            last_active_at=now,
            expires_after_minutes=expires_after_minutes,
            memory_limit=memory_limit,
            status="running",
            channels=KernelChannels(self.client, container_id),
        )
        try:
            await kernel.channels.connect(timeout=START_TIMEOUT)
            answer = await self._io(kernel, {"op": "setup", "folder": _folder_name(container_id)})
        except KernelGone:
            await kernel.channels.close()
            return None
        except BaseException:
            await kernel.channels.close()
            raise
        root = answer.get("root")
        if not isinstance(root, str) or not root.startswith("/"):
            await kernel.channels.close()
            raise BackendError("The gateway kernel did not report its data folder.")
        kernel.data_dir = root
        self._kernels[kernel.id] = kernel
        await self.list_files(kernel.id)
        return kernel.info()

    async def delete_container(self, container_id: str) -> None:
        kernel = self._kernels.pop(container_id, None)
        if kernel is not None:
            if kernel.data_dir != SANDBOX_DATA:
                # A per-session folder outlives the kernel unless removed now (best effort).
                cleanup = self._io(kernel, {"op": "cleanup", "root": kernel.data_dir})
                with contextlib.suppress(CIError, ChannelClosed, asyncio.TimeoutError):
                    await asyncio.wait_for(cleanup, 10)
            await kernel.channels.close()
        await self.client.delete_kernel(container_id)

    async def _stop(self, kernel: _Kernel) -> None:
        await kernel.channels.close()
        with contextlib.suppress(BackendError):
            await self.client.delete_kernel(kernel.id)

    async def _forget(self, kernel: _Kernel) -> None:
        self._kernels.pop(kernel.id, None)
        await kernel.channels.close()

    def _usable(self, container_id: str) -> _Kernel:
        kernel = self._kernels.get(container_id)
        if kernel is None:
            raise KernelGone(
                f"The gateway kernel {container_id} is gone (culled, deleted, or the gateway restarted); "
                "the next cell starts a new one and re-sends your files."
            )
        if kernel.status != "running":
            raise KernelGone(
                f"The gateway kernel {container_id} expired after {kernel.expires_after_minutes} idle "
                "minutes; the next cell starts a new one and re-sends your files."
            )
        return kernel

    async def _connected(self, kernel: _Kernel) -> KernelChannels:
        if not kernel.channels.connected:
            try:
                await kernel.channels.connect()
            except KernelGone:
                await self._forget(kernel)
                raise
        return kernel.channels

    async def _check_alive(self, kernel: _Kernel) -> None:
        """Raise KernelGone when the gateway no longer has the kernel (its socket just goes quiet)."""
        if await self.client.get_kernel(kernel.id) is None:
            await self._forget(kernel)
            raise KernelGone(
                f"The gateway kernel {kernel.id} disappeared (culled, deleted, or the gateway restarted); "
                "the next cell starts a new one and re-sends your files."
            )

    async def _reconnect(self, kernel: _Kernel) -> None:
        try:
            await kernel.channels.reconnect()
        except KernelGone:
            await self._forget(kernel)
            raise KernelGone(
                f"The gateway kernel {kernel.id} disappeared (culled, deleted, or the gateway restarted); "
                "the next cell starts a new one and re-sends your files."
            ) from None
        except ConfigurationError:
            raise
        except BackendError as err:
            raise StreamError(
                f"The connection to the gateway at {self.client.shown_url} broke and did not come back "
                f"({err.message}); what arrived is shown above. Run the cell again when the gateway is "
                "reachable."
            ) from None

    # ------------------------------------------------------------- execution

    def stream(self, request: TurnRequest) -> AsyncIterator[events.Event]:
        if request.exec_code is not None:
            return self._run_code(request, request.exec_code)
        return self._run_model(request)

    async def _run_code(self, request: TurnRequest, code: str) -> AsyncIterator[events.Event]:
        """%%ci_exec: the code as one call, exactly as the model loop would run it."""
        kernel = self._usable(request.container_id)
        # A gone kernel fails here, before any event, so the session replaces it and runs the turn again.
        await self._check_alive(kernel)
        await self._connected(kernel)
        call_id = "ci_" + secrets.token_hex(12)
        yield events.TurnStarted()
        yield events.CallStarted(call_id=call_id, container_id=kernel.id)
        yield events.CodeDone(call_id=call_id, code=code)
        yield events.CallStatus(call_id=call_id, status="running")
        outputs = self.execute(kernel.id, code, call_id=call_id)
        async with contextlib.aclosing(outputs):  # Ctrl-C: interrupt the kernel at once
            async for event in outputs:
                yield event
        yield events.Completed(container_id=kernel.id)

    async def _run_model(self, request: TurnRequest) -> AsyncIterator[events.Event]:
        if self.model_client is None:
            raise ConfigurationError(NO_MODEL_MESSAGE)
        from ci_magic.backends.local.model_loop import ChatModelLoop

        kernel = self._usable(request.container_id)
        await self._check_alive(kernel)
        await self._connected(kernel)
        if kernel.data_dir != SANDBOX_DATA:
            request = dataclasses.replace(
                request,
                instructions=f"{request.instructions.rstrip()}\n\nIn this sandbox the data folder is "
                f"{kernel.data_dir}, not /mnt/data: it is the working directory, so read and save files "
                "there with relative names.",
            )
        if self._loop is None:
            self._loop = ChatModelLoop(
                self.model_client, model=self.model, max_steps=self.max_steps, **self.loop_options
            )
        loop = self._loop  # the cell's --model (request.model) wins over the configured one

        def run(code: str, call_id: str) -> AsyncIterator[events.Event]:
            return self.execute(kernel.id, code, call_id=call_id)

        async for event in loop.run(request, run):
            yield event

    async def execute(
        self, container_id: str, code: str, *, call_id: str, timeout: float | None = None
    ) -> AsyncGenerator[events.Event, None]:
        """Run code in the kernel: its outputs, then ``CallStatus(completed|failed)``.

        Past ``timeout`` the code is interrupted through the gateway; if it ignores that, the kernel
        is restarted. A socket cut mid-run reconnects once (the gateway replays what the kernel sent
        meanwhile); a second cut ends the call with a StreamError, keeping what arrived.
        """
        kernel = self._usable(container_id)
        limit = timeout or self.execution_timeout
        async with kernel.lock:
            channels = await self._connected(kernel)
            kernel.last_active_at = int(self._clock())
            content = {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            }
            msg_id = await self._send(kernel, "execute_request", content)
            deadline = time.monotonic() + limit
            heard = time.monotonic()
            failed = finished = reconnected = False
            interrupted_at: float | None = None
            try:
                while True:
                    now = time.monotonic()
                    if interrupted_at is None and now >= deadline:
                        await self.client.interrupt_kernel(kernel.id)
                        interrupted_at = now
                    if interrupted_at is not None and now >= interrupted_at + INTERRUPT_GRACE:
                        await self.client.restart_kernel(kernel.id)
                        finished = True
                        # A restarted kernel starts in its launch folder: enter the data folder again.
                        await self._io_unlocked(kernel, {"op": "setup", "folder": _folder_name(kernel.id)})
                        yield events.ExecutionError(
                            call_id, "TimeoutError",
                            f"The code ran longer than the {limit:g} s limit and did not stop when "
                            "interrupted. The kernel was restarted: variables and imports are gone, files "
                            "are intact.",
                        )  # fmt: skip
                        yield events.CallStatus(call_id, "failed")
                        return
                    try:
                        msg = await channels.next_message(msg_id, POLL)
                        if msg is None and time.monotonic() - heard >= SILENCE_CHECK:
                            heard = time.monotonic()
                            await self._check_alive(kernel)
                    except ChannelClosed:
                        if reconnected:
                            raise StreamError(
                                f"The connection to the kernel on the gateway at {self.client.shown_url} "
                                "broke again while the code ran; what arrived is shown above. The kernel "
                                "may still be running it; check with %%ci_exec before running it again."
                            ) from None
                        reconnected = True
                        await self._reconnect(kernel)
                        continue
                    if msg is None:
                        continue
                    heard = time.monotonic()
                    if msg.get("channel") not in (None, "iopub"):
                        continue
                    if idle_after(msg, msg_id):
                        break
                    for event in events_from_message(msg, call_id):
                        if isinstance(event, events.ExecutionError):
                            failed = True
                            if interrupted_at is not None and event.name == "KeyboardInterrupt":
                                event = events.ExecutionError(
                                    call_id, "TimeoutError",
                                    f"The code ran longer than the {limit:g} s limit and was interrupted "
                                    "(variables defined so far are kept).",
                                    event.traceback,
                                )  # fmt: skip
                        yield event
                finished = True
                if reconnected:
                    yield events.Notice(
                        "The connection to the gateway dropped mid-run and was re-established."
                    )
                yield events.CallStatus(
                    call_id, "failed" if failed or interrupted_at is not None else "completed"
                )
            finally:
                kernel.last_active_at = int(self._clock())
                if not finished and kernel.id in self._kernels:
                    # The consumer stopped (Ctrl-C) or the run failed: stop the code too, so a late
                    # interrupt cannot hit the next execution.
                    with contextlib.suppress(BackendError, ChannelClosed):
                        await self.client.interrupt_kernel(kernel.id)
                        await self._wait_idle(channels, msg_id)
                channels.forget(msg_id)

    async def _send(self, kernel: _Kernel, msg_type: str, content: dict[str, Any]) -> str:
        try:
            return kernel.channels.send("shell", msg_type, content)
        except ChannelClosed:
            await self._reconnect(kernel)
            return kernel.channels.send("shell", msg_type, content)

    @staticmethod
    async def _wait_idle(channels: KernelChannels, msg_id: str) -> None:
        """Skip ``msg_id``'s messages until its execution is over, at most INTERRUPT_GRACE seconds."""
        deadline = time.monotonic() + INTERRUPT_GRACE
        while time.monotonic() < deadline:
            msg = await channels.next_message(msg_id, POLL)
            if msg is not None and idle_after(msg, msg_id):
                return

    # ------------------------------------------------------ file operations

    async def _io(self, kernel: _Kernel, args: dict[str, Any]) -> dict[str, Any]:
        """One file operation in the kernel, resent after a dropped socket (all are idempotent)."""
        async with kernel.lock:
            return await self._io_unlocked(kernel, args)

    async def _io_unlocked(self, kernel: _Kernel, args: dict[str, Any]) -> dict[str, Any]:
        # A user expression, not cell code: IPython's cell transformers take seconds on a chunk-sized
        # line, an expression is only compiled. It runs in a fresh namespace, so nothing of ours
        # lands among the user's variables.
        # A chunk's data rides in the request's metadata: as a literal in the expression, compiling
        # it would cost as much again as the rest of the transfer.
        args = dict(args)
        metadata = {"ci_magic_data": args.pop("data")} if "data" in args else None
        expression = f"__import__('builtins').exec({IO_SOURCE!r}, {{'ARGS': {json.dumps(args)!r}}})"
        content = {
            "code": "",
            "silent": True,
            "store_history": False,
            "user_expressions": {"io": expression},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        for _ in range(MAX_DROPS + 1):
            try:
                channels = await self._connected(kernel)
                msg_id = channels.send("shell", "execute_request", content, metadata)
                try:
                    answer = await self._io_answer(kernel, channels, msg_id)
                finally:
                    channels.forget(msg_id)
            except ChannelClosed:
                await self._reconnect(kernel)
                continue
            kernel.last_active_at = int(self._clock())
            if "error" in answer:
                if answer.get("missing"):
                    raise FileNotFoundError(args.get("name") or args.get("temp"))
                raise ContainerFileError(
                    f"The gateway kernel could not {args['op']} a file: {str(answer['error'])[:300]}"
                )
            return answer
        raise StreamError(
            f"The connection to the kernel on the gateway at {self.client.shown_url} kept dropping; "
            "the file transfer stopped. Run the cell again to resume."
        )

    async def _io_answer(self, kernel: _Kernel, channels: KernelChannels, msg_id: str) -> dict[str, Any]:
        answer: dict[str, Any] | None = None
        idle = replied = False
        deadline = time.monotonic() + IO_TIMEOUT
        heard = time.monotonic()
        while time.monotonic() < deadline:
            msg = await channels.next_message(msg_id, POLL)
            if msg is None:
                if time.monotonic() - heard >= SILENCE_CHECK:
                    heard = time.monotonic()
                    await self._check_alive(kernel)
                continue
            heard = time.monotonic()
            kind = msg["header"].get("msg_type")
            content = msg.get("content") or {}
            if kind == "display_data" and answer is None:
                data = (content.get("data") or {}).get(IO_MIME)
                # A chunk's base64 is 4/3 of its size; anything much bigger is not an answer we asked for.
                if isinstance(data, dict) and len(json.dumps(data)) <= 2 * self.chunk_bytes + 65536:
                    answer = data
            elif kind == "execute_reply":
                replied = True
                outcome = (content.get("user_expressions") or {}).get("io") or {}
                if content.get("status") != "ok" or outcome.get("status") != "ok":
                    name = str(outcome.get("ename") or content.get("ename") or "Error")[:100]
                    value = str(outcome.get("evalue") or content.get("evalue") or "")[:300]
                    raise ContainerFileError(f"A gateway kernel file operation failed: {name}: {value}.")
            elif idle_after(msg, msg_id):
                idle = True
            if idle and replied:
                if answer is None:
                    raise ContainerFileError("A file operation in the gateway kernel gave no answer.")
                return answer
        with contextlib.suppress(BackendError):
            await self.client.interrupt_kernel(kernel.id)
        raise ContainerFileError(
            f"A file operation in the gateway kernel took longer than {IO_TIMEOUT:g} s (is code still "
            "running in it?); it was interrupted."
        )

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        kernel = self._usable(container_id)
        relative = container_path(filename)
        data = _read_source(source, filename, self.upload_size_cap)
        size = len(data)
        whole = hashlib.sha256(data).hexdigest()
        folder = relative.rpartition("/")[0]
        temp = f"{folder + '/' if folder else ''}.ci-magic-{secrets.token_hex(8)}.upload"
        args = {"root": kernel.data_dir, "temp": temp}
        offset = 0
        try:
            while True:
                chunk = data[offset : offset + self.chunk_bytes]
                answer = await self._io(
                    kernel,
                    {
                        **args,
                        "op": "put",
                        "offset": offset,
                        "data": base64.b64encode(chunk).decode("ascii"),
                        "sha256": hashlib.sha256(chunk).hexdigest(),
                    },
                )
                reached = _count(answer.get("size"), size)
                if answer.get("corrupt"):
                    raise ContainerFileError(f"{filename}: a chunk arrived damaged; nothing was stored.")
                offset = reached
                if self.progress is not None:
                    self.progress(relative, offset, size)
                if offset >= size:
                    break
            answer = await self._io(
                kernel, {**args, "op": "commit", "name": relative, "size": size, "sha256": whole}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._io(kernel, {**args, "op": "discard"})
            raise
        if not answer.get("ok"):
            raise ContainerFileError(
                f"{filename} arrived in the gateway kernel with a different checksum; nothing was stored. "
                "Push it again."
            )
        record = FileRecord(_new_file_id(), int(self._clock()), "user", size)
        kernel.files[relative] = record
        return kernel.as_file(relative, record)

    async def list_files(self, container_id: str) -> list[ContainerFile]:
        kernel = self._known(container_id)
        answer = await self._io(kernel, {"op": "listing", "root": kernel.data_dir})
        entries = answer.get("files")
        if not isinstance(entries, list):
            raise ContainerFileError("The gateway kernel listed its files in a shape ci-magic does not read.")
        found: dict[str, tuple[int, float]] = {}
        for entry in entries[:20_000]:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                continue
            try:
                relative = container_path(entry[0])
            except ContainerFileError:
                continue
            if isinstance(entry[1], int) and isinstance(entry[2], (int, float)) and entry[1] >= 0:
                found[relative] = (entry[1], float(entry[2]))
        for path in list(kernel.files):
            if path not in found:
                del kernel.files[path]
        for path, (size, mtime) in found.items():
            record = kernel.files.get(path)
            if record is None:
                kernel.files[path] = FileRecord(_new_file_id(), int(mtime), "assistant", size)
            else:
                record.bytes = size
        return [kernel.as_file(path, record) for path, record in sorted(kernel.files.items())]

    async def download_file(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        kernel = self._known(container_id)
        relative = await self._path_of(kernel, file_id)
        what = f"{kernel.data_dir.rstrip('/')}/{relative}"
        args = {"root": kernel.data_dir, "name": relative}
        try:
            described = await self._io(kernel, {**args, "op": "digest"})
        except FileNotFoundError:
            kernel.files.pop(relative, None)
            raise ContainerFileError(f"{what} was removed before it could be read.") from None
        size = _count(described.get("size"), None)
        allocated = _count(described.get("allocated"), None)
        check_reported_size(what, size, allocated, max_bytes=max_bytes)
        expected = described.get("sha256")
        fd = open_download_target(dest)
        digest = hashlib.sha256()
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while written < size:
                    length = min(self.chunk_bytes, size - written)
                    answer = await self._io(
                        kernel, {**args, "op": "get", "offset": written, "length": length}
                    )
                    encoded = answer.get("data")
                    if not isinstance(encoded, str) or len(encoded) > 4 * (length // 3 + 1):
                        raise ContainerFileError(f"{what}: the kernel sent a chunk ci-magic did not ask for.")
                    chunk = base64.b64decode(encoded, validate=True)
                    if hashlib.sha256(chunk).hexdigest() != answer.get("sha256"):
                        raise ContainerFileError(f"{what}: a chunk arrived damaged; nothing was saved.")
                    if not chunk:
                        break  # it shrank meanwhile: the checksum below tells
                    if written + len(chunk) > max_bytes:
                        raise stream_past_cap(what, max_bytes)
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if self.progress is not None:
                        self.progress(relative, written, size)
            if digest.hexdigest() != expected:
                raise ContainerFileError(
                    f"{what} changed while it was being downloaded (its checksum differs); nothing was "
                    "saved. Pull it again once the code writing it has finished."
                )
        except BaseException:
            discard_download(dest)
            raise
        return written

    async def delete_file(self, container_id: str, file_id: str) -> None:
        kernel = self._known(container_id)
        relative = await self._path_of(kernel, file_id)
        await self._io(kernel, {"op": "remove", "root": kernel.data_dir, "name": relative})
        kernel.files.pop(relative, None)

    def _known(self, container_id: str) -> _Kernel:
        kernel = self._kernels.get(container_id)
        if kernel is None or kernel.status != "running":
            raise ContainerFileError(
                f"The gateway kernel {container_id} is gone, and its files went with it (a gateway keeps "
                "files only as long as the kernel runs)."
            )
        return kernel

    async def _path_of(self, kernel: _Kernel, file_id: str) -> str:
        for attempt in range(2):
            for path, record in kernel.files.items():
                if record.id == file_id:
                    return path
            if attempt == 0:
                await self.list_files(kernel.id)
        raise ContainerFileError(f"Container {kernel.id} has no file with id {file_id!r}.")

    async def aclose(self) -> None:
        for kernel in list(self._kernels.values()):
            await kernel.channels.close()
        self._kernels.clear()
        await self.client.aclose()


def _read_source(source: Path | bytes, filename: str, cap: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ContainerFileError(f"Cannot upload {str(source)!r}: it is not a readable file.")
        if path.stat().st_size > cap:
            raise _too_large(filename, cap)
        data = path.read_bytes()
    if len(data) > cap:
        raise _too_large(filename, cap)
    return data


def _too_large(filename: str, cap: int) -> ContainerFileError:
    return ContainerFileError(
        f"{filename} is larger than the {size_text(cap)} upload limit, so nothing was sent. Push a smaller "
        "file, or raise `%config CodeInterpreter.upload_size_cap`."
    )


def _count(value: Any, upper: int | None) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 0
        or (upper is not None and value > upper)
    ):
        raise ContainerFileError("The gateway kernel reported a file size ci-magic cannot use.")
    return value


def _folder_name(kernel_id: str) -> str:
    return "".join(c for c in kernel_id if c.isalnum() or c == "-")[:64] or "kernel"


def _new_file_id() -> str:
    return "cfile_" + secrets.token_hex(16)
