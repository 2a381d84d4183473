"""Container file names made safe for the local disk, and writes that cannot escape their folder.

Every download path goes through here: a name chosen by a model (or a hostile file listing) must
never write outside the output folder, through a symlink, or over a directory. Container files
come to disk only through ``download_into``: streamed, bounded by a byte cap, and renamed into
place when complete.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ci_magic.errors import ContainerFileError

if TYPE_CHECKING:
    from ci_magic.backends.base import Backend

__all__ = [
    "CONTAINER_ROOT",
    "download_into",
    "receive_into",
    "safe_relative_name",
    "save_into",
    "variable_name_for",
]

CONTAINER_ROOT = "/mnt/data/"

# Windows device names are reserved with any extension ("nul.txt" opens the null device there).
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# Bidi overrides make "evil\u202egnp.exe" display as "evilexe.png": refuse rather than mislead.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_COMPONENT_BYTES = 255

# O_NOFOLLOW + dir_fd lets us walk and write relative to an open folder without a race where a
# component is swapped for a symlink between the check and the write.
_HAVE_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")


def _refuse(name: str, why: str) -> ContainerFileError:
    return ContainerFileError(
        f"The container file name {name!r} cannot be saved safely: {why}. Nothing was written; "
        "ask the model to save the file under a plain name (like out/result.csv) and pull that."
    )


def safe_relative_name(name: str) -> str:
    """A container path or name as a safe relative POSIX name (sub-folders kept when safe).

    ``/mnt/data/out/a.csv`` -> ``out/a.csv``; ``sandbox:/mnt/data/a.csv`` -> ``a.csv``.
    Raises ``ContainerFileError`` for ``..``, absolute paths outside /mnt/data, control
    characters, reserved device names and empty names. A component that starts with a dot gets a
    leading ``_`` instead (``.ipython/profile_default/startup/x.py`` ->
    ``_ipython/profile_default/startup/x.py``): a dot-name is a start-up or config file to some
    program (.bashrc, .ipython, .git, .config), so no sandbox file is ever saved under one.
    """
    if not isinstance(name, str):
        raise _refuse(repr(name), "it is not a string")
    text = unicodedata.normalize("NFC", name.strip())
    if text.startswith("sandbox:"):
        text = text[len("sandbox:") :]
    bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI_CONTROLS), None)
    if bad is not None:
        raise _refuse(name, f"it contains the control character U+{ord(bad):04X}")
    # A backslash is a separator on Windows: treat it as one everywhere so "..\\x" is caught too.
    text = text.replace("\\", "/")
    if text.startswith(CONTAINER_ROOT):
        text = text[len(CONTAINER_ROOT) :]
    elif text.rstrip("/") == CONTAINER_ROOT.rstrip("/"):
        raise _refuse(name, "it names the container's data folder itself, not a file")
    elif text.startswith("/") or _DRIVE.match(text):
        raise _refuse(name, "it is an absolute path outside /mnt/data")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts:
        raise _refuse(name, "it is empty")
    for part in parts:
        if part == "..":
            raise _refuse(name, "it climbs out of the folder with '..'")
        if part.split(".")[0].rstrip(" ").lower() in _RESERVED:
            raise _refuse(name, f"{part!r} is a reserved device name on Windows")
        if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise _refuse(name, f"a component is longer than {_MAX_COMPONENT_BYTES} bytes")
    return "/".join(_undotted(part) for part in parts)


def _undotted(part: str) -> str:
    # Same length, never "." or "..", never hidden: "..x" -> "_.x", ".env" -> "_env".
    return "_" + part[1:] if part.startswith(".") else part


def variable_name_for(filename: str) -> str:
    """A Python identifier from a file's stem: ``sales report-2024.csv`` -> ``sales_report_2024``."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.split(".", 1)[0] if not base.startswith(".") else base.lstrip(".").split(".", 1)[0]
    ident = re.sub(r"\W+", "_", unicodedata.normalize("NFKC", stem)).strip("_")
    if not ident:
        return "pulled"
    if ident[0].isdigit():
        ident = f"f_{ident}"
    if keyword.iskeyword(ident):
        ident += "_"
    return ident


def save_into(folder: Path, name: str, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``folder/<safe name>`` atomically, never following a symlink below ``folder``.

    ``folder`` itself is the user's choice and may be a symlink; every component under it is
    opened with ``O_NOFOLLOW``. A symlink at the destination is replaced, not written through.
    """
    rel = safe_relative_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = rel.split("/")
    if _HAVE_DIR_FD:
        _save_with_dir_fd(folder, parts, data, name)
    else:
        _save_by_resolving(folder, parts, data, name)
    return folder.joinpath(*parts)


@contextlib.contextmanager
def _folder_fd(folder: Path, parts: list[str], name: str) -> Iterator[int]:
    """A descriptor of ``folder/parts[:-1]``, made as needed, never through a symlink below ``folder``."""
    fds = [os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fds[-1])
            try:
                fds.append(
                    os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds[-1])
                )
            except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file where a folder should be
                raise _refuse(name, f"{part!r} under {folder} is a symlink or not a folder") from exc
        yield fds[-1]
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _temp_name(final: str) -> str:
    return f".{final[:200]}.{secrets.token_hex(4)}.part"


def _save_with_dir_fd(
    folder: Path, parts: list[str], data: bytes | bytearray | memoryview, name: str
) -> None:
    with _folder_fd(folder, parts, name) as dir_fd:
        final = parts[-1]
        tmp = _temp_name(final)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd
        )
        try:
            with open(fd, "wb") as out:
                out.write(data)
            _move_into_place(tmp, final, dir_fd, folder, name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise


def _move_into_place(tmp: str, final: str, dir_fd: int, folder: Path, name: str) -> None:
    try:
        os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError as exc:
        raise _refuse(name, f"{final!r} is an existing folder in {folder}") from exc


async def receive_into(folder: Path, name: str, fetch: Callable[[Path], Awaitable[int]]) -> tuple[Path, int]:
    """Let ``fetch(temp_path)`` stream a file into ``folder/<safe name>``; (final path, bytes).

    ``fetch`` writes a new file at the temporary path it is given (``open_download_target``);
    it lands under its name only when complete, by an atomic rename that replaces a symlink
    rather than writing through it. Any failure leaves nothing behind.
    """
    rel = safe_relative_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = rel.split("/")
    final_path = folder.joinpath(*parts)
    if not _HAVE_DIR_FD:
        _check_by_resolving(folder, parts, name)
        tmp_path = final_path.with_name(_temp_name(parts[-1]))
        try:
            size = await fetch(tmp_path)
            os.replace(tmp_path, final_path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return final_path, size
    with _folder_fd(folder, parts, name) as dir_fd:
        tmp = _temp_name(parts[-1])
        # Through the open folder descriptor: a folder swapped for a link meanwhile changes nothing.
        via_fd = Path(f"/proc/self/fd/{dir_fd}")
        base = via_fd if via_fd.is_dir() else final_path.parent
        try:
            size = await fetch(base / tmp)
            _move_into_place(tmp, parts[-1], dir_fd, folder, name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    return final_path, size


async def download_into(
    backend: Backend, container_id: str, file_id: str, folder: Path, name: str, *, max_bytes: int
) -> tuple[Path, int]:
    """Download a container file to ``folder/<safe name>``, streamed and bounded; (path, bytes).

    The one way to bring a container file to disk: ``FileTooLarge`` over ``max_bytes`` (nothing
    written), ``ContainerFileError`` for an unsafe name, a symlink or a non-regular file.
    """
    return await receive_into(
        folder, name, lambda dest: backend.download_file(container_id, file_id, dest, max_bytes=max_bytes)
    )


def _save_by_resolving(
    folder: Path, parts: list[str], data: bytes | bytearray | memoryview, name: str
) -> None:
    parent = _check_by_resolving(folder, parts, name)
    target = parent / parts[-1]
    if target.is_dir() and not target.is_symlink():
        raise _refuse(name, f"{parts[-1]!r} is an existing folder in {folder}")
    tmp = parent / f".{parts[-1][:200]}.{secrets.token_hex(4)}.part"
    try:
        with open(tmp, "xb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_by_resolving(folder: Path, parts: list[str], name: str) -> Path:
    """Platforms without dir_fd (Windows): check each component, then confirm the resolved parent."""
    root = folder.resolve()
    parent = folder
    for part in parts[:-1]:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise _refuse(name, f"{part!r} under {folder} is a symlink or not a folder")
        parent.mkdir(exist_ok=True)
    if not parent.resolve().is_relative_to(root):
        raise _refuse(name, f"it resolves outside {folder}")
    return parent
