"""Wake the watchdog the moment a sandbox writes to its data folder (Linux inotify).

The data folder has no quota here (no delegated cgroup I/O controller, no project quotas for an
ordinary user), so ``disk_limit`` is held by measuring the folder from the host. Measured on a
timer alone, a writer at page-cache speed (2-4 GiB/s) got 200 MiB past a 200 MiB limit between
two 50 ms ticks. inotify reports each write as it happens: the watchdog measures the folder at
once (paced by the measurement's own cost), so a flood is stopped within milliseconds.

Every way a file's charge can grow makes an event: the watchdog charges each file at the larger of
its size and what it occupies, so a shared ``mmap`` (which writes without a syscall) can only fill
what ftruncate, itself an event, already counted. The timer's full measurement still runs for
what inotify cannot see: folders past ``MAX_WATCHES`` or the system's ``max_user_watches``, a full
event queue, writes in a folder made a moment before its watch was added.

Watches are added by path with ``IN_DONT_FOLLOW | IN_ONLYDIR``: a symlink the sandbox plants is
never followed. The worst a raced rename can do is make the watchdog watch some other folder,
which only costs an extra measurement of the sandbox's own folder.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Hashable

__all__ = ["MAX_WATCHES", "DiskEvents"]

log = logging.getLogger(__name__)

# linux/inotify.h
IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
# A write, truncate or fallocate (IN_MODIFY), a new file or folder, one moved in, one deleted
# (its space stays held while a process keeps it open or mapped).
WATCH_MASK = IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_ONLYDIR | IN_DONT_FOLLOW
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
MAX_WATCHES = 8192  # folders watched per sandbox; more than that fall back to the timer
READ_SIZE = 64 * 1024


class DiskEvents:
    """One inotify instance for every watched sandbox of the process.

    ``owner`` keys are opaque to this class (the watchdog passes its ``Watched`` items).
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self._lock = threading.Lock()
        self._folders: dict[int, tuple[Hashable, bytes]] = {}  # wd -> (owner, folder path)
        self._count: dict[Hashable, int] = {}  # owner -> watches held

    @classmethod
    def open(cls) -> DiskEvents | None:
        """An instance, or None where inotify is unavailable (the timer alone holds the limit)."""
        try:
            return cls()
        except (OSError, AttributeError) as err:
            log.debug("ci-magic: no inotify (%s); the disk limit is measured on a timer only", err)
            return None

    def watch(self, owner: Hashable, folder: str | bytes) -> None:
        """Watch ``folder`` (not its subfolders: those are added as they are seen)."""
        path = os.fsencode(folder)
        with self._lock:
            if self._count.get(owner, 0) >= MAX_WATCHES:
                return
            wd = self._libc.inotify_add_watch(self.fd, path, WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC:  # fs.inotify.max_user_watches: the timer carries on alone
                    log.debug("ci-magic: inotify watch limit reached at %r", path)
                return
            if wd not in self._folders:
                self._count[owner] = self._count.get(owner, 0) + 1
            self._folders[wd] = (owner, path)

    def forget(self, owner: Hashable) -> None:
        with self._lock:
            for wd in [wd for wd, (held, _) in self._folders.items() if held == owner]:
                self._libc.inotify_rm_watch(self.fd, wd)
                del self._folders[wd]
            self._count.pop(owner, None)

    def read(self) -> tuple[set[Hashable], set[Hashable], bool]:
        """What happened since the last read.

        The owners whose folders changed; those of them that deleted a file or wrote to one no
        folder names (unlinked while open, or ``O_TMPFILE``): their space is found only through
        the processes holding them; and whether events were lost.
        """
        changed: set[Hashable] = set()
        hidden: set[Hashable] = set()
        modified: set[tuple[Hashable, bytes]] = set()
        new_folders: list[tuple[Hashable, bytes]] = []
        overflow = False
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            with self._lock:
                while offset + EVENT.size <= len(data):
                    wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                    name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
                    offset += EVENT.size + length
                    if mask & IN_Q_OVERFLOW:
                        overflow = True
                        continue
                    held = self._folders.get(wd)
                    if held is None:
                        continue
                    owner, folder = held
                    if mask & IN_IGNORED:  # the folder was deleted: the kernel dropped the watch
                        del self._folders[wd]
                        self._count[owner] = max(self._count.get(owner, 1) - 1, 0)
                        continue
                    changed.add(owner)
                    if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and name:
                        new_folders.append((owner, os.path.join(folder, name)))
                    elif mask & IN_DELETE:
                        hidden.add(owner)
                    elif mask & IN_MODIFY and name:
                        modified.add((owner, os.path.join(folder, name)))
        for owner, folder in new_folders:
            self.watch(owner, folder)
        for owner, path in modified:
            if owner not in hidden and not os.path.lexists(path):
                hidden.add(owner)  # written under a name no folder holds any more
        return changed, hidden, overflow

    def close(self) -> None:
        with self._lock:
            self._folders.clear()
            self._count.clear()
            os.close(self.fd)
