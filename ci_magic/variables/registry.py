"""What the notebook pushed into the container, kept across container changes.

The registry is the session's memory of pushed files: which variable or path became which
container file, its fingerprint (to skip unchanged pushes), the file id it lives under (to replace
it), and its schema card (for the prompt). When a container expires the entries stay; their bytes
are spooled to a private temporary folder so ``ContainerFiles.reupload`` can restore them without
the variables. Files pushed by path are re-read from disk instead (they may be large, and a newer
version is what the user wants).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ci_magic.variables.schema import render_card
from ci_magic.variables.snapshot import FrameSnapshot

__all__ = ["Origin", "PushRegistry", "PushRequest", "PushedFile"]

Origin = Literal["variable", "path", "always_push"]


@dataclass(frozen=True)
class PushRequest:
    """What the user asked to push: a notebook value (or a ``Path`` for a file sent as is) and how."""

    name: str  # the variable name, or for a file pushed by path its container file name
    value: Any
    origin: Origin = "variable"
    fmt: str | None = None  # --format
    filename: str | None = None  # --as
    allow_pickle: bool = False


@dataclass(frozen=True)
class PushedFile:
    """What is in the container (or, detached, was and will be re-sent): the registry's entry."""

    name: str
    filename: str  # the name we asked for, relative to /mnt/data
    fingerprint: str
    kind: str
    fmt: str
    size: int
    origin: Origin
    card_body: tuple[str, ...]
    reader: str  # loader line with "{path}"
    container_id: str | None = None  # None: not in any container right now
    file_id: str | None = None
    container_path: str | None = None  # where the backend put it (OpenAI prefixes a hash)
    spool: Path | None = None  # our copy of the bytes, for re-uploads
    source_path: Path | None = None  # files pushed by path: re-read from here
    pushed_at: float = field(default_factory=time.time)
    snapshot: FrameSnapshot | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> str:
        return self.container_path or f"/mnt/data/{self.filename}"

    @property
    def loader(self) -> str:
        return self.reader.replace("{path}", repr(self.path))

    @property
    def card(self) -> str:
        return render_card(self.path, list(self.card_body), self.loader)

    def in_container(self, container_id: str) -> bool:
        return self.container_id == container_id and self.file_id is not None


class PushRegistry:
    """Pushed files keyed by name (variable name, or file name for paths); one per session."""

    def __init__(self, spool_dir: Path | None = None) -> None:
        """``spool_dir``: where pushed bytes are kept for re-uploads (default: a private temporary
        folder, made on the first push and removed with the registry)."""
        self._entries: dict[str, PushedFile] = {}
        self._spool_dir = spool_dir
        self._cleanup: weakref.finalize | None = None

    @property
    def spool_dir(self) -> Path:
        if self._spool_dir is None:
            self._spool_dir = Path(tempfile.mkdtemp(prefix="ci-magic-push-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._spool_dir, ignore_errors=True)
        else:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
        return self._spool_dir

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PushedFile]:
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> PushedFile | None:
        return self._entries.get(name)

    def by_file_id(self, file_id: str) -> PushedFile | None:
        return next((e for e in self._entries.values() if e.file_id == file_id), None)

    def put(self, entry: PushedFile) -> list[PushedFile]:
        """Record ``entry``; returns the entries it displaced (same name, or another name, same file)."""
        displaced = [
            e for e in self._entries.values() if e.name == entry.name or e.filename == entry.filename
        ]
        for old in displaced:
            del self._entries[old.name]
            if old.spool is not None and old.spool != entry.spool:
                old.spool.unlink(missing_ok=True)
            if old.snapshot is not None and old.snapshot is not entry.snapshot:
                old.snapshot.release()
        self._entries[entry.name] = entry
        return displaced

    def remove(self, name: str) -> PushedFile | None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            if entry.spool is not None:
                entry.spool.unlink(missing_ok=True)
            if entry.snapshot is not None:
                entry.snapshot.release()
        return entry

    def detach(self, name: str) -> None:
        """Mark an entry as no longer in any container (kept for the next re-upload)."""
        entry = self._entries.get(name)
        if entry is not None:
            self._entries[name] = replace(entry, container_id=None, file_id=None, container_path=None)

    def spool_path(self, name: str, fingerprint: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
        return self.spool_dir / f"{safe}-{fingerprint[:16]}"

    def cards(self, container_id: str | None = None) -> str:
        """Schema cards for the prompt context ("" when nothing was pushed).

        With ``container_id``, only files that are in that container now (a failed upload is not
        announced to the model).
        """
        entries = [e for e in self._entries.values() if container_id is None or e.in_container(container_id)]
        if not entries:
            return ""
        return "Files from the notebook in /mnt/data:\n" + "\n".join(e.card for e in entries)

    def clear(self) -> None:
        for name in list(self._entries):
            self.remove(name)

    def close(self) -> None:
        for entry in self._entries.values():
            if entry.snapshot is not None:
                entry.snapshot.release()
        self._entries.clear()
        if self._cleanup is not None:
            self._cleanup()
