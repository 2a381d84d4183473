"""``CodeInterpreter``: the configurable, plain-Python face of ci-magic (the magics call it too).

It returns data and never prints: ``Result`` for a turn, push outcomes, pulled files, file rows
and a ``Status``. How they look in a notebook lives in ``magics.py`` and ``render/reports.py``.

::

    with CodeInterpreter(model="gpt-5-mini") as ci:   # the container is deleted on exit
        result = ci.run("Plot monthly revenue", variables={"sales_df": sales_df})
        ci.exec("print(1 + 1)", display=False)            # display=False: nothing shown, Result only
        frame = ci.pull("clean.csv")                        # a DataFrame
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from traitlets import observe

from ci_magic.backends.factory import BACKEND_SETTINGS, build_backend
from ci_magic.bridge import run_sync
from ci_magic.config import Settings
from ci_magic.errors import BackendError, CIError, ConfigurationError, Interrupted, for_scripts
from ci_magic.events import Notice
from ci_magic.render.frontend import Frontend, detect_frontend
from ci_magic.replay import ExportOutcome, ReplayPlan, export_session, ran_as_recorded
from ci_magic.result import Result
from ci_magic.session import (
    Session,
    SilentView,
    Status,
    TurnOptions,
    View,
    kernel_session_id,
    session_settings,
)
from ci_magic.state_file import NotebookState, kernel_is_restarting
from ci_magic.transcript import TurnEntry, TurnKind
from ci_magic.variables import transfer
from ci_magic.variables.progress import default_progress
from ci_magic.variables.registry import PushRequest

__all__ = ["DEFAULT_OPENAI_MODEL", "CodeInterpreter", "Status"]

DEFAULT_OPENAI_MODEL = "gpt-5-mini"
EMPTY_PROMPT = (
    "The prompt is empty. Write what you want done below %%ci, e.g. %%ci\\nPlot revenue from sales_df."
)
T = TypeVar("T")


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
        self.session_id = kernel_session_id()
        self._session: Session | None = None  # built on first use
        self._backend_stale = False
        self._saved = NotebookState(shell)  # reattach after a kernel restart

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @observe(*BACKEND_SETTINGS)
    def _backend_changed(self, change: dict[str, Any]) -> None:
        self._backend_stale = True

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_OPENAI_MODEL if self.backend == "openai" else ""

    # -- the session ---------------------------------------------------------------------------

    def _get_session(self) -> Session:
        """The session, built on first use and reset with a new backend after a backend setting changed."""
        try:
            if self._session is None:
                backend = build_backend(self)
                settings = session_settings(self)
                self._session = Session(
                    backend,
                    session_id=self.session_id,
                    progress=default_progress,
                    on_change=self._save_state,
                    registry=self._saved.new_registry(),
                    **settings,
                )
                self._saved.take_over(self._session, self)
            elif self._backend_stale:
                self._run(self._session.reset(build_backend(self)))
        except CIError as error:  # no key, a bad setting: said the way the caller configures
            raise self._for_caller(error) from error.__cause__
        self._backend_stale = False
        session = self._session
        for name, value in session_settings(self).items():  # cheap ones apply without a restart
            setattr(session, name, value)
        return session

    def _save_state(self) -> None:
        if self._session is not None:
            self._saved.save(self._session, self)

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
            raise self._for_caller(ConfigurationError(EMPTY_PROMPT))
        items = [PushRequest(name, value) for name, value in (variables or {}).items()]
        return self._turn(prompt, model=model, new=new, quiet=quiet, display=display, items=items)

    def exec(self, code: str, *, quiet: bool = False, display: bool = True) -> Result:
        """Run ``code`` verbatim in the session's container (no model on the local backend)."""
        if not code.strip():
            raise self._for_caller(
                ConfigurationError("There is no code to run: give exec() some Python code.")
            )
        return self._turn(code, exec_code=code, quiet=quiet, display=display)

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
        kind: TurnKind | None = None,
    ) -> Result:
        session = self._get_session()
        options = TurnOptions(
            model=model or self.resolved_model(),
            instructions=self.instructions,
            new_conversation=new,
            exec_code=exec_code,
            extra_headers=dict(self.extra_headers),
            kind=kind,
        )
        view: View = SilentView()
        if display:
            from ci_magic.render.live import TurnView  # imports Pygments: only when something is shown

            frontend = self.frontend or detect_frontend()
            view = TurnView(frontend, quiet=quiet, max_updates_per_second=self.max_updates_per_second)
        result = self._run(session.run_turn(prompt, options, view, push=items or (), link_base=Path.cwd()))
        if result.error is not None:
            raise self._for_caller(result.error)
        return result

    # -- reproducing: replay and export ------------------------------------------------------

    def last_turn(self) -> TurnEntry | None:
        """The session's latest turn that ran code or asked the model (not a restore)."""
        return self._session.transcript.last("ci", "exec", "replay") if self._session is not None else None

    def replay(self, plan: ReplayPlan, *, quiet: bool = False, display: bool = True) -> Result:
        """Re-run ``plan``'s recorded code in the current container without asking the model to write
        any (``replay.py``); rendered and recorded like any turn."""
        plan = plan.with_current_uploads(self._get_session().registry)
        result = self._turn(plan.code, exec_code=plan.code, quiet=quiet, display=display, kind="replay")
        if not ran_as_recorded(plan, result):
            error = BackendError(
                "The replay did not run the recorded code as written (the model changed it while "
                "copying it), so its outputs are not a reproduction. Run %ci_replay again."
            )
            error.result, result.error = result, error
            raise self._for_caller(error)
        return result

    def export(self, path: str | Path) -> ExportOutcome:
        """Write the code this session ran as a plain script (``.py``) or notebook (``.ipynb``), with
        the pushed inputs beside it (``replay.py``)."""
        if self._session is None:
            raise self._for_caller(
                ConfigurationError("No code has run in this session yet, so there is nothing to export.")
            )
        session = self._session
        return export_session(session.transcript, session.registry, Path(path).expanduser())

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
        return self.push_requests(items)[0]

    def push_requests(self, requests: list[PushRequest]) -> tuple[list[transfer.PushOutcome], list[Notice]]:
        """Push what ``%ci_push`` resolved; also the notices of a container made or replaced for it."""
        return self._run(self._get_session().push(requests))

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
        """The container's files: name, size, source (notebook / model), created."""
        return self._run(self._session.file_rows()) if self._session is not None else []

    # -- session management --------------------------------------------------------------------

    def reset(self) -> None:
        """Start over: a new container, a fresh conversation, and a backend built from the current
        configuration and environment (a new API key is picked up). Pushed files are re-sent."""
        if self._session is not None:
            self._backend_stale = True  # so the session is reset with a backend built afresh
            self._get_session()
        self._saved.forget()

    def status(self) -> Status:
        """Backend, model, the container as the backend reports it now, its files, usage and turns."""
        model = self.resolved_model() or "(server default)"
        if self._session is None or (self._backend_stale and self._session.backend.name != self.backend):
            when = "on this backend" if self._session is not None else "by the first cell"
            return Status(self.backend, model, None, f"not created yet (the next cell starts one {when})")
        return self._run(self._session.status(model=model))

    def close(self) -> None:
        """Delete the container (if configured) and close connections.

        When the kernel is being restarted (not shut down), the container is kept and the session's
        state saved, so the first cell after the restart reattaches to it.
        """
        if self._session is None:
            return
        restarting = kernel_is_restarting(self.shell)
        self._saved.at_exit(self._session, self, restarting=restarting)
        session, self._session = self._session, None
        delete = self.delete_container_on_exit and not restarting
        with contextlib.suppress(CIError, RuntimeError, OSError):
            run_sync(session.close(delete_container=delete))
