"""Which notebook names a prompt or a ``%ci_push`` line refers to.

Auto-push rule for prompts: every identifier in the prompt that names a *data-like* object in the
user namespace (DataFrame, Series, ndarray, polars DataFrame, PIL image, matplotlib figure, Path
to an existing file) is pushed. Identifiers inside backticks count too: "`df`" is the usual way to
name a variable in prose, and fenced code in a prompt talks about the same objects. Excluded:
attribute names (``price`` in ``df.price`` is a column, not the variable ``price``), names starting
with ``_`` (IPython's output history ``_``, ``_12``, and private names), and anything that is not
data-like (modules, functions, strings, dicts: those only go with ``-v`` or ``%ci_push``).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ci_magic.errors import VariableError
from ci_magic.variables.codecs import is_data_like
from ci_magic.variables.registry import Origin, PushRequest

__all__ = [
    "MAX_FOLDER_FILES",
    "always_push_items",
    "folder_items",
    "prompt_variables",
    "push_items",
    "resolve_variables",
    "suggest",
]

MAX_FOLDER_FILES = 1000

# An identifier not preceded by a word character or a dot (so attributes are skipped).
_IDENTIFIER = re.compile(r"(?<![\w.])([^\W\d]\w*)")


def prompt_variables(prompt: str, namespace: Mapping[str, Any]) -> list[str]:
    """Names in ``prompt`` (first-mention order, no repeats) that name data-like objects."""
    found: list[str] = []
    for match in _IDENTIFIER.finditer(prompt):
        name = match.group(1)
        if name.startswith("_") or name in found or name not in namespace:
            continue
        if is_data_like(namespace[name]):
            found.append(name)
    return found


def suggest(name: str, namespace: Mapping[str, Any], *, limit: int = 3) -> list[str]:
    """Public names in ``namespace`` that look like ``name`` (typos, case slips)."""
    candidates = [n for n in namespace if isinstance(n, str) and not n.startswith("_")]
    close = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.6)
    folded = [n for n in candidates if n.lower() == name.lower() and n not in close]
    return (folded + close)[:limit]


def _unknown(name: str, namespace: Mapping[str, Any], *, also_files: bool = False) -> VariableError:
    close = suggest(name, namespace)
    hint = f" Did you mean {', '.join(f'`{n}`' for n in close)}?" if close else ""
    files = " or a file path" if also_files else ""
    return VariableError(
        f"There is no variable `{name}` in the notebook{' (nor a file by that name)' if also_files else ''}."
        f"{hint} Check the spelling, run the cell that defines it first, or give a variable name{files}."
    )


def resolve_variables(names: Iterable[str], namespace: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` for ``-v`` names; an unknown name raises ``VariableError`` with suggestions."""
    values: dict[str, Any] = {}
    for name in names:
        if not name.isidentifier():
            raise VariableError(
                f"`{name}` is not a variable name. Give names like `df` or `sales_2024`, separated by commas."
            )
        if name not in namespace:
            raise _unknown(name, namespace)
        values[name] = namespace[name]
    return values


def folder_items(folder: Path, origin: Origin = "path", *, prefix: str | None = None) -> list[PushRequest]:
    """One item per visible file under ``folder`` (recursive), named ``<folder>/<relative path>``.

    Hidden files and folders (``.git``, ``.ipynb_checkpoints``) are skipped; symlinked folders are
    not followed, so a link loop cannot make the list endless.
    """
    base = prefix if prefix is not None else folder.name
    items: list[PushRequest] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(f for f in files if not f.startswith(".")):
            path = Path(root, file)
            if not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            name = f"{base}/{rel}" if base else rel
            items.append(PushRequest(name=name, value=path, origin=origin, filename=name))
            if len(items) > MAX_FOLDER_FILES:
                raise VariableError(
                    f"{folder} holds more than {MAX_FOLDER_FILES} files. Push a smaller folder, or zip it "
                    "and push the archive."
                )
    return items


def push_items(
    args: Iterable[str],
    namespace: Mapping[str, Any],
    *,
    fmt: str | None = None,
    filename: str | None = None,
    allow_pickle: bool = False,
    cwd: Path | None = None,
) -> list[PushRequest]:
    """Items for ``%ci_push ARG [ARG ...]``: each a variable name, a file path or a folder path."""
    args = [a for a in args if a]
    if not args:
        raise VariableError(
            "Nothing to push. Name one or more variables or files, e.g. `%ci_push df sales.xlsx`."
        )
    if filename is not None and len(args) > 1:
        raise VariableError(
            f"--as names one file, but {len(args)} things were given. Push them one at a time."
        )
    items: list[PushRequest] = []
    for arg in args:
        if arg.isidentifier() and arg in namespace:
            items.append(PushRequest(arg, namespace[arg], "variable", fmt, filename, allow_pickle))
            continue
        path = Path(arg).expanduser()
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        if path.is_file():
            items.append(PushRequest(filename or path.name, path, "path", fmt, filename, allow_pickle))
        elif path.is_dir():
            if fmt is not None or filename is not None:
                raise VariableError(f"{arg} is a folder: its files are sent as is, without --as or --format.")
            items.extend(folder_items(path))
        elif arg.isidentifier():
            raise _unknown(arg, namespace, also_files=True)
        else:
            raise VariableError(
                f"{arg!r} is neither a variable in the notebook nor an existing file or folder "
                f"(looked in {path.parent}). Check the name or the path."
            )
    return items


def always_push_items(paths: Iterable[str | Path], *, cwd: Path | None = None) -> list[PushRequest]:
    """Items for ``CodeInterpreter.always_push``: files and folders sent to every new container."""
    items: list[PushRequest] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        if path.is_dir():
            items.extend(folder_items(path, "always_push"))
        elif path.is_file():
            items.append(PushRequest(path.name, path, "always_push", filename=path.name))
        else:
            raise VariableError(
                f"CodeInterpreter.always_push lists {str(entry)!r}, which is not an existing file or folder. "
                "Fix the path or remove it (`%config CodeInterpreter.always_push = [...]`)."
            )
    return items
