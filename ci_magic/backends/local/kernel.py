"""Sandbox kernels: launching one (the small :class:`Kernel` interface) and running code on it.

:class:`Kernel` is all the sandbox manager needs from a kernel: start, interrupt, kill, restart,
an async jupyter_client client, liveness and a cause of death. :class:`LocalKernel` launches
ipykernel on this machine through :mod:`.isolation` with ipc transport; a kernel behind
Jupyter Enterprise/Kernel Gateway would be another implementation of the same protocol.

:func:`execute` turns one execution's Jupyter messages into :mod:`ci_magic.events` and owns the
failure policy: a per-execution timeout (interrupt, then kill and restart) and a kernel that
dies (out of memory, segfault, ``os._exit``) reported and restarted with /mnt/data intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Protocol, runtime_checkable

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from ci_magic.backends.kernel_messages import events_from_message, idle_after
from ci_magic.backends.local.isolation import Isolation, LaunchPaths, Limits, PythonInfo
from ci_magic.errors import SandboxError
from ci_magic.events import CallStatus, Event, ExecutionError, Notice

__all__ = [
    "Kernel",
    "KernelSetup",
    "LocalKernel",
    "events_from_message",
    "execute",
    "new_context",
    "warm_up",
]

# Kernel settings: no history database to open, no ANSI colours in tracebacks (the model and the
# renderer read them as text).
KERNEL_ARGS = ("--HistoryManager.enabled=False", "--InteractiveShell.colors=nocolor")
CHANNEL_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
INTERRUPT_GRACE = 3.0  # seconds an interrupted execution gets to stop before the kernel is killed
POLL = 0.25  # how often a silent execution checks that the kernel is still alive
SIGNAL_HINTS = {
    signal.SIGKILL: "was killed by SIGKILL (usually a sign it ran out of memory)",
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGXFSZ: "was killed for writing a file over the size limit (SIGXFSZ)",
}
RESTARTED = "It was restarted: variables and imports are gone, files in /mnt/data are intact."


def new_context() -> zmq.asyncio.Context:
    """One zmq context for all kernel clients; reconnect fast to sockets that do not exist yet."""
    context = zmq.asyncio.Context()
    # The client connects before the kernel has bound its ipc sockets; zmq's default 100 ms
    # retry interval would add up to 100 ms to every start.
    context.setsockopt(zmq.RECONNECT_IVL, 5)
    return context


@runtime_checkable
class Kernel(Protocol):
    """The kernel-launching interface the sandbox manager codes against."""

    @property
    def client(self) -> AsyncKernelClient: ...

    async def start(self) -> None:
        """Launch and wait until the kernel answers on shell and publishes on iopub."""

    async def interrupt(self) -> None: ...

    async def kill(self) -> None:
        """Stop the kernel and every process it started; idempotent."""

    async def restart(self) -> None: ...

    def is_alive(self) -> bool: ...

    def death_reason(self) -> str:
        """Why the kernel stopped, as a verb phrase ("crashed with a segmentation fault (SIGSEGV)")."""


@dataclass(frozen=True)
class KernelSetup:
    """Everything needed to launch one container's kernel."""

    isolation: Isolation
    python: PythonInfo
    data_dir: Path
    limits: Limits
    user: tuple[int, int] | None = None  # uid/gid the kernel runs as (root hosts only)
    startup_timeout: float = 60.0
    font_cache: Path | None = None  # matplotlib's font list, built once outside the sandbox


class LocalKernel:
    """An ipykernel in a sandbox on this machine, driven over ipc sockets."""

    def __init__(self, setup: KernelSetup, *, context: zmq.asyncio.Context) -> None:
        self.setup = setup
        self._context = context
        self._process: subprocess.Popen[bytes] | None = None
        self._client: AsyncKernelClient | None = None
        self._paths: LaunchPaths | None = None
        self._ctl: int | None = None
        self._reason = ""

    @property
    def client(self) -> AsyncKernelClient:
        if self._client is None:
            raise SandboxError("The sandbox kernel is not running; start it first.")
        return self._client

    @property
    def pid(self) -> int | None:
        """The host pid of the sandbox's outermost process (bwrap, unshare or the launcher)."""
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        return self._paths.runtime_dir / "kernel.log" if self._paths else None

    async def start(self) -> None:
        if self._process is not None:
            return
        setup = self.setup
        paths = LaunchPaths.create(setup.data_dir)
        self._paths = paths
        self._reason = ""
        isolation = setup.isolation
        runtime_inside = isolation.runtime_inside(paths)
        key = secrets.token_hex(16)
        connection = {
            **CHANNEL_PORTS,
            "transport": "ipc",
            "ip": f"{runtime_inside}/k",
            "key": key,
            "signature_scheme": "hmac-sha256",
            "kernel_name": "ci-magic",
        }
        connection_file = paths.runtime_dir / "kernel.json"
        connection_file.write_text(json.dumps(connection))
        mpl_dir = paths.runtime_dir / "matplotlib"
        mpl_dir.mkdir()
        seeded = _seed_font_cache(setup.font_cache, mpl_dir)
        if setup.user:
            for path in (paths.runtime_dir, connection_file, mpl_dir, *seeded):
                os.chown(path, *setup.user)
        read_fd, write_fd = os.pipe()
        argv = isolation.command(
            setup.python,
            paths,
            setup.limits,
            user=setup.user,
            ctl_fd=read_fd,
            kernel_argv=["-f", f"{runtime_inside}/kernel.json", *KERNEL_ARGS],
        )
        try:
            with open(paths.runtime_dir / "kernel.log", "wb") as log:
                self._process = subprocess.Popen(
                    argv,
                    env=isolation.environment(setup.python, paths),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(read_fd,),
                    start_new_session=True,
                    cwd=paths.runtime_dir,
                )
        except OSError as err:
            os.close(write_fd)
            paths.remove()
            self._paths = None
            raise SandboxError(f"The sandbox could not be started ({argv[0]}: {err}).") from err
        finally:
            os.close(read_fd)
        self._ctl = write_fd
        client = AsyncKernelClient(context=self._context)
        client.load_connection_info({**connection, "ip": str(paths.runtime_dir / "k")})
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        self._client = client
        try:
            await self._wait_ready(setup.startup_timeout)
        except BaseException:
            await self.kill()
            raise

    async def _wait_ready(self, timeout: float) -> None:
        """Until the kernel answers kernel_info and our iopub subscription demonstrably works."""
        client = self.client
        deadline = time.monotonic() + timeout
        request = client.kernel_info()
        replied = False
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise SandboxError(f"The sandbox kernel failed to start: {self._startup_failure()}")
            if not replied:
                try:
                    reply = await client.get_shell_msg(timeout=0.05)
                except Empty:
                    continue
                replied = reply["parent_header"].get("msg_id") == request
                continue
            # Messages published before the subscription took effect are lost, so wait for the
            # kernel's iopub_welcome (ipykernel >= 7) or any status message, asking again if needed.
            try:
                await client.get_iopub_msg(timeout=0.1)
                return
            except Empty:
                client.kernel_info()
        raise SandboxError(
            f"The sandbox kernel did not answer within {timeout:g} s. {self._startup_failure()}"
        )

    def _startup_failure(self) -> str:
        tail = ""
        if self.log_path and self.log_path.exists():
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1] if lines else ""
        return tail or self.death_reason()

    async def interrupt(self) -> None:
        # Through the launcher (the sandbox's PID 1), which signals the kernel directly: this works
        # even when the kernel's control thread cannot get the GIL.
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                os.write(self._ctl, b"i")

    async def kill(self) -> None:
        process, self._process = self._process, None
        if self._client is not None:
            self._client.stop_channels()
            self._client = None
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                os.write(self._ctl, b"k")
            os.close(self._ctl)
            self._ctl = None
        if process is not None:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            for _ in range(200):
                if process.poll() is not None:
                    break
                await asyncio.sleep(0.005)
            else:
                process.kill()
                process.wait()
        if self._paths is not None:
            self._paths.remove()
            self._paths = None

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def death_reason(self) -> str:
        if self._reason:
            return self._reason
        status = ""
        if self._paths is not None:
            with contextlib.suppress(OSError):
                status = (self._paths.runtime_dir / "exit-status").read_text().strip()
        if not status and self._process is not None and self._process.returncode is not None:
            code = self._process.returncode
            status = f"signal {-code}" if code < 0 else f"exit {code}"
        self._reason = _describe_status(status)
        return self._reason


def _seed_font_cache(source: Path | None, target: Path) -> list[Path]:
    """Copy matplotlib's font list into the kernel's private config folder.

    Without it every new kernel rebuilds the list on its first plot (seconds on a desktop with
    many fonts, announced on stderr); the list is small, and a copy keeps sandboxes from writing
    to a shared file.
    """
    if source is None or not source.is_dir():
        return []
    copied = []
    for font_list in source.glob("fontlist-*.json"):
        shutil.copyfile(font_list, target / font_list.name)
        copied.append(target / font_list.name)
    return copied


def _describe_status(status: str) -> str:
    kind, _, number = status.partition(" ")
    if kind == "signal" and number.isdigit():
        sig = int(number)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        return SIGNAL_HINTS.get(sig, f"was killed by {name}")  # type: ignore[call-overload]
    if kind == "exit" and number.isdigit():
        return f"exited with status {number}"
    return "stopped for an unknown reason"


async def execute(kernel: Kernel, code: str, *, call_id: str, timeout: float) -> AsyncIterator[Event]:
    """Run ``code`` and yield its outputs, then ``CallStatus(completed|failed)``.

    A kernel found dead beforehand is restarted first (with a ``Notice``). If the code outlives
    ``timeout`` it is interrupted; if it ignores the interrupt the kernel is restarted. If the
    kernel dies while running, that is reported as an ``ExecutionError`` and it is restarted.
    """
    if not kernel.is_alive():
        reason = kernel.death_reason()
        await kernel.restart()
        yield Notice(f"Since the last run, the sandbox's Python process {reason}. {RESTARTED}", "warning")
    client = kernel.client
    msg_id = client.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True)
    deadline = time.monotonic() + timeout
    failed = False
    finished = False
    interrupted_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if interrupted_at is None and now >= deadline:
                await kernel.interrupt()
                interrupted_at = now
            if interrupted_at is not None and now >= interrupted_at + INTERRUPT_GRACE:
                await kernel.restart()
                finished = True
                yield ExecutionError(
                    call_id, "TimeoutError",
                    f"The code ran longer than the {timeout:g} s limit and did not stop when interrupted. "
                    + RESTARTED.replace("It was", "The sandbox was"),
                )  # fmt: skip
                yield CallStatus(call_id, "failed")
                return
            wait = POLL if interrupted_at is not None else min(POLL, max(deadline - now, 0.001))
            try:
                msg = await client.get_iopub_msg(timeout=wait)
            except Empty:
                if not kernel.is_alive():
                    reason = kernel.death_reason()
                    await kernel.restart()
                    finished = True
                    message = f"The sandbox's Python process {reason} while running this code. {RESTARTED}"
                    yield ExecutionError(call_id, "SandboxRestarted", message)
                    yield CallStatus(call_id, "failed")
                    return
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue  # left over from an earlier request
            if idle_after(msg, msg_id):
                break
            for event in events_from_message(msg, call_id):
                if isinstance(event, ExecutionError):
                    failed = True
                    if interrupted_at is not None and event.name == "KeyboardInterrupt":
                        event = ExecutionError(
                            call_id, "TimeoutError",
                            f"The code ran longer than the {timeout:g} s limit and was interrupted "
                            "(variables defined so far are kept).",
                            event.traceback,
                        )  # fmt: skip
                yield event
        finished = True
        await _drain_reply(client, msg_id)
        yield CallStatus(call_id, "failed" if failed or interrupted_at is not None else "completed")
    finally:
        if not finished and kernel.is_alive():
            # The consumer stopped listening (Ctrl-C in the notebook): stop the code too, and wait
            # until it has stopped, so a late interrupt cannot hit the next execution.
            await kernel.interrupt()
            if not await _wait_idle(kernel, msg_id, INTERRUPT_GRACE):
                await kernel.restart()


async def warm_up(kernel: Kernel, *, timeout: float = 10.0) -> None:
    """Run one throwaway cell: IPython's first execution is ~10 ms slower than the rest."""
    msg_id = kernel.client.execute("pass", silent=False, store_history=False, allow_stdin=False)
    await _wait_idle(kernel, msg_id, timeout)


async def _wait_idle(kernel: Kernel, msg_id: str, timeout: float) -> bool:
    """Skip messages until ``msg_id``'s execution is over; False if it is not within ``timeout``."""
    client = kernel.client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and kernel.is_alive():
        with contextlib.suppress(Empty):
            if idle_after(await client.get_iopub_msg(timeout=POLL), msg_id):
                await _drain_reply(client, msg_id)
                return True
    return False


async def _drain_reply(client: AsyncKernelClient, msg_id: str) -> None:
    """Consume the execute_reply (it precedes the idle status) so replies never pile up."""
    with contextlib.suppress(Empty):
        while True:
            reply = await client.get_shell_msg(timeout=1.0)
            if reply["parent_header"].get("msg_id") == msg_id:
                return
