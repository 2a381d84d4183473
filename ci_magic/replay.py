"""Reproducing a session without the model: ``%ci_replay`` and ``%ci_export``.

``%ci_replay`` re-runs recorded code (the last turn, a bound Result, or a cell of a saved notebook
from its provenance) in the current container, the way ``%%ci_exec`` runs code: directly on the
local and gateway backends, through one forced code_interpreter run on OpenAI (the only way
OpenAI runs code; the model is asked to copy it, not to write any, and the copy is checked).
Calls that failed are not re-run. The plan is built here; the run is a turn of the session
(``kind="replay"``), so it is rendered, recorded and costed like any other.

``%ci_export PATH.py`` (or ``.ipynb``) writes the code the session ran, in order, as a plain script:
the pushed inputs are written beside it, every ``/mnt/data`` path points at that folder, failed
calls are kept as comments, and nothing of the model or of ci-magic is needed to run it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ci_magic.errors import BackendError, ConfigurationError, ContainerFileError
from ci_magic.filenames import safe_relative_name
from ci_magic.provenance import cell_provenance, read_notebook
from ci_magic.result import Result
from ci_magic.transcript import Transcript, TurnEntry, TurnKind
from ci_magic.variables.registry import PushRegistry

__all__ = [
    "ExportOutcome",
    "ReplayPlan",
    "confirm_replayed",
    "export_session",
    "plain_python",
    "plan_from_entry",
    "plan_from_notebook",
    "plan_from_records",
    "plan_from_result",
    "ran_as_recorded",
    "rewrite_data_paths",
    "this_notebook",
    "with_current_uploads",
]

DATA_ROOT = "/mnt/data"
EXPORTED_KINDS: tuple[TurnKind, ...] = (
    "ci",
    "exec",
    "replay",
)  # restores re-create state the script builds by itself
_DATA_PATH = re.compile(r"/mnt/data(?![\w.-])(/?)")
_IPYTHON_LINE = re.compile(r"^\s*[!%]")  # shell escapes and magics: not plain Python


@dataclass(frozen=True)
class ReplayPlan:
    """What ``%ci_replay`` re-runs: the code of the calls that succeeded, in order."""

    source: str  # "the last turn", "the Result in r", "cell In [3] of analysis.ipynb"
    blocks: list[str]
    skipped: int = 0  # calls that failed when recorded: not re-run

    @property
    def code(self) -> str:
        return "\n\n".join(block.rstrip("\n") for block in self.blocks)

    def with_current_uploads(self, registry: PushRegistry) -> ReplayPlan:
        """The plan with OpenAI upload paths (``/mnt/data/<32 hex>-df.parquet``: a new random prefix in
        each container) pointing at where the same pushed file is now."""
        blocks = [with_current_uploads(block, registry) for block in self.blocks]
        return ReplayPlan(self.source, blocks, self.skipped)

    def line(self) -> str:
        """The one line shown before the replay runs."""
        count = f"{len(self.blocks)} code block{'s' if len(self.blocks) != 1 else ''}"
        failed = f"; {self.skipped} that failed left out" if self.skipped else ""
        return f"Re-running {count} of {self.source} in the current container, without the model{failed}."


def with_current_uploads(code: str, registry: PushRegistry) -> str:
    """``code`` with every OpenAI upload path of a pushed file (``/mnt/data/<32 hex>-df.parquet``, a new
    random prefix in each container) replaced by the file's path now."""
    for entry in registry:
        if entry.container_id is None:
            continue
        stale = re.compile(
            re.escape(DATA_ROOT + "/") + r"[0-9a-f]{32}-" + re.escape(entry.filename) + r"(?![\w.-])"
        )
        code = stale.sub(entry.path.replace("\\", "\\\\"), code)  # the path as is, not a template
    return code


def _plan(source: str, calls: Iterable[tuple[str, bool]]) -> ReplayPlan:
    blocks: list[str] = []
    skipped = 0
    for code, ok in calls:
        if not code.strip():
            continue
        if ok:
            blocks.append(code)
        else:
            skipped += 1
    if not blocks:
        raise ConfigurationError(
            f"There is no code to re-run in {source}: "
            + ("every call in it failed." if skipped else "no code ran in it.")
            + " Pick another turn: %ci_replay NAME (a Result bound with -o NAME) or %ci_replay --cell N."
        )
    return ReplayPlan(source, blocks, skipped)


def plan_from_entry(entry: TurnEntry | None) -> ReplayPlan:
    """The last turn of the session's transcript."""
    if entry is None:
        raise ConfigurationError(
            "There is no earlier turn to re-run in this session: run a %%ci or %%ci_exec cell first, "
            "or re-run a cell of a saved notebook with %ci_replay --cell N."
        )
    return _plan("the last turn", ((c.code, c.ok) for c in entry.calls))


def plan_from_result(result: Result, name: str) -> ReplayPlan:
    """A bound Result: its recorded provenance when it has one, else its calls as they ended."""
    if result.provenance is not None:
        return plan_from_records([result.provenance], f"the Result in {name}")
    return _plan(
        f"the Result in {name}",
        ((c.code, c.status == "completed" and c.error is None) for c in result.calls),
    )


def plan_from_records(records: Sequence[Mapping[str, Any]], source: str) -> ReplayPlan:
    calls = [
        (str(call.get("code") or ""), bool(call.get("ok")))
        for record in records
        for call in record.get("calls") or []
        if isinstance(call, Mapping)
    ]
    return _plan(source, calls)


def plan_from_notebook(path: Path, execution_count: int) -> ReplayPlan:
    """The cell ``In [execution_count]`` of the saved notebook at ``path``, from its provenance."""
    try:
        notebook = read_notebook(path)
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"Could not read the saved notebook {path} ({error}). Save the notebook first, or name "
            "another with %ci_replay --cell N --notebook PATH.ipynb."
        ) from error
    records = cell_provenance(notebook, execution_count)
    if not records:
        raise ConfigurationError(
            f"Cell In [{execution_count}] of {path.name} carries no ci-magic record: it is not a %%ci or "
            "%%ci_exec cell, or its outputs were not saved (save the notebook after running it). The "
            "number is the one in brackets left of the cell."
        )
    return plan_from_records(records, f"cell In [{execution_count}] of {path.name}")


def ran_as_recorded(plan: ReplayPlan, result: Result) -> bool:
    """Every recorded block is in the code that ran (whitespace at line ends aside): on OpenAI the
    model copies the code, and a replay that changed it is not a replay."""
    ran = _squeeze(result.code)
    return all(_squeeze(block) in ran for block in plan.blocks)


def confirm_replayed(plan: ReplayPlan, result: Result) -> Result:
    """``result`` when its run was ``plan``'s code as recorded; else a ``BackendError`` carrying it."""
    if not ran_as_recorded(plan, result):
        error = BackendError(
            "The replay did not run the recorded code as written (the model changed it while "
            "copying it), so its outputs are not a reproduction. Run %ci_replay again."
        )
        error.result, result.error = result, error
        raise error
    return result


def _squeeze(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


# -- export ------------------------------------------------------------------------------------------


@dataclass
class ExportOutcome:
    path: Path
    blocks: int = 0
    failed: int = 0
    inputs: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # pushed inputs whose bytes are no longer here

    def line(self) -> str:
        parts = [f"Exported {self.blocks} code block{'s' if self.blocks != 1 else ''} to {self.path}"]
        if self.failed:
            parts.append(f"{self.failed} failed call{'s' if self.failed != 1 else ''} kept as comments")
        if self.inputs:
            parts.append("inputs beside it: " + ", ".join(p.name for p in self.inputs))
        line = "; ".join(parts) + "."
        if self.missing:
            line += f" Not written (push them again, then export): {', '.join(self.missing)}."
        return line + f" Run it with: cd {self.path.parent} && python {self.path.name}"


def rewrite_data_paths(code: str) -> str:
    """``/mnt/data/x`` -> ``./x`` and ``/mnt/data`` -> ``.``: the script's folder stands for it."""
    return _DATA_PATH.sub(lambda m: "./" if m.group(1) else ".", code)


def plain_python(code: str) -> str:
    """The code with IPython-only lines (``!pip ...``, ``%matplotlib``) kept as comments."""
    return "\n".join(
        f"# (IPython only) {line}" if _IPYTHON_LINE.match(line) else line for line in code.splitlines()
    )


_PREAMBLE = """\
import os

# The code below ran in a code interpreter whose files were in /mnt/data: this folder stands for it.
os.chdir(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MPLBACKEND", "Agg")  # plt.show() draws nothing in a plain script
try:
    display  # the sandbox was a Jupyter kernel; a script prints instead
except NameError:
    display = print
"""


def export_session(
    transcript: Transcript, registry: PushRegistry, path: Path, *, now: datetime | None = None
) -> ExportOutcome:
    """Write the session's code to ``path`` (``.py`` or ``.ipynb``) and its pushed inputs beside it."""
    suffix = path.suffix.lower()
    if suffix not in (".py", ".ipynb"):
        raise ConfigurationError(
            f"%ci_export writes a Python script (.py) or a notebook (.ipynb), not {path.name!r}: "
            "give a path ending in one of them, e.g. %ci_export analysis.py."
        )
    turns = [t for t in transcript if t.kind in EXPORTED_KINDS]
    if not any(c.code.strip() for t in turns for c in t.calls):
        raise ConfigurationError(
            "No code has run in this session yet, so there is nothing to export: run a %%ci or "
            "%%ci_exec cell first."
        )
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    outcome = ExportOutcome(path)
    _write_inputs(registry, folder, outcome)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    cells: list[tuple[str, str]] = []  # (kind, source): "markdown" notes or "code"
    beside = f"; the inputs pushed from the notebook are beside it: {_names(outcome.inputs)}"
    intro = (
        f"Exported by ci-magic's %ci_export on {stamp}: the code a code-interpreter session ran, in "
        "order. It runs with plain Python from this folder (no model, no ci-magic)"
        + (beside if outcome.inputs else "")
        + "."
    )
    cells.append(("markdown", intro))
    cells.append(("code", _PREAMBLE))
    for number, turn in enumerate(turns, start=1):
        cells.append(("markdown", _turn_heading(number, turn)))
        for call in turn.calls:
            if not call.code.strip():
                continue
            code = plain_python(rewrite_data_paths(with_current_uploads(call.code.rstrip("\n"), registry)))
            if call.ok:
                outcome.blocks += 1
                cells.append(("code", code))
            else:
                outcome.failed += 1
                why = f" ({call.error})" if call.error else ""
                commented = "\n".join(f"# {line}" if line else "#" for line in code.splitlines())
                cells.append(("code", f"# This call failed{why}; it is left out:\n{commented}"))
    text = _as_notebook(cells) if suffix == ".ipynb" else _as_script(cells)
    _write_text(path, text)
    return outcome


def _turn_heading(number: int, turn: TurnEntry) -> str:
    when = ""
    if turn.started_at:
        when = datetime.fromtimestamp(turn.started_at, tz=timezone.utc).strftime("%H:%M:%S")
    label = {"ci": "%%ci", "exec": "%%ci_exec", "replay": "%ci_replay"}.get(turn.kind, turn.kind)
    heading = f"Turn {number} ({label}{', ' + when + ' UTC' if when else ''})"
    if turn.kind == "ci" and turn.prompt.strip():
        heading += ": " + turn.prompt.strip()
    return heading


def _as_script(cells: Sequence[tuple[str, str]]) -> str:
    parts: list[str] = []
    for kind, source in cells:
        if kind == "markdown":
            parts.append("\n".join(f"# {line}".rstrip() for line in source.splitlines()))
        else:
            parts.append(source.rstrip("\n"))
    return "\n\n".join(parts) + "\n"


def _as_notebook(cells: Sequence[tuple[str, str]]) -> str:
    preamble = _PREAMBLE.replace("os.chdir(os.path.dirname(os.path.abspath(__file__)))\n", "")  # no __file__
    notebook = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": source}
            if kind == "markdown"
            else {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": preamble if source == _PREAMBLE else source,
            }
            for kind, source in cells
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def _write_inputs(registry: PushRegistry, folder: Path, outcome: ExportOutcome) -> None:
    """Each pushed file under the name its path in the container ends with (the code uses that)."""
    for entry in registry:
        source = entry.spool if entry.spool is not None and entry.spool.exists() else entry.source_path
        try:
            name = safe_relative_name(entry.path.rsplit("/", 1)[-1])
        except ContainerFileError:
            outcome.missing.append(entry.name)
            continue
        if source is None or not source.is_file():
            outcome.missing.append(name)
            continue
        target = folder / name
        if target.is_symlink():
            target.unlink()  # never write through a link into somewhere else
        shutil.copyfile(source, target)
        outcome.inputs.append(target)


def _write_text(path: Path, text: str) -> None:
    if path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8")


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths)


def this_notebook(namespace: Mapping[str, Any]) -> Path | None:
    """The saved file of the notebook this kernel runs, as the frontend told the kernel (Jupyter's
    ``__session__``, VS Code's ``__vsc_ipynb_file__``); None when it did not."""
    import os

    for value in (
        namespace.get("__session__"),
        os.environ.get("JPY_SESSION_NAME"),
        namespace.get("__vsc_ipynb_file__"),
    ):
        if isinstance(value, str) and value.strip().endswith(".ipynb"):
            path = Path(value.strip()).expanduser()
            for candidate in (path, Path.cwd() / path.name):
                if candidate.is_file():
                    return candidate
    return None
