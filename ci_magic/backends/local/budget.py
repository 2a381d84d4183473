"""One resource budget per container, held for the sandbox's whole process tree.

A sandbox may start any number of processes, map shared memory, fill its tmpfs folders and write
to /mnt/data. Per-process rlimits alone do not add up to a container limit (four processes and a
shared mapping reached 7.6 GiB from a ``1g`` container), so the budget is held from the host:

* **cgroup v2**, where the host delegates a writable subtree with the ``memory`` and ``pids``
  controllers (:class:`CgroupV2`): ``memory.max`` (tmpfs and shared memory are charged to it too),
  ``memory.swap.max = 0`` and ``pids.max``; ``cgroup.kill`` ends the container.
* Otherwise the :class:`Watchdog`, one host thread for every sandbox of the process: every
  ``MEMORY_TICK`` it adds up the tree's private and shared memory, what its tmpfs folders hold,
  its memfd files, every pipe it holds open (at full capacity) and its socket queues, and
  kills the largest process when the sum is over the budget (then everything but PID 1 if that
  did not help). Every process also has ``RLIMIT_AS`` (set by the launcher from
  :class:`~.isolation.Limits`), so one process alone meets a ``MemoryError`` first.
* The data folder (and the runtime folder, the sandbox's /run/ci-magic) has no quota here:
  the watchdog measures their allocated size as soon as inotify reports a write to them
  (:mod:`.disk_events`; at most every ``DISK_EVENT_GAP``, more rarely when the folder is large)
  and every ``DISK_TICK`` regardless, and flags the sandbox, which stops the running code with a
  clear error (:mod:`.kernel`).

The tree is found from the host's side, through ``/proc/<pid>/task/*/children`` starting at the
sandbox's PID 1: processes that double-fork or call ``setsid`` are re-parented to that PID 1 and
stay in the tree. Nothing here trusts the sandbox: it only reads ``/proc`` files the kernel writes
and ``statvfs`` of the sandbox's tmpfs mounts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ci_magic.backends.local.disk_events import MAX_WATCHES, DiskEvents
from ci_magic.errors import ConfigurationError

__all__ = [
    "CgroupV2",
    "DiskUse",
    "MemoryUse",
    "SandboxTree",
    "Watchdog",
    "cpu_seconds",
    "data_usage",
    "enter_sandbox",
    "format_size",
    "is_running",
    "kill_all_but",
    "parse_size",
    "runnable_threads",
    "start_time",
    "watchdog",
]

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
MEMORY_TICK = 0.05  # seconds between two memory checks of every sandbox
DISK_TICK = 0.05  # seconds between two measurements of a small data folder
# Seconds between two measurements woken by writes (inotify): at 2-4 GiB/s into the page cache,
# 5 ms is 10-20 MiB past the limit at most, for a walk of a small folder costing ~0.1 ms.
DISK_EVENT_GAP = 0.005
IDLE_DISK_WAIT = 1.0  # seconds the disk thread waits for a write before it looks for sandboxes
DISK_CPU_SHARE = 0.05  # a large data folder is measured at most this share of the time
QUIET_EVERY = 5  # memory ticks between two checks of an idle kernel with nothing else running
MEMFD_EVERY = 5  # memory ticks between two walks of the tree's open files (memfd, pipes)
FILES_CPU_SHARE = 0.05  # a tree with many open files is walked at most this share of the time
# Seconds between two walks of an idle kernel's open files when nothing else runs: its own
# threads can hold at most RLIMIT_NOFILE pipes (64 MiB), within the kernel's allowance.
QUIET_FILES_EVERY = 2.0
# What one pipe may hold: its default capacity (16 pages). The seccomp filter refuses
# F_SETPIPE_SZ, so no pipe of the sandbox grows past it (past fs.pipe-user-pages-soft new pipes
# get only 2 pages: charging 16 is an upper bound).
PIPE_CAPACITY = 16 * (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096)
MAX_OPEN_FILES = 1024  # RLIMIT_NOFILE of sandbox processes (isolation.Limits)
MAX_DATA_ENTRIES = 200_000  # more files than this in /mnt/data counts as over the disk limit
# Seconds between two looks for files no folder names (unlinked while open): at once when
# inotify saw a file deleted or written under a name that is gone, else at this pace.
HIDDEN_FILES_EVERY = 1.0
MAX_MAPS_BYTES = 8 << 20  # of one process's /proc/PID/maps (65,530 mappings at most, ~100 B each)
LAUNCHER_MARK = "kernel_module"  # in the launcher's JSON argument (isolation.Isolation.command)
TMPFS_INSIDE = ("tmp", "dev/shm", "home/sandbox")  # the sandbox's tmpfs mounts, below its root
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Kernel memory of one tmpfs inode (or link) that no block count shows: inode, dentry and a long
# name took 1.3 KiB each (1.55 million empty files in /tmp: 1.9 GiB of host slab, 0 blocks used).
TMPFS_INODE_BYTES = 2048
# Kernel memory of one epoll watch (epitem and wait-queue entry; 2.78 million took 554 MiB of
# host slab from 12 processes, none of it in any RSS). A process can watch each of its
# descriptors once per instance, so each instance a process holds is charged that many watches
# up front (reading the watches from fdinfo cost seconds per walk under such a flood).
EPOLL_WATCH_BYTES = 256
EPOLL_INSTANCE_BYTES = MAX_OPEN_FILES * EPOLL_WATCH_BYTES
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
UNITS = {"": 1, "k": 1 << 10, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_size(text: str | int, *, what: str) -> int:
    """``"2g"``, ``"512m"``, ``"1.5GiB"`` or a number of bytes; a ConfigurationError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = SIZE.match(str(text))
        if match is None:
            raise ConfigurationError(
                f"{what} must be a size such as '2g', '500m' or a number of bytes, not {text!r}."
            )
        value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value < MIB:
        raise ConfigurationError(f"{what} must be at least 1m (one mebibyte), not {text!r}.")
    return value


def format_size(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"


# ------------------------------------------------------------------------------- the process tree


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(65536).decode("ascii", "replace")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a child belongs to the thread that forked it)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            found.extend(int(child) for child in text.split())
    return found


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): tells a pid from its reuse."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def releasing(pid: int, started: int | None) -> bool:
    """Whether the killed process ``pid`` has yet to give its memory back.

    A zombie has (its memory and descriptors go before it becomes one): its parent, stopped by
    :func:`freeze`, cannot reap it, and waiting for its pid to go would wait for ever.
    """
    text = _read(f"/proc/{pid}/stat")
    if text is None or start_time(pid) != started:
        return False
    return text[text.rfind(")") + 2 :][:1] not in ("Z", "X")


def is_running(pid: int, started: int) -> bool:
    """``pid`` is still the process that started at ``started`` and has not finished dying."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return False
    fields = text[text.rfind(")") + 2 :].split()
    return len(fields) > 19 and int(fields[19]) == started and fields[0] not in ("Z", "X")


def runnable_threads(pid: int) -> int:
    """Threads of ``pid`` running or waiting for a CPU now (an idle kernel has none)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    count = 0
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/stat")
        if text and text[text.rfind(")") + 2 : text.rfind(")") + 3] == "R":
            count += 1
    return count


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (all its threads), or None once it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SandboxTree:
    """The host's view of one sandbox: its PID 1, the launcher (reaper) and the kernel.

    With namespaces the outer process (bwrap) has one child, PID 1 of the sandbox's PID
    namespace; without, the outer process is the launcher itself. The launcher is the first
    process on the way down whose command line is the launcher's, and the kernel is its oldest
    child. All three are found once, as the kernel starts, before any code ran.
    """

    outer_pid: int
    namespaced: bool = True
    init_pid: int | None = None
    reaper_pid: int | None = None
    kernel_pid: int | None = None
    _init_started: int | None = None
    _kernel_started: int | None = None

    def locate(self) -> bool:
        """Find PID 1, the launcher and the kernel; False while they do not all exist yet."""
        if self.init_pid is None:
            if not self.namespaced or _namespace_init(self.outer_pid):
                init = self.outer_pid
            else:
                inner = _children(self.outer_pid)
                if not inner:
                    return False
                init = inner[0]
            started = start_time(init)
            if started is None:
                return False
            self.init_pid, self._init_started = init, started
        if self.kernel_pid is None:
            reaper = self.init_pid
            for _ in range(3):  # bwrap may keep its own init above the launcher
                if LAUNCHER_MARK in (_read(f"/proc/{reaper}/cmdline") or ""):
                    break
                oldest = _oldest_child(reaper)
                if oldest is None:
                    return False
                reaper = oldest
            kernel = _oldest_child(reaper)
            if kernel is None:
                return False
            self.reaper_pid, self.kernel_pid = reaper, kernel
            self._kernel_started = start_time(kernel)
        return True

    def alive(self) -> bool:
        return self.init_pid is not None and start_time(self.init_pid) == self._init_started

    def signal_kernel(self, signum: int) -> bool:
        """Signal the kernel process from the host (the same process it was: start time checked)."""
        if self.kernel_pid is None or start_time(self.kernel_pid) != self._kernel_started:
            return False
        try:
            os.kill(self.kernel_pid, signum)
        except OSError:
            return False
        return True

    def members(self) -> list[int]:
        """Every process below PID 1 (not PID 1 itself), parents first."""
        if self.init_pid is None or not self.alive():
            return []
        found: list[int] = []
        queue = _children(self.init_pid)
        seen: set[int] = set()
        while queue and len(found) < 65536:
            pid = queue.pop(0)
            if pid in seen:
                continue
            seen.add(pid)
            found.append(pid)
            queue.extend(_children(pid))
        return found

    def tmpfs_root(self) -> str | None:
        """A /proc/<pid>/root of the sandbox that the host may read (PID 1 may refuse: non-dumpable)."""
        if not self.namespaced:
            return None
        for pid in (self.kernel_pid, self.reaper_pid, self.init_pid):
            if pid is not None and os.access(f"/proc/{pid}/root/tmp", os.R_OK):
                return f"/proc/{pid}/root"
        return None


def _oldest_child(pid: int) -> int | None:
    born = [(started, child) for child in _children(pid) if (started := start_time(child)) is not None]
    return min(born)[1] if born else None


def _namespace_init(pid: int) -> bool:
    """True when ``pid`` is PID 1 of a PID namespace below ours (its NSpid ends in 1)."""
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def kill_all_but(tree: SandboxTree, keep: Sequence[int | None], *, rounds: int = 20) -> int:
    """SIGKILL every process of the tree except ``keep``, until none is left; how many were killed.

    Repeated because a process may fork between two passes; each pass kills the parents, so the
    next one sees only the last children.
    """
    kept = {pid for pid in keep if pid is not None}
    killed = 0
    for _ in range(rounds):
        victims = [pid for pid in tree.members() if pid not in kept]
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.005)
    return killed


# --------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryUse:
    """Memory the sandbox holds on the host, in bytes."""

    processes: int  # private (anonymous) and shared-memory pages of every process but PID 1
    tmpfs: int  # what /tmp, /dev/shm and home hold
    largest: int | None = None  # the process holding the most
    largest_bytes: int = 0
    memfd: int = 0  # memfd files (shared memory no mount shows), counted apart from mappings
    pipes: int = 0  # pipe buffers (kernel memory), each open pipe at its full capacity
    sockets: int = 0  # queued in the sandbox's sockets (kernel memory)
    members: tuple[int, ...] = ()  # the processes counted

    @property
    def total(self) -> int:
        return self.processes + self.tmpfs + self.memfd + self.pipes + self.sockets


# /proc/<pid>/status lines that count: private and shared memory, and the page tables, which no
# RSS shows: 65,000 one-page mappings, each 2 MiB from the next and read (the shared zero page),
# cost a process 254 MiB of page tables and no RSS; 12 such processes held 3 GiB of host memory.
STATUS_COUNTED = ("RssAnon:", "RssShmem:", "VmPTE:")


def _status_bytes(pid: int) -> int | None:
    """RssAnon + RssShmem + VmPTE from /proc/<pid>/status: cheap, and an upper bound of what it holds."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith(STATUS_COUNTED):
            total += int(line.split()[1]) * 1024
    return total


def _page_table_bytes(pid: int) -> int:
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmPTE:"):
            return int(line.split()[1]) * 1024
    return 0


def _proportional_bytes(pid: int) -> int | None:
    """Pss_Anon + Pss_Shmem: pages shared by several processes counted once in all (page-table walk).

    Plus the process's own page tables (VmPTE), which are never shared.
    """
    text = _read(f"/proc/{pid}/smaps_rollup")
    if not text:
        return None  # not ours to read (non-dumpable): the caller keeps the upper bound
    total = _page_table_bytes(pid)
    for line in text.splitlines():
        if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
            total += int(line.split()[1]) * 1024
    return total


def tmpfs_bytes(root: str | None, sizes: Sequence[int]) -> int:
    """Bytes the sandbox's tmpfs mounts hold; their whole size when the host cannot look.

    Each inode in use counts too (``TMPFS_INODE_BYTES``): empty files cost the host memory that
    the ``size`` of the mount never bounds.
    """
    if root is None:
        return sum(sizes)
    used = 0
    for inside, size in zip(TMPFS_INSIDE, sizes, strict=False):
        try:
            info = os.statvfs(f"{root}/{inside}")
        except OSError:
            used += size
            continue
        used += (info.f_blocks - info.f_bfree) * info.f_frsize
        used += (info.f_files - info.f_ffree) * TMPFS_INODE_BYTES
    return used


@dataclass(frozen=True)
class OpenFiles:
    """Memory held through open files, per process holding them, each file counted once."""

    memfd: dict[int, int] = field(default_factory=dict)
    pipes: dict[int, int] = field(default_factory=dict)  # pipe buffers and epoll watches


def open_file_bytes(pids: Sequence[int]) -> OpenFiles:
    """Bytes held in memfd files and pipe buffers, per process holding them open.

    ``memfd_create`` memory is shared memory on no mount the host can ``statvfs``, and needs no
    mapping (``write`` fills it); a pipe's buffer is kernel memory no process's RSS shows. Only
    the open descriptors show either. A pipe is charged at its full capacity
    (``PIPE_CAPACITY``): what it holds cannot be read without touching it. Each epoll
    descriptor is charged with the pipes, at the most watches its process can add to it
    (``EPOLL_INSTANCE_BYTES``). Each process has at most ``MAX_OPEN_FILES`` descriptors
    (RLIMIT_NOFILE), which bounds this walk.
    """
    seen_files: set[tuple[int, int]] = set()
    seen_pipes: set[str] = set()
    memfd: dict[int, int] = {}
    pipes: dict[int, int] = {}
    for pid in pids:
        folder = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds[:MAX_OPEN_FILES]:
            link = folder + fd
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target.startswith("pipe:"):
                if target not in seen_pipes:  # "pipe:[inode]": both ends are one pipe
                    seen_pipes.add(target)
                    pipes[pid] = pipes.get(pid, 0) + PIPE_CAPACITY
            elif target == "anon_inode:[eventpoll]":
                # Per descriptor: every epoll instance shares one anonymous inode, so two
                # descriptors of one instance cannot be told apart (the second is overcharged).
                pipes[pid] = pipes.get(pid, 0) + EPOLL_INSTANCE_BYTES
            elif target.startswith("/memfd:"):
                try:
                    info = os.stat(link)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) not in seen_files:
                    seen_files.add((info.st_dev, info.st_ino))
                    memfd[pid] = memfd.get(pid, 0) + info.st_blocks * 512
    return OpenFiles(memfd, pipes)


def memory_use(
    tree: SandboxTree,
    tmpfs_sizes: Sequence[int],
    budget: int,
    files: OpenFiles | None = None,
    sockets: int = 0,
) -> MemoryUse:
    """What the tree holds: a cheap upper bound first, the exact (proportional) sum only near the budget.

    ``files`` and ``sockets``: what :func:`open_file_bytes` and :func:`socket_buffer_bytes` found
    (measured less often).
    """
    members = tree.members()
    tmpfs = tmpfs_bytes(tree.tmpfs_root(), tmpfs_sizes)
    found = files or OpenFiles()
    in_memfd, in_pipes = sum(found.memfd.values()), sum(found.pipes.values())
    in_files = in_memfd + in_pipes
    rough = {pid: size for pid in members if (size := _status_bytes(pid)) is not None}
    sizes: dict[int, int] = rough
    if sum(rough.values()) + tmpfs + in_files + sockets > budget:
        exact = {pid: _proportional_bytes(pid) for pid in rough}
        sizes = {pid: exact_size if (exact_size := exact[pid]) is not None else rough[pid] for pid in rough}
    # The process to kill first holds the most, its memfd files and pipes included.
    holding = {pid: size + found.memfd.get(pid, 0) + found.pipes.get(pid, 0) for pid, size in sizes.items()}
    largest = max(holding, key=holding.__getitem__, default=None)
    largest_bytes = holding.get(largest, 0) if largest else 0
    return MemoryUse(
        sum(sizes.values()), tmpfs, largest, largest_bytes, in_memfd, in_pipes, sockets, tuple(members)
    )


# ----------------------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskUse:
    # Each file at the larger of its size and what it occupies. A sparse file counts whole: a
    # shared mapping fills it without a write() call (no inotify event), at memory speed, so
    # what it can come to hold is counted the moment its size is set (ftruncate is an event).
    bytes: int
    entries: int
    complete: bool  # False when the walk stopped at MAX_DATA_ENTRIES


def data_usage(
    folder: Path,
    *,
    max_entries: int = MAX_DATA_ENTRIES,
    on_folder: Callable[[str], None] | None = None,
) -> DiskUse:
    """What everything under ``folder`` counts against the disk limit, never following a symlink.

    ``on_folder`` is called with every folder walked (the watchdog watches them for writes).
    """
    total, entries = 0, 0
    stack = [str(folder)]
    while stack:
        path = stack.pop()
        if on_folder is not None:
            on_folder(path)
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    entries += 1
                    if entries > max_entries:
                        return DiskUse(total, entries, complete=False)
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += max(info.st_blocks * 512, info.st_size if stat.S_ISREG(info.st_mode) else 0)
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                raise
    return DiskUse(total, entries, complete=True)


def hidden_file_bytes(pids: Sequence[int], device: int) -> int:
    """Bytes held on ``device`` by files no folder names: unlinked while open, or ``O_TMPFILE``.

    A walk of the data folder cannot see them, yet their blocks stay taken until the last
    descriptor or mapping goes. Found through each process's open descriptors (regular files
    with no link left) and its shared mappings of deleted files (the mapping's length: all it
    can fill). Each file counts once, at the larger of its size and its blocks.
    """
    seen: set[int] = set()
    total = 0
    where = f"{os.major(device):02x}:{os.minor(device):02x}"
    for pid in pids:
        folder = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(folder)
        except OSError:
            fds = []
        for fd in fds[:MAX_OPEN_FILES]:
            link = folder + fd
            try:
                if not os.readlink(link).endswith(" (deleted)"):
                    continue
                info = os.stat(link)
            except OSError:
                continue
            unnamed = stat.S_ISREG(info.st_mode) and info.st_dev == device and info.st_nlink == 0
            if unnamed and info.st_ino not in seen:
                seen.add(info.st_ino)
                total += max(info.st_blocks * 512, info.st_size)
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                lines = maps.read(MAX_MAPS_BYTES).splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].endswith(b" (deleted)") or fields[1][3:4] != b"s":
                continue
            if fields[3].decode() != where:
                continue
            inode = int(fields[4])
            if inode not in seen:
                seen.add(inode)
                start, _, end = fields[0].partition(b"-")
                total += int(end, 16) - int(start, 16)
    return total


# ------------------------------------------------------------------------------------ watchdog


@dataclass
class Breach:
    """What the watchdog did about a sandbox over its budget (read and cleared by the kernel)."""

    kind: str  # "memory" | "disk"
    message: str
    killed_kernel: bool = False
    interrupted: bool = False  # the running code was interrupted already


@dataclass
class Watched:
    """One sandbox under the watchdog."""

    tree: SandboxTree
    memory_budget: int
    tmpfs_sizes: tuple[int, ...]
    data_dir: Path | None
    disk_limit: int | None
    # Other sandbox-writable host folders that count against disk_limit (the runtime folder,
    # /run/ci-magic inside: its ipc sockets must be on a folder both sides reach).
    other_dirs: tuple[Path, ...] = ()
    check_memory: bool = True  # False when a cgroup holds the memory budget
    executing: bool = False  # code is running now: a disk breach interrupts it at once
    # This execution was interrupted for the disk already: one SIGINT only (measured at each
    # write, a flood breaches again and again before the first interrupt lands; a second SIGINT
    # would hit the kernel while it reports the first, and the cell would show two errors).
    disk_interrupted: bool = False
    breaches: list[Breach] = field(default_factory=list)
    disk_allowed: int = 0  # over the limit already when the execution started: only growth counts
    disk_used: int = 0
    peak_memory: int = 0
    kernel_killed_for: str | None = None  # what the container held when the kernel was killed
    _next_disk: float = 0.0  # the timer's next measurement
    _disk_paced_until: float = 0.0  # a write reported by inotify is measured from then on
    _disk_pending: bool = False  # a write was reported while paced: measure when the pace allows
    _folders_seen: set[str] = field(default_factory=set)  # watched for writes already
    _hidden_bytes: int = 0  # held by files no folder names, as last found
    _next_hidden: float = 0.0  # the next look for them on the timer's pace
    _look_for_hidden: bool = False  # inotify saw a deletion or a write to a vanished name
    _killed: tuple[int, int | None] | None = None  # the process killed last (pid, start time)
    _frozen: dict[int, int | None] = field(default_factory=dict)  # stopped while over budget
    _files: OpenFiles = field(default_factory=OpenFiles)
    _next_files: float = 0.0
    diag: socket.socket | None = None  # sock_diag in the sandbox's network namespace
    _sockets: int = 0
    _ticks: int = 0
    _alone: bool = False  # the last check found no process but the kernel
    lock: threading.Lock = field(default_factory=threading.Lock)
    disk_lock: threading.Lock = field(default_factory=threading.Lock)

    def wake(self) -> None:
        """Check open files (pipes, memfd) at the next tick: code starts running now."""
        self._next_files = 0.0

    def take_breaches(self) -> list[Breach]:
        with self.lock:
            found, self.breaches = self.breaches, []
        return found

    def _add(self, breach: Breach) -> None:
        with self.lock:
            self.breaches.append(breach)


class Watchdog:
    """One daemon thread that checks every watched sandbox each ``MEMORY_TICK``."""

    def __init__(
        self, *, tick: float = MEMORY_TICK, on_breach: Callable[[Watched], None] | None = None
    ) -> None:
        self.tick = tick
        self.on_breach = on_breach
        self._watched: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._disk_events: DiskEvents | None = None
        self._disk_thread: threading.Thread | None = None
        self._disk_events_tried = False
        self.cpu_seconds = 0.0  # this thread's own CPU time, for the benchmark

    def watch(self, item: Watched) -> None:
        with self._lock:
            self._watched[id(item)] = item
            if item.data_dir is not None and item.disk_limit is not None:
                if not self._disk_events_tried:
                    self._disk_events_tried = True
                    self._disk_events = DiskEvents.open()
                if self._disk_events is not None:
                    for folder in (item.data_dir, *item.other_dirs):
                        self._watch_folder(item, str(folder))
                    if self._disk_thread is None or not self._disk_thread.is_alive():
                        self._disk_thread = threading.Thread(
                            target=self._watch_writes,
                            args=(self._disk_events,),
                            name="ci-magic-disk-watch",
                            daemon=True,
                        )
                        self._disk_thread.start()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ci-magic-watchdog", daemon=True)
                self._thread.start()

    def forget(self, item: Watched) -> None:
        thaw(item._frozen)
        with self._lock:
            self._watched.pop(id(item), None)
            if self._disk_events is not None:
                self._disk_events.forget(id(item))

    def _watch_folder(self, item: Watched, folder: str) -> None:
        if (
            self._disk_events is not None
            and folder not in item._folders_seen
            and len(item._folders_seen) < 4 * MAX_WATCHES  # past it, the timer alone
        ):
            item._folders_seen.add(folder)
            self._disk_events.watch(id(item), folder)

    def _run(self) -> None:
        while True:
            with self._lock:
                items = list(self._watched.values())
                if not items:
                    self._thread = None
                    return
            started = time.thread_time()
            for item in items:
                try:
                    self.check(item)
                except Exception:  # a sandbox vanishing mid-check must not stop the others'
                    log.debug("ci-magic watchdog: check failed", exc_info=True)
            self.cpu_seconds += time.thread_time() - started
            time.sleep(self.tick)

    def _watch_writes(self, events: DiskEvents) -> None:
        """The disk thread: measure a sandbox's folders as soon as inotify reports a write.

        A thread of its own, so the memory checks (which read /proc for the whole tree, tens of
        milliseconds under load) never delay it.
        """
        while True:
            with self._lock:
                items = [item for item in self._watched.values() if item.disk_limit is not None]
                if not items:
                    self._disk_thread = None
                    return
            pending = [item._disk_paced_until for item in items if item._disk_pending]
            changed: set[Hashable] = set()
            overflow = False
            if pending:
                # A writer keeps the inotify queue readable: wait for the pace, not for the queue.
                time.sleep(max(min(pending) - time.monotonic(), 0.0))
            else:
                readable, _, _ = select.select([events.fd], [], [], IDLE_DISK_WAIT)
                if not readable:
                    continue
                changed, hidden, overflow = events.read()
                for item in items:
                    if id(item) in hidden or overflow:
                        item._look_for_hidden = True
            started = time.thread_time()
            for item in items:
                if item._disk_pending or overflow or id(item) in changed:
                    try:
                        self.check_disk(item, written=True)
                    except Exception:
                        log.debug("ci-magic watchdog: disk check failed", exc_info=True)
            self.cpu_seconds += time.thread_time() - started

    def check(self, item: Watched) -> None:
        tree = item.tree
        if not tree.locate() and tree.init_pid is None:
            return  # without the kernel located the budget still holds: it needs PID 1 only
        item._ticks += 1
        if not item.executing and item._alone and item._ticks % QUIET_EVERY:
            # An idle kernel with nothing else running: its own threads can only grow it up to
            # RLIMIT_AS, so a slower pace is enough and costs a fifth of the CPU.
            return
        if item.check_memory:
            self._check_memory(item)
        self.check_disk(item)

    def check_disk(self, item: Watched, *, now: bool = False, written: bool = False) -> None:
        """Measure the sandbox's disk when it is time.

        ``now``: at once, as code finishes; ``written``: inotify saw a write, measure as soon as
        the pace allows (else the timer's ``DISK_TICK``).
        """
        tree = item.tree
        if item.data_dir is None or item.disk_limit is None:
            return
        with item.disk_lock:  # the watchdog's thread and an execution's end may both measure
            moment = time.monotonic()
            if written and not now and moment < item._disk_paced_until:
                item._disk_pending = True
                return
            if now or written or moment >= item._next_disk:
                item._disk_pending = False
                self._measure_disk(item, tree, item.disk_limit)

    def _measure_disk(self, item: Watched, tree: SandboxTree, limit: int) -> None:
        if item.data_dir is not None:
            started = time.thread_time()
            watch = self._new_folder_watcher(item)
            use = data_usage(item.data_dir, on_folder=watch)
            for folder in item.other_dirs:
                more = data_usage(folder, max_entries=MAX_DATA_ENTRIES - use.entries)
                use = DiskUse(
                    use.bytes + more.bytes, use.entries + more.entries, use.complete and more.complete
                )
            moment = time.monotonic()
            if item._look_for_hidden or moment >= item._next_hidden:
                item._look_for_hidden = False
                item._next_hidden = moment + HIDDEN_FILES_EVERY
                with contextlib.suppress(OSError):
                    device = os.stat(item.data_dir).st_dev
                    item._hidden_bytes = hidden_file_bytes(tree.members(), device)
            use = DiskUse(use.bytes + item._hidden_bytes, use.entries, use.complete)
            # Paced on the walk's CPU time: a walk preempted by a busy machine costs it nothing.
            cost = (time.thread_time() - started) / DISK_CPU_SHARE
            ended = time.monotonic()
            item._next_disk = ended + max(DISK_TICK, cost)
            item._disk_paced_until = ended + max(DISK_EVENT_GAP, cost)
            item.disk_used = use.bytes
            over = use.bytes > max(limit, item.disk_allowed) or not use.complete
            if over:
                # Background writers stop now; the kernel's own code is interrupted by execute().
                kill_all_but(tree, [tree.init_pid, tree.kernel_pid])
                what = (
                    f"more than {MAX_DATA_ENTRIES:,} files"
                    if not use.complete
                    else f"{format_size(use.bytes)} (limit {format_size(limit)})"
                )
                item.disk_allowed = max(item.disk_allowed, use.bytes)
                # At once (every 50 ms of delay is more written), as the launcher would: SIGINT.
                interrupted = item.executing and (item.disk_interrupted or tree.signal_kernel(signal.SIGINT))
                item.disk_interrupted = interrupted
                item._add(Breach("disk", what, interrupted=interrupted))
                if self.on_breach:
                    self.on_breach(item)

    def _new_folder_watcher(self, item: Watched) -> Callable[[str], None] | None:
        """What the walk calls per folder: watch the ones inotify has not been told of."""
        if self._disk_events is None:
            return None
        return lambda folder: self._watch_folder(item, folder)

    def _check_memory(self, item: Watched) -> None:
        tree = item.tree
        now = time.monotonic()
        if now >= item._next_files:
            started = time.thread_time()
            item._files = open_file_bytes(tree.members())
            if item.diag is not None:
                item._sockets = socket_buffer_bytes(item.diag) or 0
            # Every MEMFD_EVERY ticks, less often when a tree with many open files makes it dear.
            spent = time.thread_time() - started
            quiet = not item.executing and item._alone
            every = QUIET_FILES_EVERY if quiet else MEMFD_EVERY * self.tick
            item._next_files = now + max(every, spent / FILES_CPU_SHARE)
        use = memory_use(tree, item.tmpfs_sizes, item.memory_budget, item._files, item._sockets)
        item.peak_memory = max(item.peak_memory, use.total)
        item._alone = set(use.members) <= {tree.kernel_pid, tree.reaper_pid}
        if not item._alone and item._next_files > now + MEMFD_EVERY * self.tick:
            item._next_files = now  # the quiet pace no longer fits: walk again at the next tick
        if use.total <= item.memory_budget or use.largest is None:
            item._killed = None
            thaw(item._frozen)
            return
        # Over the budget: every other process of the tree stops first (SIGSTOP cannot be
        # caught), so nothing grows while a victim is chosen and releases its memory; they go on
        # at the first check that finds the tree within its budget again. Without this, four
        # processes allocating on two cores took a 1g container to 1.5-1.8 GiB meanwhile.
        freeze(item._frozen, use.members, keep=(tree.init_pid, tree.reaper_pid))
        if item._killed is not None and releasing(*item._killed):
            return  # the process killed last is still releasing its memory
        memfd = f", {format_size(use.memfd)} in memfd files" if use.memfd else ""
        memfd += f", {format_size(use.pipes)} in pipes and epoll watches" if use.pipes > MIB else ""
        memfd += f", {format_size(use.sockets)} queued in sockets" if use.sockets > MIB else ""
        held = (
            f"{format_size(use.total)} ({format_size(use.processes)} in processes, "
            f"{format_size(use.tmpfs)} in /tmp, /dev/shm and home{memfd})"
        )
        if item._killed is not None:
            # Killing the largest process did not bring the sum down (memory shared by several):
            # everything but PID 1 goes, the kernel included.
            item.kernel_killed_for = held
            kill_all_but(tree, [tree.init_pid, tree.reaper_pid])
            item._add(Breach("memory", held, killed_kernel=True))
            item._killed = None
        else:
            victim = use.largest
            if victim == tree.kernel_pid:
                item.kernel_killed_for = held
            item._killed = (victim, start_time(victim))
            with contextlib.suppress(OSError):
                os.kill(victim, signal.SIGKILL)
            item._add(Breach("memory", held, killed_kernel=victim == tree.kernel_pid))
        if self.on_breach:
            self.on_breach(item)


def freeze(frozen: dict[int, int | None], members: Sequence[int], *, keep: Sequence[int | None]) -> None:
    """SIGSTOP each of ``members`` but ``keep``, noting it (with its start time) in ``frozen``."""
    for pid in members:
        if pid in keep or pid in frozen:
            continue
        started = start_time(pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGSTOP)
            frozen[pid] = started


def thaw(frozen: dict[int, int | None]) -> None:
    """SIGCONT what :func:`freeze` stopped, unless the pid now names another process."""
    for pid, started in list(frozen.items()):
        if start_time(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    frozen.clear()


_WATCHDOG: Watchdog | None = None


def watchdog() -> Watchdog:
    """The process's one watchdog thread (started with the first sandbox, ended with the last)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog()
    return _WATCHDOG


# ---------------------------------------------------------------------------- System V IPC

MESSAGE_QUEUES = 16  # System V message queues per sandbox (16 KiB each by default)
NS_GET_USERNS = 0xB701  # ioctl on a namespace file: the user namespace that owns it
# sock_diag (linux/sock_diag.h, unix_diag.h, inet_diag.h)
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_MEMINFO = 0x20
UNIX_DIAG_MEMINFO = 5
INET_DIAG_SKMEMINFO = 7
INET_KINDS = ((socket.AF_INET, socket.IPPROTO_TCP), (socket.AF_INET6, socket.IPPROTO_TCP),
              (socket.AF_INET, socket.IPPROTO_UDP), (socket.AF_INET6, socket.IPPROTO_UDP))  # fmt: skip


SANDBOX_HELPER = r"""
import os, socket, sys
shm, pages, queues, back = map(int, sys.argv[1:5])
for name, value in (("shmmax", shm), ("shmall", pages), ("msgmni", queues)):
    with open("/proc/sys/kernel/" + name, "w") as limit:
        limit.write(str(value))
diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG, in this netns
socket.send_fds(socket.socket(fileno=back), [b"d"], [diag.fileno()])
"""


def enter_sandbox(pid: int, shm_bytes: int) -> tuple[socket.socket | None, str | None]:
    """Cap System V IPC in the sandbox of process ``pid``; get a socket-diagnostics socket in its netns.

    A System V segment outlives every process that attached it and shows in no process's memory
    and on no mount, and socket buffers are kernel memory no process shows either: neither is
    anything the watchdog could read from /proc. So a helper (this host's own Python, in the
    host's PID and mount namespaces, out of the sandbox's sight) enters the sandbox's IPC and
    network namespaces through the user namespace that owns them, caps System V shared memory
    and message queues there, and hands back a NETLINK_SOCK_DIAG socket bound to the sandbox's
    network namespace, through which :func:`socket_buffer_bytes` reads what its sockets hold.
    Returns the socket (or None) and why something could not be done (or None).
    """
    nsenter = shutil.which("nsenter", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if nsenter is None:
        return None, "nsenter (util-linux) is not installed"
    fds: list[int] = []
    ours, theirs = socket.socketpair()
    try:
        ipc = os.open(f"/proc/{pid}/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
        fds.append(ipc)
        net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fds.append(net)
        # The user namespace that owns them (bwrap nests another one below it for the kernel,
        # which holds no capability over them).
        owner = fcntl.ioctl(ipc, NS_GET_USERNS)
        fds.append(owner)
        enter = [nsenter, "--preserve-credentials", f"--user=/proc/self/fd/{owner}"]
        enter += [f"--ipc=/proc/self/fd/{ipc}", f"--net=/proc/self/fd/{net}"]
        limits = [str(shm_bytes), str(max(1, shm_bytes // PAGE)), str(MESSAGE_QUEUES), str(theirs.fileno())]
        done = subprocess.run(
            [*enter, sys.executable, "-I", "-S", "-c", SANDBOX_HELPER, *limits],
            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=20, check=False,
            pass_fds=(*fds, theirs.fileno()),
        )  # fmt: skip
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            return None, lines[-1] if lines else f"exit {done.returncode}"
        ours.settimeout(5)
        _, received, _, _ = socket.recv_fds(ours, 1, 1)
        if not received:
            return None, "the helper sent no socket"
        return socket.socket(fileno=received[0]), None
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, str(err)
    finally:
        for fd in fds:
            os.close(fd)
        ours.close()
        theirs.close()


def socket_buffer_bytes(diag: socket.socket) -> int | None:
    """Bytes queued in every socket of the sandbox's network namespace (UNIX, TCP and UDP).

    Asked through sock_diag with per-socket memory information: receive and send queues as
    the kernel accounts them (a UNIX stream charges its data to the sender's send buffer).
    """
    total = 0
    for family, protocol in ((socket.AF_UNIX, 0), *INET_KINDS):
        if family == socket.AF_UNIX:
            # struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
            request = struct.pack("=BBHIIIII", family, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_MEMINFO, 0, 0)
        else:
            # struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48 bytes)
            ext = 1 << (INET_DIAG_SKMEMINFO - 1)
            request = struct.pack("=BBBBI", family, protocol, ext, 0, 0xFFFFFFFF) + bytes(48)
        flags = NLM_F_REQUEST | NLM_F_DUMP
        header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
        try:
            diag.send(header + request)
            found = _diag_memory(diag, UNIX_DIAG_MEMINFO if family == socket.AF_UNIX else INET_DIAG_SKMEMINFO,
                                 16 if family == socket.AF_UNIX else 72)  # fmt: skip
        except OSError:
            return None
        if found is None:
            return None
        total += found
    return total


def _diag_memory(diag: socket.socket, attribute: int, message_size: int) -> int | None:
    """Read one sock_diag dump; the sum of each socket's SK_MEMINFO queues."""
    total = 0
    while True:
        data = diag.recv(1 << 16)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
            if length < 16:
                return None
            if kind == NLMSG_DONE:
                return total
            if kind == NLMSG_ERROR:
                return None if struct.unpack_from("=i", data, offset + 16)[0] != -errno.ENOENT else total
            at = offset + 16 + message_size
            end = offset + length
            while at + 4 <= end:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                if attr == attribute and size >= 4 + 4 * 6:
                    memory = struct.unpack_from("=6I", data, at + 4)
                    # rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued
                    total += memory[0] + memory[2] + memory[5]
                at += (size + 3) & ~3
            offset += (length + 3) & ~3


# ---------------------------------------------------------------------------------- cgroup v2


class CgroupV2:
    """A delegated cgroup v2 subtree that holds one child cgroup per sandbox.

    Usable when our own cgroup (``0::/path`` in /proc/self/cgroup, below a ``cgroup2`` mount) is
    writable by us and offers the ``memory`` and ``pids`` controllers. A cgroup that has
    processes cannot enable controllers for children, so the host process first moves itself
    into a ``leaf`` child (what systemd's ``Delegate=`` expects of a delegated subtree).
    """

    CONTROLLERS = ("memory", "pids")
    PREFIX = "ci-magic-"

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def detect(cls, proc: Path = Path("/proc/self")) -> CgroupV2 | None:
        """The delegated subtree, or None (cgroup v1, no delegation, controllers missing)."""
        mount_point = _cgroup2_mount(proc / "mountinfo")
        own = _own_cgroup(proc / "cgroup")
        if mount_point is None or own is None:
            return None
        base = mount_point / own.lstrip("/")
        controllers = (_read(str(base / "cgroup.controllers")) or "").split()
        if not all(name in controllers for name in cls.CONTROLLERS):
            return None
        files = ("cgroup.subtree_control", "cgroup.procs")
        if not os.access(base, os.W_OK) or not all(os.access(base / f, os.W_OK) for f in files):
            return None
        tree = cls(base)
        try:
            tree._enable_controllers()
        except OSError as err:
            log.info("ci-magic: cgroup v2 at %s is not usable: %s", base, err)
            return None
        return tree

    def _enable_controllers(self) -> None:
        enabled = (_read(str(self.base / "cgroup.subtree_control")) or "").split()
        if all(name in enabled for name in self.CONTROLLERS):
            return
        procs = (_read(str(self.base / "cgroup.procs")) or "").split()
        if procs:
            leaf = self.base / f"{self.PREFIX}leaf"
            leaf.mkdir(exist_ok=True)
            for pid in procs:
                with contextlib.suppress(OSError):  # processes that exited meanwhile
                    (leaf / "cgroup.procs").write_text(pid)
        (self.base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in self.CONTROLLERS))

    def create(self, name: str, *, memory_bytes: int, max_processes: int) -> Path:
        """A child cgroup for one sandbox with its limits written (before anything runs in it)."""
        group = self.base / f"{self.PREFIX}{name}"
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(memory_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        (group / "pids.max").write_text(str(max_processes))
        return group

    @staticmethod
    def wrap(group: Path, argv: Sequence[str]) -> list[str]:
        """``argv`` started inside ``group``: the shell moves itself there, then execs (same pid)."""
        return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv]

    @staticmethod
    def kill(group: Path) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill``, Linux 5.14+; else one by one)."""
        if (group / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (group / "cgroup.kill").write_text("1")
                return
        for pid in (_read(str(group / "cgroup.procs")) or "").split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)

    @staticmethod
    def remove(group: Path) -> None:
        for _ in range(100):
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # still busy: its last processes are exiting
                time.sleep(0.01)

    @staticmethod
    def peak(group: Path) -> int | None:
        text = _read(str(group / "memory.peak"))
        return int(text) if text and text.strip().isdigit() else None


def _cgroup2_mount(mountinfo: Path) -> Path | None:
    text = _read(str(mountinfo)) or ""
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4].encode().decode("unicode_escape"))
    return None


def _own_cgroup(cgroup_file: Path) -> str | None:
    for line in (_read(str(cgroup_file)) or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None
