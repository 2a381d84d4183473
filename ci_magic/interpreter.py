"""``CodeInterpreter``: the configurable, plain-Python face of ci-magic (the magics call it too).

::

    ci = CodeInterpreter()                    # or the one %load_ext made: get_ipython().ci_magic...
    result = ci.run("Plot monthly revenue", variables={"sales_df": sales_df})
    ci.exec("print(1 + 1)")
    frame = ci.pull("clean.csv")
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from traitlets import observe

from ci_magic.backends.base import Backend, ContainerInfo
from ci_magic.backends.factory import build_backend
from ci_magic.bridge import run_sync
from ci_magic.config import Settings
from ci_magic.errors import (
    BackendError,
    CIError,
    ConfigurationError,
    ContainerFileError,
    StreamError,
    VariableError,
)
from ci_magic.render.files import human_size
from ci_magic.render.frontend import Frontend, detect_frontend
from ci_magic.render.tables import rows_bundle
from ci_magic.result import Result
from ci_magic.session import Session, SilentView, TurnOptions, View
from ci_magic.variables import transfer
from ci_magic.variables.discover import prompt_variables, push_items, resolve_variables
from ci_magic.variables.progress import default_progress
from ci_magic.variables.registry import PushRequest

__all__ = ["DEFAULT_OPENAI_MODEL", "CodeInterpreter", "Interrupted"]

DEFAULT_OPENAI_MODEL = "gpt-5-mini"

# Settings whose change means a different backend: the next turn starts a new session.
BACKEND_TRAITS = (
    "backend",
    "model_base_url",
    "model_api_key",
    "sandbox_python",
    "pool_size",
    "max_retries",
    "request_timeout",
    "execution_timeout",
    "max_steps",
    "extra_headers",
    "gateway_url",
    "gateway_token",
    "gateway_kernel_name",
)


class Interrupted(CIError):
    title = "ci-magic"


class CodeInterpreter(Settings):
    """A code interpreter session: one container, one conversation, one push registry."""

    def __init__(self, shell: Any = None, *, frontend: Frontend | None = None, **kwargs: Any) -> None:
        """``frontend``: where turns are shown (default: the notebook, or the terminal outside one)."""
        super().__init__(parent=shell, **kwargs)
        self.shell = shell
        self.frontend = frontend
        self.session_id = _session_id()
        self._session: Session | None = None  # built on first use
        self._backend_stale = False
        self.last_result: Result | None = None

    @observe(*BACKEND_TRAITS)
    def _backend_changed(self, change: dict[str, Any]) -> None:
        self._backend_stale = True

    # -- building the session ------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_OPENAI_MODEL if self.backend == "openai" else ""

    def _make_backend(self) -> Backend:
        return build_backend(self)

    def _get_session(self) -> Session:
        registry = None
        if self._session is not None and self._backend_stale:
            old, self._session = self._session, None
            registry = old.registry  # pushed files are re-sent to the new backend's first container
            run_sync(old.close(delete_container=self.delete_container_on_exit))
        if self._session is None:
            self._session = Session(
                self._make_backend(),
                session_id=self.session_id,
                memory_limit=self.memory_limit,
                expires_after_minutes=self.expires_after_minutes,
                output_dir=self.output_path,
                download_concurrency=self.download_concurrency,
                registry=registry,
                upload_size_cap=self.upload_size_cap,
                pull_memory_cap=self.pull_memory_cap,
                always_push=self.always_push,
                progress=default_progress,
            )
            self._backend_stale = False
        session = self._session
        # Cheap settings apply to the running session without restarting it.
        session.memory_limit = self.memory_limit
        session.expires_after_minutes = self.expires_after_minutes
        session.output_dir = self.output_path
        session.download_concurrency = max(1, self.download_concurrency)
        session.upload_size_cap = self.upload_size_cap
        session.pull_memory_cap = self.pull_memory_cap
        session.always_push = list(self.always_push)
        return session

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
        """Send ``prompt`` (and ``variables`` as files) to the model; show and return the Result."""
        if not prompt.strip():
            raise ConfigurationError(
                "The prompt is empty. Write what you want done below %%ci, for example: "
                "%%ci\\nPlot monthly revenue from sales_df."
            )
        return self._turn(prompt, model=model, new=new, quiet=quiet, display=display, variables=variables)

    def exec(self, code: str, *, quiet: bool = False, display: bool = True) -> Result:
        """Run ``code`` verbatim in the session's container (no model on the local backend)."""
        if not code.strip():
            raise ConfigurationError("There is no code to run: put Python code in the %%ci_exec cell.")
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
        variables: Mapping[str, Any] | None = None,
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
        items = [PushRequest(name, value) for name, value in (variables or {}).items()]
        try:
            result = run_sync(session.run_turn(prompt, options, view, push=items, link_base=Path.cwd()))
        except KeyboardInterrupt:
            raise Interrupted(
                "Interrupted. The kernel, the container, its files and the conversation are intact; "
                "run the cell again when ready."
            ) from None
        self.last_result = result
        self.raise_for_failure(result)
        return result

    # -- variables and files -------------------------------------------------------------------

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
        return self._push_items(items)

    def push_names(
        self,
        names: list[str],
        *,
        namespace: Mapping[str, Any],
        as_name: str | None = None,
        fmt: str | None = None,
        allow_pickle: bool = False,
    ) -> list[transfer.PushOutcome]:
        """``%ci_push``: variables by name, files or folders by path."""
        items = push_items(names, namespace, fmt=fmt, filename=as_name, allow_pickle=allow_pickle)
        outcomes = self._push_items(items)
        for outcome in outcomes:
            what = {
                "unchanged": "unchanged, not sent again",
                "replaced": "replaced the previous version",
            }.get(outcome.status, f"sent ({human_size(outcome.size)})")
            note = f"; {outcome.note}" if outcome.note else ""
            print(f"{outcome.name} -> {outcome.path or outcome.filename}: {what}{note}")
        return outcomes

    def _push_items(self, items: list[PushRequest]) -> list[transfer.PushOutcome]:
        outcomes, notices = self._run(self._get_session().push(items))
        for notice in notices:
            print(notice.text)
        return outcomes

    def pull(self, name: str) -> Any:
        """Download a container file into the output folder and return it as a Python object."""
        return self._pull(name).value

    def _pull(self, name: str) -> transfer.PulledFile:
        session = self._get_session()
        self._existing_container("pull files")
        return self._run(session.pull(name))

    def pull_into(
        self,
        namespace: dict[str, Any],
        *,
        filename: str | None,
        output: str | None = None,
        pull_all: bool = False,
    ) -> Any:
        """``%ci_pull``: bind the decoded file(s) in ``namespace``; returns the object (one file)."""
        if output is not None and not output.isidentifier():
            raise VariableError(f"-o needs a Python identifier, not {output!r}.")
        if pull_all:
            session = self._get_session()
            self._existing_container("pull files")
            pulled = self._run(session.pull_all())
            for item in pulled:
                if item.variable:
                    namespace[item.variable] = item.value
                problem = f" (kept as bytes: {item.error})" if item.error else ""
                print(f"{item.variable} = {item.kind} from {item.name} -> {item.path}{problem}")
            if not pulled:
                print("The model has not made any files yet.")
            return None
        assert filename is not None
        item = self._pull(filename)
        name = output or item.variable
        namespace[name] = item.value
        if item.kind == "image":
            _show(
                {item.mime or "image/png": item.path.read_bytes(), "text/plain": f"{item.name} ({item.path})"}
            )
        print(f"{name} = {item.kind} from {item.name} (saved to {item.path})")
        return item.value

    def files(self) -> list[transfer.FileRow]:
        """The container's files: name, size, source (notebook / model), created."""
        if self._session is None or self._session.container is None:
            return []
        return self._run(self._session.file_rows())

    def show_files(self) -> None:
        rows = self.files()
        if not rows:
            print("The container has no files yet (it is created by the first %%ci or %ci_push).")
            return
        headers, cells = ["name", "size", "source", "created"], [r.cells() for r in rows]
        if any(r.path != f"/mnt/data/{r.name}" for r in rows):
            # OpenAI stores uploads as /mnt/data/<32 hex>-<name>: code run by %%ci_exec needs that path.
            headers.append("path in the container")
            cells = [(*c, r.path) for c, r in zip(cells, rows, strict=True)]
        _show(rows_bundle("Files in /mnt/data", headers, cells))

    def _existing_container(self, doing: str) -> ContainerInfo:
        session = self._session
        if session is None or session.container is None:
            raise ContainerFileError(
                f"There is no container yet, so there is nothing to {doing} from. Run a %%ci cell or "
                "%ci_push first."
            )
        return session.container

    def _make_view(self, *, quiet: bool) -> View:
        from ci_magic.render.live import TurnView

        frontend = self.frontend or detect_frontend()
        return TurnView(frontend, quiet=quiet, max_updates_per_second=self.max_updates_per_second)

    # -- session management --------------------------------------------------------------------

    def reset(self) -> None:
        """Start over: a new container and a fresh conversation on the next turn."""
        if self._session is not None:
            run_sync(self._session.reset())

    def status(self) -> dict[str, Any]:
        """Backend, model, the container as the backend reports it now, its files, usage and turns."""
        info: dict[str, Any] = {"backend": self.backend, "model": self.resolved_model() or "(server default)"}
        session = self._session
        if session is None:
            info.update(container_status="not created yet (created on the first cell)", turns=0)
            return info
        problem = files = None
        container = session.container
        if container is not None:
            try:
                container = self._run(session.refresh_container())
                files = self.files() if container is not None and container.usable else None
            except BackendError as error:
                problem = error.message
        info.update(session.status())
        if problem is not None:
            info["container_status"] = f"unknown, the check failed: {problem}"
        elif session.container is not None and (container is None or not container.usable):
            state = "gone" if container is None else container.status
            info["container_status"] = (
                f"{state}: the next cell starts a new container and re-sends the files you pushed"
            )
            info["expires_at"] = None
        if files is not None:
            info["files"] = files
        return info

    def close(self) -> None:
        """Delete the container (if configured) and close connections."""
        if self._session is None:
            return
        session, self._session = self._session, None
        with contextlib.suppress(CIError, RuntimeError, OSError):
            run_sync(session.close(delete_container=self.delete_container_on_exit))

    def raise_for_failure(self, result: Result) -> None:
        """Turn a failed turn into our one-paragraph error (what arrived stays on screen).

        The error's ``result`` attribute keeps everything the turn produced before it failed.
        """
        error = result.error
        if error is None:
            return
        failure: CIError
        if error.kind == "interrupted":
            failure = Interrupted(error.message)
        elif error.kind == "config":
            failure = ConfigurationError(error.message)
        elif error.kind == "stream":
            failure = StreamError(error.message)
        else:
            failure = BackendError(error.message)
        failure.result = result  # type: ignore[attr-defined]
        raise failure

    def show_status(self) -> None:
        info = self.status()
        rows: list[tuple[str, object]] = [("backend", info["backend"]), ("model", info["model"])]
        rows.append(("container", info.get("container_id") or "none yet"))
        rows.append(("status", info.get("container_status", "")))
        expires = info.get("expires_at")
        if expires:
            rows.append(("expires", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))))
        files = info.get("files")
        if files is not None:
            names = ", ".join(f.name for f in files) or "none"
            rows.append(("files", f"{len(files)}: {names}"))
        usage = info.get("usage")
        if usage is not None:
            rows.append(
                ("tokens", f"{usage.total_tokens} ({usage.input_tokens} in, {usage.output_tokens} out)")
            )
        rows.append(("turns", info.get("turns", 0)))
        rows.append(
            (
                "conversation",
                info.get("previous_response_id") or f"{info.get('history_messages', 0)} messages",
            )
        )
        _show(rows_bundle("ci-magic session", ["", ""], rows))

    def _run(self, coro: Any) -> Any:
        try:
            return run_sync(coro)
        except KeyboardInterrupt:
            raise Interrupted("Interrupted; nothing in the kernel or the container was lost.") from None


def _show(bundle: dict[str, str]) -> None:
    from IPython.display import display

    display(bundle, raw=True)


def _session_id() -> str:
    """The kernel session's id when running in a kernel (stable names for containers), else random."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)  # None in terminal IPython and plain Python
    session = getattr(getattr(kernel, "session", None), "session", None)
    if isinstance(session, str) and session:
        return session.replace("-", "")[:12]
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
