"""The session's state on disk, so a kernel restart does not throw the session away.

One small JSON file per notebook, keyed by the notebook's path (as the Jupyter server tells the
kernel: ``JPY_SESSION_NAME`` / ``__session__``; VS Code's ``__vsc_ipynb_file__``), else by the
kernel's connection file (which a restart keeps), else by the kernel session id. It lives in the
user's Jupyter data directory (``jupyter --data-dir``)/ci-magic/sessions, never beside the notebook,
as a file only the user can read (0600, in a 0700 folder).

It holds the backend's name and a fingerprint of where it points (never a key, token, header or
URL: only their hash), the container id, the conversation ids, the transcript, and the registry
of pushed files with their fingerprints. ``%ci_reset`` forgets it. Reading it back is defensive:
a file that is too large, not ours, or from another backend is ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_STATE_BYTES",
    "STATE_VERSION",
    "SessionState",
    "StateFile",
    "backend_fingerprint",
    "capture",
    "kernel_is_restarting",
    "notebook_key",
    "resume",
    "settings_fingerprint",
    "state_folder",
]

STATE_VERSION = 1
_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
MAX_STATE_BYTES = 8 * 1024 * 1024
STALE_SECONDS = 30 * 24 * 3600  # state files untouched this long are removed when another is saved


@dataclass
class SessionState:
    backend: str
    backend_fingerprint: str  # sha256 of where the backend points; tells "same backend" without secrets
    container_id: str | None = None
    previous_response_id: str | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)
    registry: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    model: str = ""
    saved_at: float = 0.0
    ended: str | None = None  # "restart" | "shutdown": how the kernel that wrote it ended
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.__dict__}

    @classmethod
    def from_json(cls, data: Any) -> SessionState | None:
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        try:
            state = cls(
                backend=str(data["backend"]),
                backend_fingerprint=str(data["backend_fingerprint"]),
                container_id=_optional_str(data.get("container_id")),
                previous_response_id=_optional_str(data.get("previous_response_id")),
                transcript=[t for t in data.get("transcript") or [] if isinstance(t, dict)],
                registry=[r for r in data.get("registry") or [] if isinstance(r, dict)],
                turns=int(data.get("turns") or 0),
                model=str(data.get("model") or ""),
                saved_at=float(data.get("saved_at") or 0.0),
                ended=_optional_str(data.get("ended")),
                key=str(data.get("key") or ""),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return state


def _optional_str(value: Any) -> str | None:
    """A saved id: letters, digits, ``_`` and ``-`` only (it goes into URL paths and folder names)."""
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


def state_folder() -> Path:
    """``<jupyter data dir>/ci-magic/sessions`` (honours JUPYTER_DATA_DIR)."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "ci-magic" / "sessions"


def notebook_key(shell: Any = None) -> str | None:
    """What names this notebook's session across kernel restarts, or None outside a kernel."""
    namespace = getattr(shell, "user_ns", None) or {}
    for value in (
        namespace.get("__session__"),  # ipykernel sets it from JPY_SESSION_NAME (the notebook path)
        os.environ.get("JPY_SESSION_NAME"),
        namespace.get("__vsc_ipynb_file__"),
    ):
        if isinstance(value, str) and value.strip():
            return "notebook:" + value.strip()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    with contextlib.suppress(Exception):
        from ipykernel.connect import get_connection_file

        return "connection:" + os.path.abspath(get_connection_file())
    session = getattr(getattr(kernel, "session", None), "session", None)
    return f"session:{session}" if isinstance(session, str) and session else None


def kernel_is_restarting(shell: Any = None) -> bool:
    """True while the kernel is shutting down to be restarted (not for good).

    ipykernel keeps the ``shutdown_reply`` it sent (with the request's ``restart`` flag) to broadcast
    it at exit; atexit handlers run after it was set.
    """
    message = getattr(getattr(shell, "kernel", None), "_shutdown_message", None)
    content = message.get("content") if isinstance(message, dict) else None
    return bool(isinstance(content, dict) and content.get("restart"))


class StateFile:
    """The state file of one notebook (``key``), in ``folder`` (default: ``state_folder()``)."""

    def __init__(self, key: str, folder: Path | None = None) -> None:
        self.key = key
        self.folder = folder or state_folder()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        self.path = self.folder / f"{digest}.json"

    @property
    def from_notebook_path(self) -> bool:
        return self.key.startswith("notebook:")

    @property
    def spool_folder(self) -> Path:
        """Where the push registry keeps the bytes of pushed variables, so that after a restart a
        new container still gets them (the variables themselves went with the kernel)."""
        return self.folder / f"{self.path.stem}.spool"

    def new_registry(self) -> Any:
        """A push registry spooling into ``spool_folder`` (created private)."""
        from ci_magic.variables.registry import PushRegistry

        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.spool_folder.mkdir(exist_ok=True, mode=0o700)
        return PushRegistry(spool_dir=self.spool_folder)

    def load(self) -> SessionState | None:
        """The saved state, or None (none saved, unreadable, too large, or another notebook's)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_STATE_BYTES:
                return None
            raw = handle.read(MAX_STATE_BYTES + 1)
        try:
            state = SessionState.from_json(json.loads(raw))
        except ValueError:
            return None
        if state is None or state.key != self.key:
            return None
        return state

    def save(self, state: SessionState) -> None:
        """Write atomically, readable by the user only; never fails the cell (a full disk, a
        read-only home: the session goes on, it just will not survive a restart)."""
        state.key = self.key
        state.saved_at = time.time()
        data = json.dumps(state.to_json(), separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_STATE_BYTES:
            # Keep the newest turns that fit: the transcript is what grows.
            while state.transcript and len(data) > MAX_STATE_BYTES:
                del state.transcript[: max(1, len(state.transcript) // 4)]
                data = json.dumps(state.to_json(), separators=(",", ":")).encode("utf-8")
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
            temporary = self.folder / f".{self.path.name}.{os.getpid()}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(temporary, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            self._remove_stale()

    def forget(self, *, spools: bool = False) -> None:
        """Remove the saved state (and, with ``spools``, the pushed bytes kept for re-uploads)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if spools:
            shutil.rmtree(self.spool_folder, ignore_errors=True)

    def _remove_stale(self) -> None:
        now = time.time()
        for other in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):
                if other != self.path and now - other.stat().st_mtime > STALE_SECONDS:
                    other.unlink()
                    shutil.rmtree(other.with_suffix(".spool"), ignore_errors=True)


def backend_fingerprint(*parts: str) -> str:
    """A hash of where a backend points (base URLs, kernel name): equal for the same backend, and
    never revealing a token embedded in a URL."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


# -- the session <-> its saved state ---------------------------------------------------------------


def settings_fingerprint(settings: Any) -> str:
    """Where the configured backend runs containers, hashed: a saved container id only means something
    to the same service (the same OpenAI endpoint, the same gateway, this machine's sandboxes)."""
    backend = str(getattr(settings, "backend", ""))
    if backend == "openai":
        where = [
            os.environ.get("OPENAI_BASE_URL", "") if os.environ.get("OPENAI_API_KEY") else "",
            os.environ.get("AZURE_OPENAI_ENDPOINT", ""),
        ]
    elif backend == "gateway":
        where = [str(getattr(settings, "gateway_url", "")), str(getattr(settings, "gateway_kernel_name", ""))]
    else:
        where = [os.environ.get("XDG_CACHE_HOME", ""), str(getattr(settings, "sandbox_python", ""))]
    return backend_fingerprint(backend, *where)


_REGISTRY_FIELDS = (
    "name", "filename", "fingerprint", "kind", "fmt", "size", "origin", "card_body", "reader",
    "container_id", "file_id", "container_path", "pushed_at",
)  # fmt: skip


def registry_rows(registry: Any) -> list[dict[str, Any]]:
    """The push registry as plain rows: names, fingerprints, where each file is (no bytes, no
    in-memory snapshot); a file pushed by path keeps its path so it can be re-read."""
    rows = []
    for entry in registry:
        row = {name: getattr(entry, name) for name in _REGISTRY_FIELDS}
        row["card_body"] = list(entry.card_body)
        row["source_path"] = str(entry.source_path) if entry.source_path is not None else None
        rows.append(row)
    return rows


def fill_registry(registry: Any, rows: list[dict[str, Any]]) -> None:
    """Registry entries back from rows; a variable's bytes come back from the registry's spool folder
    when they were spooled there (a registry from ``StateFile.new_registry``)."""
    from ci_magic.variables.registry import PushedFile

    for row in rows:
        try:
            values = {name: row[name] for name in _REGISTRY_FIELDS}
            values["card_body"] = tuple(str(line) for line in values["card_body"])
            source = row.get("source_path")
            entry = PushedFile(**values, source_path=Path(source) if isinstance(source, str) else None)
        except (KeyError, TypeError, ValueError):
            continue
        spool = registry.spool_path(entry.name, entry.fingerprint)
        if entry.source_path is None and spool.is_file() and not spool.is_symlink():
            entry = dataclasses.replace(entry, spool=spool)
        registry.put(entry)


def capture(session: Any, fingerprint: str, *, ended: str | None = None) -> SessionState:
    """What to save of ``session`` (a ``ci_magic.session.Session``)."""
    container = session.container
    return SessionState(
        backend=session.backend.name,
        backend_fingerprint=fingerprint,
        container_id=container.id if container is not None else None,
        previous_response_id=session.conversation.previous_response_id,
        transcript=session.transcript.to_json(),
        registry=registry_rows(session.registry),
        turns=session.turns,
        model=session.model,
        ended=ended,
    )


def resume(session: Any, state: SessionState) -> None:
    """Give ``session`` the saved state; its next cell checks the container and reattaches."""
    from ci_magic.backends.base import ContainerInfo
    from ci_magic.transcript import Transcript

    container = None
    if state.container_id:
        container = ContainerInfo(id=state.container_id, name="", status="unknown", created_at=0)
    fill_registry(session.registry, state.registry)
    session.resume(
        container,
        previous_response_id=state.previous_response_id,
        transcript=Transcript.from_json(state.transcript),
        turns=state.turns,
        model=state.model,
    )


class NotebookState:
    """What a ``CodeInterpreter`` keeps across kernel restarts for its notebook (nothing outside one)."""

    def __init__(self, shell: Any) -> None:
        key = notebook_key(shell) if shell is not None else None
        self.file = StateFile(key) if key else None

    def new_registry(self) -> Any:
        return self.file.new_registry() if self.file is not None else None

    def take_over(self, session: Any, settings: Any) -> None:
        """Take over what the kernel before a restart saved for this notebook, on the same backend."""
        state = self.file.load() if self.file is not None else None
        if state is not None and state.backend_fingerprint == settings_fingerprint(settings):
            resume(session, state)

    def save(self, session: Any, settings: Any, *, ended: str | None = None) -> None:
        if self.file is not None:
            self.file.save(capture(session, settings_fingerprint(settings), ended=ended))

    def forget(self) -> None:
        if self.file is not None:
            self.file.forget()

    def at_exit(self, session: Any, settings: Any, *, restarting: bool) -> None:
        """Saved for a restart (or for a notebook that will be reopened), else forgotten for good."""
        if self.file is None:
            return
        if restarting or self.file.from_notebook_path:
            with contextlib.suppress(Exception):
                self.save(session, settings, ended="restart" if restarting else "shutdown")
        else:
            self.file.forget(spools=True)  # keyed by this kernel's connection file: never seen again
