"""Sandbox kernels: launching one (the small :class:`Kernel` interface) and running code on it.

:class:`Kernel` is all the sandbox manager needs from a kernel: start, interrupt, kill, restart,
an async jupyter_client client, liveness and a cause of death. :class:`LocalKernel` launches
ipykernel on this machine through :mod:`.isolation` with ipc transport; a kernel behind
Jupyter Enterprise/Kernel Gateway would be another implementation of the same protocol.

:func:`execute` turns one execution's Jupyter messages into :mod:`ci_magic.events` and owns the
failure policy: a per-execution timeout (interrupt, then kill and restart) and a kernel that
dies (out of memory, segfault, ``os._exit``) reported and restarted with /mnt/data intact.
After a stopped execution nothing of it may keep running: every process but the sandbox's PID 1
and the kernel is killed, and a kernel whose own threads keep using the CPU is restarted.
The container's budget (:mod:`.budget`) is watched from the host while the kernel lives; going
over the disk limit stops the running code with an error that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Protocol, runtime_checkable

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from ci_magic.backends.kernel_messages import events_from_message, idle_after
from ci_magic.backends.local.budget import (
    Breach,
    CgroupV2,
    SandboxTree,
    Watched,
    cpu_seconds,
    enter_sandbox,
    format_size,
    is_running,
    kill_all_but,
    runnable_threads,
    start_time,
    watchdog,
)
from ci_magic.backends.local.isolation import Isolation, Launch, LaunchPaths, Limits, PythonInfo
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

log = logging.getLogger(__name__)

# Kernel settings: no history database to open, no ANSI colours in tracebacks (the model and the
# renderer read them as text).
KERNEL_ARGS = ("--HistoryManager.enabled=False", "--InteractiveShell.colors=nocolor")
CHANNEL_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
BIND_ORDER = (1, 3, 4, 2, 5)  # ipykernel's KernelApp binds shell, stdin, control, iopub, heartbeat
LOG_TAIL = 4096  # bytes of the kernel's output shown to explain a failed start
OUTPUT_KEPT = 64 << 10  # bytes of the kernel's stdout/stderr the host keeps (the latest)
# The largest kernel message the host accepts (zmq drops the connection of a bigger one before
# reading it). A real chart is a few MiB of base64 PNG; a rich HTML output some tens at most.
MAX_MESSAGE_BYTES = 64 << 20
STATUS_MAX = 64  # bytes read from the launcher's status pipe
STATUS_LINE = re.compile(r"(exit|signal) (\d{1,3})\n")
INTERRUPT_GRACE = 3.0  # seconds an interrupted execution gets to stop before the kernel is killed
POLL = 0.25  # how often a silent execution checks that the kernel is still alive
DEATH_GRACE = 3.0  # seconds a kernel whose connection dropped gets to show it is dying instead
# After a stopped execution the kernel's CPU time is measured this long; more than BUSY_SHARE of
# it means threads of the stopped code still run, and the kernel is restarted. An idle kernel
# uses next to none; a spinning thread gets a quarter of a core even on a loaded 2-core machine.
IDLE_PROBE = 0.5
IDLE_SAMPLES = 10
BUSY_SHARE = 0.1
SIGNAL_HINTS = {
    signal.SIGKILL: "was killed by SIGKILL (usually a sign it ran out of memory)",
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGXFSZ: "was killed for writing a file over the size limit (SIGXFSZ)",
}
RESTARTED = "It was restarted: variables and imports are gone, files in /mnt/data are intact."
OVERSIZED = (
    f"The sandbox sent a message larger than {MAX_MESSAGE_BYTES >> 20} MiB, the most the host accepts, "
    f"so the host dropped it and the connection. {RESTARTED} Write large results to a file in /mnt/data."
)


def new_context() -> zmq.asyncio.Context:
    """One zmq context for all kernel clients; reconnect fast to sockets that do not exist yet."""
    context = zmq.asyncio.Context()
    # The client connects before the kernel has bound its ipc sockets; zmq's default 100 ms
    # retry interval would add up to 100 ms to every start.
    context.setsockopt(zmq.RECONNECT_IVL, 5)
    # The sandbox chooses what it sends: no message may cost the host more than this.
    context.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
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

    async def stop_strays(self) -> None:
        """Kill every process of the sandbox except its PID 1 and the kernel."""

    def kernel_cpu_seconds(self) -> float | None:
        """CPU time the kernel process has used so far (None when unknown)."""

    def kernel_runnable_threads(self) -> int:
        """Threads of the kernel running or waiting for a CPU right now."""

    def take_breaches(self) -> list[Breach]:
        """What the budget watchdog did since the last call (processes killed, disk over its limit)."""

    def begin_execution(self) -> None:
        """Code starts running (if /mnt/data is over its limit already, only growth counts now)."""

    def end_execution(self) -> None: ...

    async def measure_disk(self) -> None:
        """Measure the disk at once (the code just finished: a burst may have come since a tick)."""

    def connection_dropped(self) -> bool:
        """The host dropped a connection to the kernel (a message over ``MAX_MESSAGE_BYTES``)."""


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
    cgroup: CgroupV2 | None = None  # a delegated cgroup v2 subtree holds the memory budget
    tier: str = "1g"  # the memory tier's name, for messages


class LocalKernel:
    """An ipykernel in a sandbox on this machine, driven over ipc sockets."""

    def __init__(self, setup: KernelSetup, *, context: zmq.asyncio.Context) -> None:
        self.setup = setup
        self._context = context
        self._process: subprocess.Popen[bytes] | None = None
        self._client: AsyncKernelClient | None = None
        self._paths: LaunchPaths | None = None
        self._ctl: int | None = None
        self._launch: Launch | None = None
        self._connection: dict[str, Any] = {}
        self._exit_status: str | None = None  # the launcher's status line, once read
        self._reason = ""
        self._tree: SandboxTree | None = None
        self._watched: Watched | None = None
        self._group: Path | None = None
        self._output: OutputTail | None = None
        # (channel socket, its monitor as a blocking socket, the monitor itself: kept alive)
        self._monitors: list[tuple[zmq.Socket[Any], zmq.Socket[Any], zmq.Socket[Any]]] = []

    @property
    def client(self) -> AsyncKernelClient:
        if self._client is None:
            raise SandboxError("The sandbox kernel is not running; start it first.")
        return self._client

    @property
    def pid(self) -> int | None:
        """The host pid of the sandbox's outermost process (bwrap, or the launcher without isolation)."""
        return self._process.pid if self._process else None

    @property
    def output_tail(self) -> str:
        """The latest of the kernel's stdout and stderr (at most ``OUTPUT_KEPT`` bytes)."""
        return self._output.text() if self._output is not None else ""

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
        self._connection = connection
        connection_file = paths.runtime_dir / "kernel.json"
        connection_file.write_text(json.dumps(connection))
        mpl_dir = paths.runtime_dir / "matplotlib"
        mpl_dir.mkdir()
        seeded = _seed_font_cache(setup.font_cache, mpl_dir)
        if setup.user:
            for path in (paths.runtime_dir, connection_file, mpl_dir, *seeded):
                os.chown(path, *setup.user)
        plan = isolation.launch(
            setup.python,
            paths,
            setup.limits,
            user=setup.user,
            kernel_argv=["-f", f"{runtime_inside}/kernel.json", *KERNEL_ARGS],
        )
        argv = plan.argv
        limits = setup.limits
        if setup.cgroup is not None:
            self._group = setup.cgroup.create(
                paths.runtime_dir.parent.name,
                memory_bytes=limits.budget_bytes,
                max_processes=limits.max_processes + 16,  # PID 1 and bwrap are not the code's
            )
            argv = CgroupV2.wrap(self._group, argv)
        self._launch, self._ctl, self._exit_status = plan, plan.control_fd, None
        try:
            # stdout and stderr are a pipe the host drains, never a host file: what the sandbox
            # writes there costs the host OUTPUT_KEPT bytes of memory and no disk.
            output_read, output_write = os.pipe2(os.O_CLOEXEC)
            self._output = OutputTail(output_read)
            try:
                self._process = subprocess.Popen(
                    argv,
                    env=plan.env,
                    stdin=subprocess.DEVNULL,
                    stdout=output_write,
                    stderr=subprocess.STDOUT,
                    pass_fds=plan.child_fds,
                    start_new_session=True,
                    cwd=plan.cwd,
                    extra_groups=plan.extra_groups,
                )
            finally:
                os.close(output_write)
                self._output.start()
            plan.spawned()
            plan.map_user()  # as root: bwrap waits for the uid map before it goes on
        except (OSError, SandboxError, ValueError, KeyError) as err:
            failure = self._startup_failure() if self._process is not None else ""
            await self.kill()
            raise SandboxError(f"The sandbox could not be started ({argv[0]}: {failure or err}).") from err
        self._tree = SandboxTree(self._process.pid, namespaced=isolation.namespaced)
        deadline = time.monotonic() + setup.startup_timeout
        # While the kernel starts: cap System V IPC in its namespaces and get a socket-diagnostics
        # socket there (a helper process, ~20 ms, hidden behind the kernel's own start).
        entering = (
            asyncio.create_task(_enter_namespaces(self._tree, limits.sysv_shm_bytes, deadline))
            if isolation.namespaced
            else None
        )
        try:
            await self._connect(isolation.host_uid(setup.user), deadline)
            await self._wait_ready(max(deadline - time.monotonic(), 0.1))
            diag = await entering if entering is not None else None
        except BaseException:
            if entering is not None:
                entering.cancel()
            await self.kill()
            raise
        # Found now, before any code ran: which process is the kernel must not be the code's say.
        if not self._tree.locate():
            log.warning("ci-magic: the sandbox kernel's process was not found; its budget counts all")
        self._watched = Watched(
            tree=self._tree,
            memory_budget=limits.budget_bytes,
            tmpfs_sizes=limits.tmpfs_sizes if setup.isolation.namespaced else (),
            data_dir=setup.data_dir if limits.disk_bytes is not None else None,
            disk_limit=limits.disk_bytes,
            other_dirs=(paths.runtime_dir,),
            check_memory=self._group is None,
            diag=diag,
        )
        watchdog().watch(self._watched)

    async def _connect(self, sandbox_uid: int, deadline: float) -> None:
        """Connect to the kernel's sockets once it has made them, through checked hard links.

        The sockets lie in a folder the sandbox can write, so the host never connects by that
        path: a symlink or another file put there could send it elsewhere (a host service's
        socket). Each socket is hard-linked into the host-only folder without following
        symlinks, and used only if the link is a socket owned by the sandbox's uid; a link
        cannot be swapped afterwards, and reconnects reach the same socket.
        """
        paths = self._paths
        assert paths is not None
        # All five: the gateway's relay (gateway/sandbox_kernel.py) also uses stdin and heartbeat.
        # In the order ipykernel binds them; each tick tries them until one is missing, so a tick
        # of the ~0.5 s the kernel takes to get there costs one failed link(), not five (the
        # host's CPU is the kernel's on a two-core laptop).
        pending = sorted(CHANNEL_PORTS.values(), key=BIND_ORDER.index)
        while pending:
            while pending and _link_socket(paths, pending[0], sandbox_uid):
                pending.pop(0)
            if not pending:
                break
            if not self.is_alive():
                raise SandboxError(f"The sandbox kernel failed to start: {self._startup_failure()}")
            if time.monotonic() > deadline:
                raise SandboxError(f"The sandbox kernel did not start in time. {self._startup_failure()}")
            # Until the first socket shows, the kernel is still importing (~0.3 s): a slower tick.
            await asyncio.sleep(0.002 if len(pending) < len(CHANNEL_PORTS) else 0.005)
        client = AsyncKernelClient(context=self._context)
        client.load_connection_info({**self._connection, "ip": str(paths.host_dir / "k")})  # type: ignore[typeddict-item]
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        self._client = client
        # zmq drops the connection of an oversized message without a word: watch for that.
        for channel in (client.shell_channel, client.iopub_channel, client.control_channel):
            sock = channel.socket
            if sock is not None:
                watching = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                monitor: zmq.Socket[Any] = zmq.Socket.shadow(watching.underlying)
                self._monitors.append((sock, monitor, watching))

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
        text = self.output_tail[-LOG_TAIL:]
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return (lines[-1] if lines else "") or self.death_reason()

    async def interrupt(self) -> None:
        # Through the launcher (the sandbox's PID 1), which signals the kernel directly: this works
        # even when the kernel's control thread cannot get the GIL.
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                os.write(self._ctl, b"i")

    async def kill(self) -> None:
        """End the whole sandbox, whatever its processes did, and check that none is left.

        PID 1 of the sandbox's PID namespace is killed from the host: the kernel then kills
        every process of the namespace (double-forked, ``setsid``, ignoring SIGTERM alike), and
        PID 1 is not gone until they are. The processes seen just before are checked afterwards.
        """
        process, self._process = self._process, None
        tree, self._tree = self._tree, None
        if self._watched is not None:
            watchdog().forget(self._watched)
            if self._watched.diag is not None:
                self._watched.diag.close()
        for sock, _, watching in self._monitors:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            watching.close(linger=0)
        self._monitors = []
        if self._client is not None:
            self._client.stop_channels()
            self._client = None
        seen: list[tuple[int, int | None]] = []
        if tree is not None and process is not None and process.poll() is None:
            tree.locate()
            seen = [(pid, start_time(pid)) for pid in [tree.init_pid or 0, *tree.members()]]
            if tree.init_pid is not None and tree.alive():
                with contextlib.suppress(OSError):
                    os.kill(tree.init_pid, signal.SIGKILL)
                # bwrap reaps PID 1 and exits once the namespace is empty; killing bwrap first
                # would leave PID 1 a zombie for the host's init to reap.
                for _ in range(400):
                    if process.poll() is not None:
                        break
                    await asyncio.sleep(0.005)
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                os.write(self._ctl, b"k")
            self._ctl = None
        if self._launch is not None:
            self._read_exit_status()  # before the pipe closes: a later death_reason may want it
            self._launch.close()
            self._launch = None
        if process is not None:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            for _ in range(400):
                if process.poll() is not None:
                    break
                await asyncio.sleep(0.005)
            else:
                process.kill()
                process.wait()
        if self._group is not None:
            CgroupV2.kill(self._group)
            await asyncio.to_thread(CgroupV2.remove, self._group)
            self._group = None
        survivors = await asyncio.to_thread(_kill_survivors, seen)
        if survivors:
            log.error("ci-magic: %d process(es) of a closed sandbox had to be killed one by one", survivors)
        if self._paths is not None:
            self._paths.remove()
            self._paths = None

    async def stop_strays(self) -> None:
        tree = self._tree
        if tree is None or not tree.locate():
            return
        if self._ctl is not None:
            # The launcher kills them from inside too (where it knows this byte); the host's own
            # pass below does not depend on it.
            with contextlib.suppress(OSError):
                os.write(self._ctl, b"c")
        await asyncio.to_thread(kill_all_but, tree, [tree.init_pid, tree.reaper_pid, tree.kernel_pid])

    def kernel_cpu_seconds(self) -> float | None:
        tree = self._tree
        return cpu_seconds(tree.kernel_pid) if tree is not None and tree.kernel_pid is not None else None

    def kernel_runnable_threads(self) -> int:
        tree = self._tree
        return runnable_threads(tree.kernel_pid) if tree is not None and tree.kernel_pid is not None else 0

    def take_breaches(self) -> list[Breach]:
        return self._watched.take_breaches() if self._watched is not None else []

    def begin_execution(self) -> None:
        watched = self._watched
        if watched is None:
            return
        if watched.disk_limit is not None:
            watched.disk_allowed = watched.disk_used if watched.disk_used > watched.disk_limit else 0
        watched.executing = True
        watched.disk_interrupted = False
        watched.wake()  # the idle pace of the slower checks ends with the code's first tick

    def end_execution(self) -> None:
        if self._watched is not None:
            self._watched.executing = False

    async def measure_disk(self) -> None:
        watched = self._watched
        if watched is not None and watched.disk_limit is not None:
            watched.executing = False  # the code has finished: nothing to interrupt
            await asyncio.to_thread(watchdog().check_disk, watched, now=True)

    @property
    def peak_memory(self) -> int:
        """The most memory the sandbox tree held while watched (bytes; the budget's own measure)."""
        if self._group is not None:
            return CgroupV2.peak(self._group) or 0
        return self._watched.peak_memory if self._watched is not None else 0

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def connection_dropped(self) -> bool:
        dropped = False
        for _, monitor, _ in self._monitors:
            with contextlib.suppress(zmq.ZMQError):
                while monitor.poll(0):
                    event = monitor.recv_multipart(zmq.NOBLOCK)
                    dropped = dropped or int.from_bytes(event[0][:2], "little") == zmq.EVENT_DISCONNECTED
        return dropped

    def death_reason(self) -> str:
        if self._reason:
            return self._reason
        watched = self._watched
        if watched is not None and watched.kernel_killed_for:
            budget = format_size(watched.memory_budget)
            self._reason = (
                f"was killed because the container held {watched.kernel_killed_for}, over its memory "
                f"budget of {budget} (the {self.setup.tier} tier; processes, shared memory and files in "
                "/tmp, /dev/shm and home count together)"
            )
            return self._reason
        status = self._read_exit_status()
        if not status and self._process is not None and self._process.returncode is not None:
            code = self._process.returncode
            status = f"signal {-code}" if code < 0 else f"exit {code}"
        self._reason = _describe_status(status)
        return self._reason

    def _read_exit_status(self) -> str:
        """The launcher's "exit N" / "signal N" line from the status pipe: 64 bytes at most, no wait."""
        if self._exit_status is None and self._launch is not None and not self.is_alive():
            try:
                data = os.read(self._launch.status_fd, STATUS_MAX)
            except OSError:  # BlockingIOError: nothing written (PID 1 itself was killed)
                data = b""
            match = STATUS_LINE.fullmatch(data.decode("ascii", "replace"))
            self._exit_status = f"{match[1]} {match[2]}" if match else ""
        return self._exit_status or ""


def _link_socket(paths: LaunchPaths, port: int, owner: int) -> bool:
    """Hard-link the kernel's socket ``k-<port>`` into the host folder; False until it exists."""
    source, link = f"{paths.runtime_dir}/k-{port}", f"{paths.host_dir}/k-{port}"  # polled: no pathlib
    try:
        os.link(source, link, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as err:  # a folder there, or anything else a socket never is
        raise SandboxError(
            f"The sandbox put something other than its kernel's socket at k-{port} ({err.strerror}); "
            "it was not used and the sandbox was stopped."
        ) from None
    info = os.lstat(link)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != owner:
        os.unlink(link)
        raise SandboxError(
            f"The sandbox put something other than its kernel's socket at k-{port} "
            f"(a {_kind(info.st_mode)} owned by uid {info.st_uid}); it was not used and the sandbox "
            "was stopped."
        )
    return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"), (stat.S_ISFIFO, "FIFO")):
        if test(mode):
            return name
    return "socket" if stat.S_ISSOCK(mode) else "special file"


class OutputTail:
    """Drains the read end of the kernel's stdout/stderr pipe in a thread, keeping only its end.

    The sandbox may write without pause: the thread reads as fast as it writes and the host holds
    ``OUTPUT_KEPT`` bytes at most. The thread ends when every writer is gone (the sandbox ended).
    """

    def __init__(self, fd: int, keep: int = OUTPUT_KEPT) -> None:
        self._fd = fd
        self._keep = keep
        self._data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="ci-magic-kernel-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def text(self) -> str:
        with self._lock:
            return bytes(self._data).decode(errors="replace")

    def _drain(self) -> None:
        try:
            while chunk := os.read(self._fd, 1 << 16):
                with self._lock:
                    self._data += chunk
                    if len(self._data) > self._keep:
                        del self._data[: len(self._data) - self._keep]
        except OSError:
            pass
        finally:
            os.close(self._fd)


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


@dataclass
class _Stop:
    """Why ci-magic interrupted the running code, and when."""

    at: float
    name: str  # the ExecutionError's name
    why: str  # what happened
    advice: str  # what to do about it
    reported: bool = False

    @property
    def message(self) -> str:
        return f"{self.why} (variables defined so far are kept). {self.advice}"

    @property
    def message_after_restart(self) -> str:
        return (
            f"{self.why}; it ignored the interrupt, so the sandbox was restarted: variables and imports "
            f"are gone, files in /mnt/data are intact. {self.advice}"
        )


def _timeout_stop(timeout: float, now: float) -> _Stop:
    return _Stop(
        now,
        "TimeoutError",
        f"The code was stopped after {timeout:g} s, the {timeout:g} s limit set by "
        "CodeInterpreter.execution_timeout",
        "Raise the limit for longer work, or make the code faster.",
    )


def _disk_stop(breach: Breach, now: float) -> _Stop:
    return _Stop(
        now,
        "DiskLimitExceeded",
        "The container wrote more than its disk_limit to /mnt/data and /run/ci-magic "
        f"(they now hold {breach.message}), "
        "so the code was stopped and the container kept",
        "Delete files you no longer need or raise CodeInterpreter.disk_limit.",
    )


def _memory_notice(breach: Breach) -> Notice:
    return Notice(
        f"A process in the sandbox was killed: the container held {breach.message}, over its memory "
        "budget (processes, shared memory and files in /tmp, /dev/shm and home count together). "
        "Use less memory or a larger CodeInterpreter.memory_limit.",
        "warning",
    )


async def execute(kernel: Kernel, code: str, *, call_id: str, timeout: float) -> AsyncGenerator[Event, None]:
    """Run ``code`` and yield its outputs, then ``CallStatus(completed|failed)``.

    A kernel found dead beforehand is restarted first (with a ``Notice``). If the code outlives
    ``timeout``, or the container goes over its disk limit, the code is interrupted; if it
    ignores the interrupt the kernel is restarted. Either way nothing the code started keeps
    running afterwards. If the kernel dies while running, that is reported as an
    ``ExecutionError`` and it is restarted.
    """
    dropped = kernel.is_alive() and kernel.connection_dropped() and not await _died_after_drop(kernel)
    if not kernel.is_alive():
        reason = kernel.death_reason()
        await kernel.restart()
        yield Notice(f"Since the last run, the sandbox's Python process {reason}. {RESTARTED}", "warning")
    elif dropped:  # sent by something still running after the last run
        await kernel.restart()
        yield Notice(f"Since the last run: {OVERSIZED}", "warning")
    stop: _Stop | None = None
    for breach in kernel.take_breaches():  # from background processes, between two runs
        if breach.kind == "memory" and not breach.killed_kernel:
            yield _memory_notice(breach)
        elif breach.kind == "disk":
            yield Notice(
                "The container wrote more than its disk_limit to /mnt/data and /run/ci-magic "
                f"(they now hold {breach.message}), "
                "so processes still writing in the background were stopped. Delete files you no longer "
                "need or raise CodeInterpreter.disk_limit.",
                "warning",
            )
    kernel.begin_execution()
    client = kernel.client
    msg_id = client.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True)
    deadline = time.monotonic() + timeout
    failed = False
    finished = False
    try:
        while True:
            now = time.monotonic()
            stop, news, interrupt = _budget_news(kernel, stop, now)
            for notice in news:
                yield notice
            if interrupt:
                await kernel.interrupt()
                await kernel.stop_strays()
            if stop is None and now >= deadline:
                stop = _timeout_stop(timeout, now)
                await kernel.interrupt()
                # At once, not after the code stopped: what it started competes for the CPU the
                # kernel needs to stop.
                await kernel.stop_strays()
            if stop is not None and now >= stop.at + INTERRUPT_GRACE:
                await kernel.restart()
                finished = True
                if stop.reported:  # interrupted, but the kernel never became idle again
                    yield Notice(f"The sandbox did not settle after this. {RESTARTED}", "warning")
                else:
                    yield ExecutionError(call_id, stop.name, stop.message_after_restart)
                yield CallStatus(call_id, "failed")
                return
            wait = POLL if stop is not None else min(POLL, max(deadline - now, 0.001))
            try:
                msg = await client.get_iopub_msg(timeout=wait)
            except Empty:
                dropped = kernel.connection_dropped() and not await _died_after_drop(kernel)
                if not kernel.is_alive():
                    reason = kernel.death_reason()
                    await kernel.restart()
                    finished = True
                    message = f"The sandbox's Python process {reason} while running this code. {RESTARTED}"
                    yield ExecutionError(call_id, "SandboxRestarted", message)
                    yield CallStatus(call_id, "failed")
                    return
                if dropped:
                    await kernel.restart()
                    finished = True
                    yield ExecutionError(call_id, "MessageTooLarge", OVERSIZED)
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
                    if stop is None and event.name == "KeyboardInterrupt":
                        # The watchdog may have interrupted the code since this loop last looked.
                        stop, news, _ = _budget_news(kernel, stop, time.monotonic())
                        for notice in news:
                            yield notice
                    if stop is not None and event.name == "KeyboardInterrupt":
                        # Our interrupt, not the user's: say why, without the interrupt's traceback.
                        event = ExecutionError(call_id, stop.name, stop.message)
                        stop.reported = True
                yield event
        # The oversized message came before the idle status (a kernel dying just after it is found
        # by the next run).
        if kernel.connection_dropped() and not await _died_after_drop(kernel):
            await kernel.restart()
            finished = True
            yield ExecutionError(call_id, "MessageTooLarge", OVERSIZED)
            yield CallStatus(call_id, "failed")
            return
        finished = True
        await _drain_reply(client, msg_id)
        if stop is None:
            await kernel.measure_disk()  # a burst faster than the watchdog's tick counts too
            stop, news, _ = _budget_news(kernel, stop, time.monotonic())  # found as the code finished
            for notice in news:
                yield notice
        if stop is not None:
            if not stop.reported:  # the code caught the interrupt and finished quietly
                yield ExecutionError(call_id, stop.name, stop.message)
            async for event in _end_leftovers(kernel):
                yield event
        yield CallStatus(call_id, "failed" if failed or stop is not None else "completed")
    finally:
        kernel.end_execution()
        if not finished and kernel.is_alive():
            # The consumer stopped listening (Ctrl-C in the notebook): stop the code too, and wait
            # until it has stopped, so a late interrupt cannot hit the next execution.
            await kernel.interrupt()
            if not await _wait_idle(kernel, msg_id, INTERRUPT_GRACE):
                await kernel.restart()


async def _died_after_drop(kernel: Kernel) -> bool:
    """Whether the kernel's dropped connection was its death rather than an oversized message.

    A killed kernel's sockets close before its sandbox's outer process has exited (the watchdog's
    kill was reported as a message over 64 MiB): give that process ``DEATH_GRACE`` to go."""
    deadline = time.monotonic() + DEATH_GRACE
    while kernel.is_alive():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _budget_news(kernel: Kernel, stop: _Stop | None, now: float) -> tuple[_Stop | None, list[Notice], bool]:
    """What the watchdog reported: notices to show, a disk stop, and whether to interrupt now."""
    news: list[Notice] = []
    interrupt = False
    for breach in kernel.take_breaches():
        if breach.kind == "memory":
            if not breach.killed_kernel:  # the kernel's own death is reported as such
                news.append(_memory_notice(breach))
        elif stop is None:
            stop = _disk_stop(breach, now)
            interrupt = not breach.interrupted
    return stop, news, interrupt


async def _end_leftovers(kernel: Kernel) -> AsyncIterator[Event]:
    """After a stopped execution: no process but PID 1 and the kernel, and no busy kernel thread."""
    await kernel.stop_strays()
    before = kernel.kernel_cpu_seconds()
    # CPU time alone misleads on a busy machine (a spinning thread may get little of it), so the
    # threads' states are sampled too: a thread that is runnable in most samples is spinning.
    runnable = 0
    for _ in range(IDLE_SAMPLES):
        await asyncio.sleep(IDLE_PROBE / IDLE_SAMPLES)
        runnable += kernel.kernel_runnable_threads() > 0
    after = kernel.kernel_cpu_seconds()
    used = after - before if before is not None and after is not None else 0.0
    if used > BUSY_SHARE * IDLE_PROBE or runnable > IDLE_SAMPLES // 2:
        await kernel.restart()
        yield Notice(
            f"Threads started by the stopped code kept using the CPU ({used:.2f} s in {IDLE_PROBE:g} s), "
            "so the sandbox was restarted: variables and imports are gone, files in /mnt/data are intact.",
            "warning",
        )


async def _enter_namespaces(tree: SandboxTree, shm_bytes: int, deadline: float) -> socket.socket | None:
    """:func:`.budget.enter_sandbox` as soon as the kernel's process exists and shows its namespaces."""
    problem = "the kernel's process did not appear"
    while time.monotonic() < deadline:
        pid = tree.kernel_pid if tree.locate() else None
        if pid is not None and os.access(f"/proc/{pid}/ns/ipc", os.R_OK):
            diag, problem_or_none = await asyncio.to_thread(enter_sandbox, pid, shm_bytes)
            if problem_or_none is None:
                return diag
            problem = problem_or_none
            break
        await asyncio.sleep(0.005)
    log.warning("ci-magic: System V IPC and socket memory of the sandbox not held: %s", problem)
    return None


def _kill_survivors(seen: list[tuple[int, int | None]], *, patience: float = 3.0) -> int:
    """Wait until every process seen in a killed sandbox is gone; SIGKILL any that is not.

    Dying takes a moment (a large process frees its memory first); a zombie holds nothing.
    """
    deadline = time.monotonic() + patience
    while True:
        left = [pid for pid, started in seen if started is not None and is_running(pid, started)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


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
