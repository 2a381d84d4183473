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

from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from traitlets import observe

from ci_magic.backends.factory import BACKEND_SETTINGS
from ci_magic.bridge import run_sync
from ci_magic.config import Settings
from ci_magic.errors import CIError, ConfigurationError, Interrupted, for_scripts
from ci_magic.events import Notice
from ci_magic.lifecycle import SessionKeeper
from ci_magic.render.frontend import Frontend, detect_frontend
from ci_magic.replay import EXPORTED_KINDS, ExportOutcome, ReplayPlan, confirm_replayed, export_session
from ci_magic.result import Result
from ci_magic.session import Session, SilentView, Status, TurnOptions, View
from ci_magic.transcript import Transcript, TurnEntry
from ci_magic.variables.registry import PushRegistry, PushRequest
from ci_magic.variables.transfer import FileRow, PulledFile, PushOutcome

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
        self._kept = SessionKeeper(self, shell)  # before the settings: setting them marks it stale
        super().__init__(parent=shell, **kwargs)
        self.shell = shell
        self.frontend = frontend

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @observe(*BACKEND_SETTINGS)
    def _backend_changed(self, change: dict[str, Any]) -> None:
        self._kept.backend_stale = True

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_OPENAI_MODEL if self.backend == "openai" else ""

    # -- the session, and errors worded for who is calling -------------------------------------

    @property
    def _session(self) -> Session | None:
        return self._kept.session

    def _get_session(self) -> Session:
        return self._call(self._kept.get)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._call(run_sync, coro)

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``; errors keep their class, worded for who is calling (Ctrl-C included)."""
        try:
            return function(*args)
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
        options = self._options(model=model, new_conversation=new)
        return self._turn(prompt, options, quiet=quiet, display=display, push=items)

    def exec(self, code: str, *, quiet: bool = False, display: bool = True) -> Result:
        """Run ``code`` verbatim in the session's container (no model on the local backend)."""
        if not code.strip():
            raise self._for_caller(
                ConfigurationError("There is no code to run: give exec() some Python code.")
            )
        return self._turn(code, self._options(exec_code=code), quiet=quiet, display=display)

    def _options(self, *, model: str | None = None, **options: Any) -> TurnOptions:
        return TurnOptions(
            model=model or self.resolved_model(),
            instructions=self.instructions,
            extra_headers=dict(self.extra_headers),
            **options,
        )

    def _turn(
        self, prompt: str, options: TurnOptions, quiet: bool, display: bool, push: Sequence[PushRequest] = ()
    ) -> Result:
        session = self._get_session()
        view: View = SilentView()
        if display:
            from ci_magic.render.live import TurnView  # imports Pygments: only when something is shown

            frontend = self.frontend or detect_frontend()
            view = TurnView(frontend, quiet=quiet, max_updates_per_second=self.max_updates_per_second)
        result = self._run(session.run_turn(prompt, options, view, push=push, link_base=Path.cwd()))
        if result.error is not None:
            raise self._for_caller(result.error)
        return result

    # -- reproducing: replay and export (replay.py) --------------------------------------------

    def last_turn(self) -> TurnEntry | None:
        """The session's latest turn that ran code or asked the model (not a restore)."""
        return self._session.transcript.last(*EXPORTED_KINDS) if self._session is not None else None

    def replay(self, plan: ReplayPlan, *, quiet: bool = False, display: bool = True) -> Result:
        """Re-run ``plan``'s recorded code in the current container without asking the model to write
        any (``replay.py``); rendered and recorded like any turn."""
        plan = plan.with_current_uploads(self._get_session().registry)
        options = self._options(exec_code=plan.code, kind="replay")
        return self._call(
            confirm_replayed, plan, self._turn(plan.code, options, quiet=quiet, display=display)
        )

    def export(self, path: str | Path) -> ExportOutcome:
        """Write the code this session ran as a plain script (``.py``) or notebook (``.ipynb``), with
        the pushed inputs beside it (``replay.py``)."""
        session = self._session
        ran = (session.transcript, session.registry) if session else (Transcript(), PushRegistry())
        return self._call(export_session, *ran, Path(path).expanduser())

    # -- variables and files -------------------------------------------------------------------

    def push(
        self,
        *,
        fmt: str | None = None,
        as_name: str | None = None,
        allow_pickle: bool = False,
        **variables: Any,
    ) -> list[PushOutcome]:
        """Send ``name=value`` pairs to /mnt/data now (unchanged values are not sent again)."""
        items = [PushRequest(n, v, "variable", fmt, as_name, allow_pickle) for n, v in variables.items()]
        return self.push_requests(items)[0]

    def push_requests(self, requests: list[PushRequest]) -> tuple[list[PushOutcome], list[Notice]]:
        """Push what ``%ci_push`` resolved; also the notices of a container made or replaced for it."""
        return self._run(self._get_session().push(requests))

    def pull(self, name: str) -> Any:
        """Download a container file into the output folder and return it decoded (never unpickled)."""
        return self.pull_file(name).value

    def pull_file(self, name: str) -> PulledFile:
        """``pull`` with what is known about the file: its kind, local path, the name to bind."""
        return self._run(self._get_session().pull(name))

    def pull_all(self) -> list[PulledFile]:
        """Download and decode every file the model made."""
        return self._run(self._get_session().pull_all())

    def files(self) -> list[FileRow]:
        """The container's files: name, size, source (notebook / model), created."""
        return self._run(self._session.file_rows()) if self._session is not None else []

    # -- session management (lifecycle.py) -----------------------------------------------------

    def reset(self) -> None:
        """Start over: a new container, a fresh conversation, and a backend built from the current
        configuration and environment (a new API key is picked up). Pushed files are re-sent."""
        self._call(self._kept.reset)

    def status(self) -> Status:
        """Backend, model, the container as the backend reports it now, its files, usage and turns."""
        return self._call(self._kept.status, self.resolved_model() or "(server default)")

    def close(self) -> None:
        """Delete the container (if configured) and close connections.

        When the kernel is being restarted (not shut down), the container is kept and the session's
        state saved, so the first cell after the restart reattaches to it.
        """
        self._kept.close()
