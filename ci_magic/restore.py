"""State restore: re-running, in a replacement container, the code that built the old one's state.

When a container is replaced (it expired, was deleted, or its kernel's memory went with a kernel
restart), files come back by re-upload, but variables do not. With
``CodeInterpreter.restore_on_expiry = "replay"`` the session re-runs the code that ran successfully
in the old container (from the :mod:`~ci_magic.transcript`), verbatim and in order, before the
turn. Locally and on a gateway the code runs directly, one block per call, with no model; on
OpenAI there is no way to run code without the model, so the blocks go in a few forced
code_interpreter requests, several blocks per request.

It is skipped, with a one-line note, when the recorded code took longer than
``restore_time_limit`` or wrote outside ``/mnt/data`` (a re-run would write there again, and what
it wrote is not part of what the session can bring back).
"""

from __future__ import annotations

import ast
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ci_magic import events
from ci_magic.backends.base import Backend, Conversation, TurnRequest
from ci_magic.errors import CIError
from ci_magic.transcript import CallEntry, CallTimer

__all__ = [
    "BATCH_BLOCKS",
    "BATCH_CHARS",
    "RestoreOutcome",
    "RestorePlan",
    "defined_names",
    "plan_restore",
    "run_restore",
    "summary_line",
    "writes_outside_data",
]

BATCH_BLOCKS = 12  # code blocks per OpenAI request at most
BATCH_CHARS = 16_000  # characters of code per OpenAI request at most (the model copies them out)
DATA_ROOT = "/mnt/data"

# Calls whose first argument (or path-like keyword) is a path they write to.
_WRITERS = {
    "to_csv", "to_parquet", "to_excel", "to_json", "to_pickle", "to_feather", "to_hdf", "to_html",
    "to_stata", "to_latex", "to_markdown", "to_xml", "to_orc", "to_netcdf", "to_file",
    "savefig", "save", "savez", "savez_compressed", "savetxt", "imsave", "imwrite", "dump_model",
    "write_text", "write_bytes", "mkdir", "makedirs", "touch", "mkdtemp", "mkstemp",
    "copy", "copy2", "copyfile", "copytree", "move", "rename", "replace", "symlink", "link",
    "urlretrieve", "write_image", "write_html", "to_zarr", "ZipFile", "TarFile", "open_tarfile",
}  # fmt: skip
_PATH_KEYWORDS = ("path", "path_or_buf", "fname", "file", "filename", "dst", "dest", "target")
_SHELL_INSTALL = re.compile(r"\b(pip|conda|apt(-get)?|mamba|uv)\s+install\b")


@dataclass(frozen=True)
class RestorePlan:
    blocks: list[CallEntry]
    skip: str | None = None  # why nothing is re-run (one line), or None to go ahead

    @property
    def recorded_seconds(self) -> float:
        return sum(b.seconds or 0.0 for b in self.blocks)


@dataclass
class RestoreOutcome:
    ran: list[CallEntry] = field(
        default_factory=list
    )  # re-run successfully, as recorded in the new container
    failed: CallEntry | None = None  # the block that raised (the restore stopped there)
    seconds: float = 0.0
    requests: int = 0  # model requests made (OpenAI); 0 when code ran directly
    problem: str | None = None  # an infrastructure failure that stopped it


def plan_restore(blocks: Sequence[CallEntry], *, time_limit: float) -> RestorePlan:
    """What to re-run: every block, or none with the reason."""
    blocks = list(blocks)
    recorded = sum(b.seconds or 0.0 for b in blocks)
    if recorded > time_limit:
        return RestorePlan(
            blocks,
            f"In-memory state was not restored: the earlier code took {recorded:.1f} s to run, over "
            f"restore_time_limit ({time_limit:g} s). Re-run what you need, or raise "
            "%config CodeInterpreter.restore_time_limit.",
        )
    for number, block in enumerate(blocks, start=1):
        where = writes_outside_data(block.code)
        if where is not None:
            return RestorePlan(
                blocks,
                f"In-memory state was not restored: earlier code (block {number}) wrote outside "
                f"/mnt/data ({where}), which a re-run would repeat. Re-run what you need yourself.",
            )
    return RestorePlan(blocks)


def writes_outside_data(code: str) -> str | None:
    """Where ``code`` visibly writes outside /mnt/data (a literal path, or a package install), or None.

    Static and literal-only: a path built at run time is not seen. Code that does not parse is not
    judged here (the re-run reports its error).
    """
    if _SHELL_INSTALL.search(code):
        return "it installs packages"
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        if name == "open" or name == "Path.open":
            path = _literal(node.args[0]) if node.args else _keyword(node, "file")
            mode = _literal(node.args[1]) if len(node.args) > 1 else _keyword(node, "mode")
            if path is not None and mode is not None and set(mode) & set("wax+") and _outside(path):
                return path
            continue
        if name.rsplit(".", 1)[-1] not in _WRITERS:
            continue
        candidates = [_literal(a) for a in node.args[:2]] + [_keyword(node, k) for k in _PATH_KEYWORDS]
        # Path("/x").write_text(...): the path is the receiver.
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call):
            inner = node.func.value
            if _call_name(inner.func).rsplit(".", 1)[-1] in ("Path", "PurePath", "PosixPath") and inner.args:
                candidates.append(_literal(inner.args[0]))
        for path in candidates:
            if path is not None and _outside(path):
                return path
    return None


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        owner = _call_name(func.value) if isinstance(func.value, (ast.Name, ast.Attribute)) else ""
        return f"{owner}.{func.attr}" if owner else func.attr
    return ""


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _keyword(node: ast.Call, name: str) -> str | None:
    return next((_literal(k.value) for k in node.keywords if k.arg == name), None)


def _outside(path: str) -> bool:
    if path.startswith("~"):
        return True
    if not path.startswith("/"):
        return False  # relative: the working folder is the data folder
    normal = re.sub(r"/+", "/", path)
    return not (normal == DATA_ROOT or normal.startswith(DATA_ROOT + "/")) or "/../" in normal


def defined_names(code: str) -> list[str]:
    """The public names ``code`` binds at top level (assignments, defs, classes), in order."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names: list[str] = []

    def add(target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                add(element)

    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                add(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            add(node.target)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.For, ast.With, ast.AsyncWith)):
            continue  # loop variables and context names are not the state people think of
    return list(dict.fromkeys(n for n in names if not n.startswith("_")))


def summary_line(outcome: RestoreOutcome, *, total: int, files: int) -> str:
    """``re-ran 7 code blocks in 3.2 s; df, model and 2 files are back`` (and what did not)."""
    blocks = "code block" if len(outcome.ran) == 1 else "code blocks"
    ran = f"{len(outcome.ran)} of {total}" if len(outcome.ran) != total else str(total)
    names: list[str] = []
    for block in outcome.ran:
        for name in defined_names(block.code):
            if name not in names:
                names.append(name)
    shown = names[:4] + ([f"{len(names) - 4} more names"] if len(names) > 4 else [])
    if files:
        shown.append(f"{files} file" + ("" if files == 1 else "s"))
    back = ""
    if shown:
        listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
        back = f"; {listed} {'is' if len(shown) == 1 and not files else 'are'} back"
    line = f"State restored in the new container: re-ran {ran} {blocks} in {outcome.seconds:.1f} s{back}."
    if outcome.failed is not None:
        line += f" It stopped at a block that raised {outcome.failed.error or 'an error'}."
    elif outcome.problem:
        line += f" It stopped: {outcome.problem}"
    return line


async def run_restore(
    backend: Backend,
    container_id: str,
    blocks: Sequence[CallEntry],
    *,
    model: str,
    instructions: str,
    extra_headers: dict[str, str] | None = None,
) -> RestoreOutcome:
    """Re-run ``blocks`` in ``container_id``; stops at the first block that raises."""
    outcome = RestoreOutcome()
    started = time.monotonic()
    direct = backend.name != "openai"  # local and gateway run code without a model
    batches = [[b] for b in blocks] if direct else _batches(blocks)
    for batch in batches:
        code = "\n\n".join(b.code.rstrip("\n") for b in batch)
        request = TurnRequest(
            prompt=code,
            container_id=container_id,
            model=model,
            instructions=instructions,
            conversation=Conversation(),  # its own: the restore is not part of the conversation
            exec_code=code,
            extra_headers=dict(extra_headers or {}),
        )
        timer = CallTimer()
        try:
            ok, error, seconds, ran_code = await _run_one(backend.stream(request), timer)
        except CIError as problem:
            outcome.problem = problem.message
            break
        finally:
            outcome.requests += 0 if direct else 1
        if not ok:
            outcome.failed = CallEntry(code=code, ok=False, container_id=container_id, error=error)
            break
        if not direct and not _ran_verbatim(batch, ran_code):
            outcome.problem = "the model did not run the recorded code as written."
            break
        share = seconds / len(batch) if batch else 0.0
        outcome.ran.extend(
            CallEntry(code=b.code, ok=True, container_id=container_id, seconds=share) for b in batch
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def _batches(blocks: Sequence[CallEntry]) -> list[list[CallEntry]]:
    batches: list[list[CallEntry]] = []
    size = 0
    for block in blocks:
        if not batches or len(batches[-1]) >= BATCH_BLOCKS or size + len(block.code) > BATCH_CHARS:
            batches.append([])
            size = 0
        batches[-1].append(block)
        size += len(block.code)
    return batches


async def _run_one(
    stream: AsyncIterator[events.Event], timer: CallTimer
) -> tuple[bool, str | None, float, str]:
    """Drain one restore turn: (every call completed, the first error, execution seconds, code run)."""
    ok, error, code = True, None, []
    calls = 0
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for event in stream:
            timer.observe(event)
            if isinstance(event, events.CallStarted):
                calls += 1
            elif isinstance(event, events.CodeDone):
                code.append(event.code)
            elif isinstance(event, events.ExecutionError) and error is None:
                ok, error = False, f"{event.name}: {event.value}"[:300]
            elif isinstance(event, events.CallStatus) and event.status in ("failed", "incomplete"):
                ok = False
            elif isinstance(event, events.Failed):
                ok, error = False, error or event.message[:300]
    return ok and calls > 0, error, sum(timer.seconds.values()), "\n".join(code)


def _ran_verbatim(batch: Sequence[CallEntry], ran: str) -> bool:
    """The model copied each block into its calls unchanged (whitespace at the ends aside)."""
    squeezed = _squeeze(ran)
    return all(_squeeze(b.code) in squeezed for b in batch)


def _squeeze(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())
