"""``CodeInterpreter``: the configurable, plain-Python face of ci-magic (the magics call it too).

It returns data and never prints: ``Result`` for a turn, push outcomes, pulled files, file rows
and a ``Status``. How they look in a notebook lives in ``magics.py`` and ``render/reports.py``.

::

    with CodeInterpreter(model="gpt-5-mini") as ci:   # the container is deleted on exit
        result = ci.run("Plot monthly revenue", variables={"sales_df": sales_df})
        ci.exec("print(1 + 1)", display=False)            # display=False: nothing shown, Result only
        frame = ci.pull("clean.csv").value
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from traitlets import observe

from ci_magic.backends.factory import build_backend
from ci_magic.bridge import run_sync
from ci_magic.config import Settings
from ci_magic.errors import (
    BackendError,
    CIError,
    ConfigurationError,
    Interrupted,
    for_scripts,
)
from ci_magic.events import Notice, Usage
from ci_magic.render.frontend import Frontend, detect_frontend
from ci_magic.result import Result
from ci_magic.session import Session, SilentView, TurnOptions, View
from ci_magic.variables import transfer
from ci_magic.variables.discover import prompt_variables, push_items, resolve_variables
from ci_magic.variables.progress import default_progress
from ci_magic.variables.registry import PushRequest

__all__ = ["DEFAULT_OPENAI_MODEL", "CodeInterpreter", "Status"]

DEFAULT_OPENAI_MODEL = "gpt-5-mini"

# Settings whose change means a different backend: the next turn (or %ci_reset) builds a new one.
BACKEND_TRAITS = (
    "backend",
    "model_base_url",
    "model_api_key",
    "sandbox_python",
    "isolation",
    "pool_size",
    "max_retries",
    "request_timeout",
    "execution_timeout",
    "disk_limit",
    "max_steps",
    "extra_headers",
    "gateway_url",
    "gateway_token",
    "gateway_kernel_name",
)

T = TypeVar("T")


@dataclass(frozen=True)
class Status:
    """What ``%ci_status`` shows: the configuration in force and the container as checked now."""

    backend: str
    model: str
    container_id: str | None
    container_status: str
    expires_at: int | None = None
    files: list[transfer.FileRow] | None = None  # None: not listed (no usable container)
    usage: Usage = dataclasses.field(default_factory=Usage)
    turns: int = 0
    conversation: str = "none yet"


class CodeInterpreter(Settings):
    """A code interpreter session: one container, one conversation, one push registry.

    Use it as a context manager (or call ``close()``) so its container is deleted when done.
    ``run``/``exec`` show the turn live as it streams (in a notebook, or as text on a terminal);
    pass ``display=False`` to show nothing and only get the ``Result``. Failures raise a
    ``CIError`` whose ``result`` holds what the turn produced before it failed.
    """

    def __init__(self, shell: Any = None, *, frontend: Frontend | None = None, **kwargs: Any) -> None:
        """``frontend``: where turns are shown (default: the notebook, or the terminal outside one)."""
        super().__init__(parent=shell, **kwargs)
        self.shell = shell
        self.frontend = frontend
        self.session_id = _session_id()
        self._session: Session | None = None  # built on first use
        self._backend_stale = False

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @observe(*BACKEND_TRAITS)
    def _backend_changed(self, change: dict[str, Any]) -> None:
        self._backend_stale = True

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_OPENAI_MODEL if self.backend == "openai" else ""

    # -- the session ---------------------------------------------------------------------------

    def _get_session(self) -> Session:
        try:
            return self._current_session()
        except CIError as error:  # no key, a bad setting: said the way the caller configures
            raise self._for_caller(error) from error.__cause__

    def _current_session(self) -> Session:
        if self._session is None:
            self._session = Session(
                build_backend(self),
                session_id=self.session_id,
                memory_limit=self.memory_limit,
                expires_after_minutes=self.expires_after_minutes,
                output_dir=self.output_path,
                download_concurrency=self.download_concurrency,
                upload_size_cap=self.upload_size_cap,
                pull_memory_cap=self.pull_memory_cap,
                always_push=self.always_push,
                progress=default_progress,
            )
        elif self._backend_stale:
            self._run(self._session.reset(build_backend(self)))
        self._backend_stale = False
        session = self._session
        # Cheap settings apply to the running session without restarting it.
        session.memory_limit = self.memory_limit
        session.expires_after_minutes = self.expires_after_minutes
        session.output_dir = self.output_path
        session.download_concurrency = max(1, self.download_concurrency)
        session.download_size_cap = self.download_size_cap
        session.download_turn_budget = self.download_turn_budget
        session.upload_size_cap = self.upload_size_cap
        session.pull_memory_cap = self.pull_memory_cap
        session.always_push = list(self.always_push)
        return session

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine from synchronous code; errors keep their class, worded for who is calling."""
        try:
            return run_sync(coro)
        except KeyboardInterrupt:
            raise self._for_caller(
                Interrupted("Interrupted; nothing in the kernel or the container was lost.")
            ) from None
        except CIError as error:
            raise self._for_caller(error) from error.__cause__

    def _for_caller(self, error: CIError) -> CIError:
        if self.shell is None:  # a script: no %config, no magics
            error.message = for_scripts(error.message)
            error.args = (error.message,)
        return error

    # -- turns ---------------------------------------------------------------------------------

    def run(
        self,
        prompt: str,
        *,
        variables: Mapping[str, Any] | None = None,
        new: bool = False,
        model: str | None = None,
        quiet: bool = False,
        display: bool = True,
    ) -> Result:
        """Send ``prompt`` (and ``variables`` as files) to the model and return the Result.

        ``new``: a fresh conversation; ``quiet``: final outputs only; ``display=False``: show nothing.
        """
        if not prompt.strip():
            raise self._for_caller(
                ConfigurationError(
                    "The prompt is empty. Write what you want done below %%ci, for example: "
                    "%%ci\\nPlot monthly revenue from sales_df."
                )
            )
        items = [PushRequest(name, value) for name, value in (variables or {}).items()]
        return self._turn(prompt, model=model, new=new, quiet=quiet, display=display, items=items)

    def exec(self, code: str, *, quiet: bool = False, display: bool = True) -> Result:
        """Run ``code`` verbatim in the session's container (no model on the local backend)."""
        if not code.strip():
            raise self._for_caller(
                ConfigurationError("There is no code to run: give exec() some Python code.")
            )
        return self._turn(code, exec_code=code, quiet=quiet, display=display)

    def run_prompt(
        self,
        prompt: str,
        *,
        namespace: Mapping[str, Any],
        names: list[str] | None = None,
        new: bool = False,
        model: str | None = None,
        quiet: bool = False,
    ) -> Result:
        """``run`` with variables taken from ``namespace``: ``names`` plus data-like names in the prompt."""
        variables = resolve_variables(names or [], namespace)
        if self.auto_push:
            for name in prompt_variables(prompt, namespace):
                variables.setdefault(name, namespace[name])
        return self.run(prompt, variables=variables, new=new, model=model, quiet=quiet)

    def _turn(
        self,
        prompt: str,
        *,
        model: str | None = None,
        new: bool = False,
        quiet: bool = False,
        display: bool = True,
        exec_code: str | None = None,
        items: list[PushRequest] | None = None,
    ) -> Result:
        session = self._get_session()
        options = TurnOptions(
            model=model or self.resolved_model(),
            instructions=self.instructions,
            new_conversation=new,
            exec_code=exec_code,
            extra_headers=dict(self.extra_headers),
        )
        view = self._make_view(quiet=quiet) if display else SilentView()
        result = self._run(session.run_turn(prompt, options, view, push=items or (), link_base=Path.cwd()))
        if result.error is not None:
            raise self._for_caller(result.error)
        return result

    def _make_view(self, *, quiet: bool) -> View:
        from ci_magic.render.live import TurnView

        frontend = self.frontend or detect_frontend()
        return TurnView(frontend, quiet=quiet, max_updates_per_second=self.max_updates_per_second)

    # -- variables and files -------------------------------------------------------------------

    def push(
        self,
        *,
        fmt: str | None = None,
        as_name: str | None = None,
        allow_pickle: bool = False,
        **variables: Any,
    ) -> list[transfer.PushOutcome]:
        """Send ``name=value`` pairs to /mnt/data now (unchanged values are not sent again)."""
        items = [
            PushRequest(name, value, "variable", fmt, as_name, allow_pickle)
            for name, value in variables.items()
        ]
        return self._push_items(items)[0]

    def push_names(
        self,
        names: list[str],
        *,
        namespace: Mapping[str, Any],
        as_name: str | None = None,
        fmt: str | None = None,
        allow_pickle: bool = False,
    ) -> tuple[list[transfer.PushOutcome], list[Notice]]:
        """``%ci_push``: variables by name, files or folders by path; also notices (container replaced)."""
        return self._push_items(
            push_items(names, namespace, fmt=fmt, filename=as_name, allow_pickle=allow_pickle)
        )

    def _push_items(self, items: list[PushRequest]) -> tuple[list[transfer.PushOutcome], list[Notice]]:
        return self._run(self._get_session().push(items))

    def pull(self, name: str) -> Any:
        """Download a container file into the output folder and return it decoded (never unpickled)."""
        return self.pull_file(name).value

    def pull_file(self, name: str) -> transfer.PulledFile:
        """``pull`` with what is known about the file: its kind, local path, the name to bind."""
        return self._run(self._get_session().pull(name))

    def pull_all(self) -> list[transfer.PulledFile]:
        """Download and decode every file the model made."""
        return self._run(self._get_session().pull_all())

    def files(self) -> list[transfer.FileRow]:
        """The container's files: name, size, source (notebook / model / %%ci_exec), created."""
        session = self._session
        if session is None or session.container is None:
            return []
        rows = self._run(session.file_rows())
        return [session.describe_file(row) for row in rows]

    # -- session management --------------------------------------------------------------------

    def reset(self) -> None:
        """Start over: a new container, a fresh conversation, and a backend built from the current
        configuration and environment (a new API key is picked up). Pushed files are re-sent."""
        self._backend_stale = False
        if self._session is not None:
            try:
                backend = build_backend(self)
            except CIError as error:
                raise self._for_caller(error) from error.__cause__
            self._run(self._session.reset(backend))

    def status(self) -> Status:
        """Backend, model, the container as the backend reports it now, its files, usage and turns."""
        model = self.resolved_model() or "(server default)"
        session = self._session
        if session is None:
            return Status(self.backend, model, None, "not created yet (created on the first cell)")
        if self._backend_stale and session.backend.name != self.backend:
            return Status(
                self.backend, model, None, "not created yet (the next cell starts one on this backend)"
            )
        container, files, state = session.container, None, ""
        if container is not None:
            try:
                current = self._run(session.refresh_container())
                if current is not None and current.usable:
                    files, state = self.files(), current.status
                else:
                    gone = "gone" if current is None else current.status
                    state = f"{gone}: the next cell starts a new container and re-sends the files you pushed"
            except BackendError as error:
                state = f"unknown, the check failed: {error.message}"
        conversation = session.conversation
        return Status(
            backend=self.backend,
            model=model,
            container_id=container.id if container else None,
            container_status=state or "not created yet",
            expires_at=container.expires_at if container and container.usable and files is not None else None,
            files=files,
            usage=session.usage,
            turns=session.turns,
            conversation=conversation.previous_response_id or f"{len(conversation.messages)} messages",
        )

    def close(self) -> None:
        """Delete the container (if configured) and close connections."""
        if self._session is None:
            return
        session, self._session = self._session, None
        with contextlib.suppress(CIError, RuntimeError, OSError):
            run_sync(session.close(delete_container=self.delete_container_on_exit))


def _session_id() -> str:
    """The kernel session's id when running in a kernel (stable names for containers), else random."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)  # None in terminal IPython and plain Python
    session = getattr(getattr(kernel, "session", None), "session", None)
    if isinstance(session, str) and session:
        return session.replace("-", "")[:12]
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
