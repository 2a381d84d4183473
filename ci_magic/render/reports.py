"""How the data ``CodeInterpreter`` returns looks in a notebook: status, file list, push and pull lines.

Each function turns data into a mime bundle or a few lines of text; the magics show them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ci_magic.costs import dollars
from ci_magic.render.tables import rows_bundle

if TYPE_CHECKING:
    from ci_magic.events import Notice
    from ci_magic.interpreter import Status
    from ci_magic.variables.transfer import FileRow, PulledFile, PushOutcome

__all__ = ["files_bundle", "pull_line", "push_lines", "status_bundle"]

NO_FILES = "The container has no files yet (it is created by the first %%ci or %ci_push)."


def status_bundle(status: Status) -> dict[str, str]:
    rows: list[tuple[str, object]] = [
        ("backend", status.backend),
        ("model", status.model),
        ("container", status.container_id or "none yet"),
        ("status", status.container_status),
    ]
    if status.expires_at:
        rows.append(("expires", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.expires_at))))
    if status.files is not None:
        names = ", ".join(f.name for f in status.files) or "none"
        rows.append(("files", f"{len(status.files)}: {names}"))
    usage = status.usage
    if usage.total_tokens:
        rows.append(("tokens", f"{usage.total_tokens} ({usage.input_tokens} in, {usage.output_tokens} out)"))
    costs = status.costs
    if costs is not None:
        unpriced = f" (+ {costs.unpriced_turns} turn(s) of unknown price)" if costs.unpriced_turns else ""
        rows.append(
            (
                "cost",
                f"~{dollars(costs.total)}: {dollars(costs.tokens)} tokens, {dollars(costs.container)} "
                f"container{unpriced}",
            )
        )
        rows.append(("time", f"model {costs.model_seconds:.1f} s, code {costs.code_seconds:.1f} s"))
    rows.append(("turns", status.turns))
    rows.append(("conversation", status.conversation))
    return rows_bundle("ci-magic session", ["", ""], rows)


def files_bundle(rows: list[FileRow]) -> dict[str, str] | None:
    """The ``%ci_files`` table (None: no files)."""
    if not rows:
        return None
    headers, cells = ["name", "size", "source", "created"], [list(r.cells()) for r in rows]
    if any(r.path != f"/mnt/data/{r.name}" for r in rows):
        # OpenAI stores uploads as /mnt/data/<32 hex>-<name>: code run by %%ci_exec needs that path.
        headers.append("path in the container")
        for cell, row in zip(cells, rows, strict=True):
            cell.append(row.path)
    return rows_bundle("Files in /mnt/data", headers, [tuple(c) for c in cells])


def push_lines(outcomes: list[PushOutcome], notices: list[Notice]) -> list[str]:
    """One line per variable or file sent (or not sent again), after any notice."""
    return [notice.text for notice in notices] + [outcome.line for outcome in outcomes]


def pull_line(name: str, item: PulledFile) -> str:
    problem = f" (kept as bytes: {item.error})" if item.error else ""
    return f"{name} = {item.kind} from {item.name} (saved to {item.path}){problem}"
