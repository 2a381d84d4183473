"""A container's data folder on the host, read and written without trusting the sandbox.

The sandbox owns ``/mnt/data`` and may put anything there: symlinks to the host's files, folders
swapped for links between two of our calls. Every path is therefore walked one component at a
time with ``O_NOFOLLOW`` descriptors (no check-then-use window), names are validated before they
touch the disk, and uploads land through a temporary file and an atomic rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ci_magic.backends.base import (
    DOWNLOAD_CHUNK_BYTES,
    check_reported_size,
    discard_download,
    open_download_target,
    stream_past_cap,
)
from ci_magic.errors import ContainerFileError

__all__ = [
    "DATA_PREFIX",
    "container_path",
    "copy_out",
    "delete_file",
    "remove_tree",
    "scan",
    "write_file",
]

DATA_PREFIX = "/mnt/data/"
MAX_SCAN_ENTRIES = 20_000
MAX_SCAN_DEPTH = 32
UPLOAD_TEMP = re.compile(r"^\.ci-magic-[0-9a-f]{16}\.upload$")  # an upload still being written
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def container_path(filename: str) -> str:
    """``filename`` as a clean path below /mnt/data, or a ContainerFileError saying why not."""
    name = filename[len(DATA_PREFIX) :] if filename.startswith(DATA_PREFIX) else filename
    parts = PurePosixPath(name).parts if name else ()
    bad = (
        not parts
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or any(part in (".", "..") for part in name.split("/"))
    )
    if bad:
        raise ContainerFileError(
            f"The file name {filename!r} would not land inside /mnt/data: use a relative name such as "
            "'sales.csv' or 'inputs/sales.csv', without '..', a leading '/' or backslashes."
        )
    return "/".join(parts)


@contextlib.contextmanager
def _open_dirs(
    data_dir: Path, parts: tuple[str, ...], *, create: bool = False, user: tuple[int, int] | None = None
) -> Iterator[int]:
    """A descriptor of data_dir/parts..., refusing symlinks at every step (no TOCTOU window)."""
    fd = os.open(data_dir, OPEN_DIR)
    try:
        for part in parts:
            try:
                next_fd = os.open(part, OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, OPEN_DIR, dir_fd=fd)
                if user:
                    os.fchown(next_fd, *user)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ContainerFileError(
                        f"/mnt/data/{'/'.join(parts)} goes through {part!r}, which is a symlink or a file, "
                        "not a folder; ci-magic does not follow links created in the sandbox."
                    ) from None
                raise
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def write_file(data_dir: Path, relative: str, payload: bytes | Path, user: tuple[int, int] | None) -> int:
    *folders, name = relative.split("/")
    with _open_dirs(data_dir, tuple(folders), create=True, user=user) as dir_fd:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise ContainerFileError(f"/mnt/data/{relative} is a folder; choose another file name.")
        tmp = f".ci-magic-{secrets.token_hex(8)}.upload"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(payload, Path):
                    with payload.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    out.write(payload)
                if user:
                    os.fchown(out.fileno(), *user)
                size = out.tell()
            # rename replaces a symlink itself, never what it points to.
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    return size


def copy_out(data_dir: Path, relative: str, dest: Path, *, max_bytes: int) -> int:
    """Copy /mnt/data/<relative> into the new file ``dest``, bounded by ``max_bytes``; bytes copied.

    The source is opened relative to a descriptor of its folder with ``O_NOFOLLOW`` (a symlink is
    refused, never followed) and ``O_NONBLOCK`` (opening a FIFO cannot hang), and must be a regular
    file: a FIFO, device or socket is refused. Its apparent size (``st_size``) and allocated size
    (``st_blocks``) are both checked before reading; the copy goes in chunks, so memory stays at
    one chunk, and stops at ``max_bytes`` even if the file grows while it is read.
    """
    what = f"/mnt/data/{relative}"
    *folders, name = relative.split("/")
    with _open_dirs(data_dir, tuple(folders)) as dir_fd:
        flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            src = os.open(name, flags, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ContainerFileError(
                    f"{what} is a symlink; ci-magic does not read through links created in the sandbox."
                ) from None
            raise
        try:
            info = os.fstat(src)
            if not stat.S_ISREG(info.st_mode):
                raise ContainerFileError(
                    f"{what} is not a regular file (a FIFO, device or socket), so it was not read."
                )
            if info.st_nlink > 1:
                # A hard link made in the sandbox may share its inode with a host file it can see.
                raise ContainerFileError(
                    f"{what} is a hard link to another file, so it was not read; copy the file instead."
                )
            check_reported_size(what, info.st_size, info.st_blocks * 512, max_bytes=max_bytes)
            return _copy_bounded(src, dest, what, max_bytes)
        finally:
            os.close(src)


def _copy_bounded(src: int, dest: Path, what: str, max_bytes: int) -> int:
    out = open_download_target(dest)
    copied = 0
    try:
        buffer = bytearray(DOWNLOAD_CHUNK_BYTES)
        view = memoryview(buffer)
        while True:
            # One byte past the cap is enough to know the file is over it.
            count = os.readv(src, [view[: min(len(buffer), max_bytes + 1 - copied)]])
            if count == 0:
                return copied
            copied += count
            if copied > max_bytes:
                raise stream_past_cap(what, max_bytes)
            written = 0
            while written < count:
                written += os.write(out, view[written:count])
    except BaseException:
        os.close(out)
        out = -1
        discard_download(dest)
        raise
    finally:
        if out >= 0:
            os.close(out)


def delete_file(data_dir: Path, relative: str) -> None:
    *folders, name = relative.split("/")
    with _open_dirs(data_dir, tuple(folders)) as dir_fd, contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def scan(data_dir: Path) -> Iterator[tuple[str, tuple[int, float]]]:
    """Regular files below data_dir as (relative path, (size, mtime)); symlinks are skipped."""
    count = 0

    def walk(dir_fd: int, prefix: str, depth: int) -> Iterator[tuple[str, tuple[int, float]]]:
        nonlocal count
        with os.scandir(dir_fd) as entries:
            listed = list(entries)
        for entry in listed:
            count += 1
            if count > MAX_SCAN_ENTRIES:
                return
            if entry.is_symlink() or UPLOAD_TEMP.match(entry.name):
                continue
            if entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                yield prefix + entry.name, (info.st_size, info.st_mtime)
            elif entry.is_dir(follow_symlinks=False) and depth < MAX_SCAN_DEPTH:
                try:
                    child = os.open(entry.name, OPEN_DIR, dir_fd=dir_fd)
                except OSError:
                    continue  # replaced by a symlink meanwhile, or unreadable
                try:
                    yield from walk(child, f"{prefix}{entry.name}/", depth + 1)
                finally:
                    os.close(child)

    try:
        top = os.open(data_dir, OPEN_DIR)
    except FileNotFoundError:
        return
    try:
        yield from walk(top, "", 0)
    finally:
        os.close(top)


def remove_tree(path: Path) -> None:
    def retry(function, target, _exc) -> None:  # shutil's onerror signature
        # Code in the sandbox may have left read-only folders behind.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            function(target)

    if path.exists():
        shutil.rmtree(path, onerror=retry)
