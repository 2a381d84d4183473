"""The one ``Session`` a ``CodeInterpreter`` keeps, from its first use to the kernel's exit.

Built from the settings on first use; reset with a backend built afresh after a backend setting
changed (or ``reset()``: a new API key is picked up); carried across kernel restarts through the
notebook's state file (``state_file.py``); closed at exit, keeping the container for a restart.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from ci_magic.backends.factory import build_backend
from ci_magic.bridge import run_sync
from ci_magic.config import Settings
from ci_magic.errors import CIError
from ci_magic.session import Session
from ci_magic.session_settings import SessionSettings
from ci_magic.state_file import NotebookState, kernel_is_restarting
from ci_magic.status import Status
from ci_magic.variables.progress import default_progress

__all__ = ["SessionKeeper", "kernel_session_id", "session_settings"]


class SessionKeeper:
    """Holds the session of ``settings`` (a ``CodeInterpreter``) for the shell it runs in (or None)."""

    def __init__(self, settings: Settings, shell: object = None) -> None:
        self.settings = settings
        self.shell = shell
        self.session_id = kernel_session_id()
        self.session: Session | None = None  # built on first use
        self.backend_stale = False  # a backend setting changed: the next use builds the backend again
        self._saved = NotebookState(shell)  # reattach after a kernel restart

    def get(self) -> Session:
        """The session, built on first use and reset with a new backend after a backend setting
        changed; the settings that need no new backend apply again each time (no restart needed)."""
        settings = self.settings
        if self.session is None:
            self.session = Session(
                build_backend(settings),
                session_settings(settings),
                session_id=self.session_id,
                progress=default_progress,
                on_change=self._save,
                registry=self._saved.new_registry(),
            )
            self._saved.take_over(self.session, settings)
        else:
            if self.backend_stale:
                run_sync(self.session.reset(build_backend(settings)))
            self.session.apply(session_settings(settings))
        self.backend_stale = False
        return self.session

    def _save(self) -> None:
        if self.session is not None:
            self._saved.save(self.session, self.settings)

    def reset(self) -> None:
        """A new container, a fresh conversation and a backend built afresh; the saved state forgotten."""
        self.backend_stale = True
        if self.session is not None:
            self.get()
        self._saved.forget()

    def status(self, model: str) -> Status:
        """The session's status, checked now; before it exists (or when the next use builds it on
        another backend), what the next cell will do."""
        session, backend = self.session, self.settings.backend
        if session is None or (self.backend_stale and session.backend.name != backend):
            when = "on this backend" if session is not None else "by the first cell"
            return Status(backend, model, None, f"not created yet (the next cell starts one {when})")
        return run_sync(session.status(model=model))

    def close(self) -> None:
        """Delete the container (if configured) and close connections; when the kernel is being
        restarted, the container is kept and the state saved for the first cell after it."""
        if self.session is None:
            return
        restarting = kernel_is_restarting(self.shell)
        self._saved.at_exit(self.session, self.settings, restarting=restarting)
        session, self.session = self.session, None
        delete = self.settings.delete_container_on_exit and not restarting
        with contextlib.suppress(CIError, RuntimeError, OSError):
            run_sync(session.close(delete_container=delete))


def session_settings(settings: Settings) -> SessionSettings:
    """What a session follows of the configuration; applied again before each use, so a change takes
    effect at the next cell without a restart."""
    return SessionSettings(
        memory_limit=settings.memory_limit,
        expires_after_minutes=settings.expires_after_minutes,
        output_dir=Path(settings.output_dir).expanduser(),
        download_concurrency=max(1, settings.download_concurrency),
        download_size_cap=settings.download_size_cap,
        download_turn_budget=settings.download_turn_budget,
        upload_size_cap=settings.upload_size_cap,
        pull_memory_cap=settings.pull_memory_cap,
        always_push=tuple(settings.always_push),
        restore_on_expiry=settings.restore_on_expiry,
        restore_time_limit=settings.restore_time_limit,
        prices=dict(settings.prices),
    )


def kernel_session_id() -> str:
    """The kernel session's id when running in a kernel (stable container names), else random."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)  # None in terminal IPython and plain Python
    session = getattr(getattr(kernel, "session", None), "session", None)
    if isinstance(session, str) and session:
        return session.replace("-", "")[:12]
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
