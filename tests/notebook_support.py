"""Running real notebooks (nbclient + ipykernel) against the test servers, and reading their outputs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

__all__ = [
    "answers_of",
    "errors_of",
    "kernel_env",
    "notebook_client",
    "output_text",
    "outputs_of",
    "run_cells",
    "texts_by_mime",
]

REPO = Path(__file__).resolve().parents[1]


def _set_environ(values: Mapping[str, str | None]) -> None:
    """Set each variable; None unsets it."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def kernel_env(**values: str | None) -> Iterator[None]:
    """Environment for kernels started inside the block (they inherit this process's environment)."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def openai_env(base_url: str, **extra: str | None) -> dict[str, str | None]:
    return {
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": base_url,
        "CI_MAGIC_BACKEND": None,
        "AZURE_OPENAI_ENDPOINT": None,
        "AZURE_OPENAI_API_KEY": None,
        "PYTHONPATH": str(REPO),
        **extra,
    }


def local_env(**extra: str | None) -> dict[str, str | None]:
    """The local backend with no key and no model server, ci-magic from this checkout."""
    return {
        "OPENAI_API_KEY": None,
        "AZURE_OPENAI_API_KEY": None,
        "CI_MAGIC_BACKEND": "local",
        "CI_MAGIC_MODEL_BASE_URL": None,
        "PYTHONPATH": str(REPO),
        **extra,
    }


def notebook_client(
    cells: Iterable[str], workdir: Path, *, timeout: int, allow_errors: bool = True
) -> NotebookClient:
    """A Python 3 notebook of ``cells`` (``client.nb``) and the client that runs it in ``workdir``."""
    notebook = new_notebook(cells=[new_code_cell(source) for source in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(workdir)}},
    )


def run_cells(
    cells: Iterable[str],
    workdir: Path,
    *,
    allow_errors: bool = True,
    timeout: int = 120,
    save_as: str | None = None,
    before: Mapping[int, Callable[[nbformat.NotebookNode], None]] | None = None,
) -> nbformat.NotebookNode:
    """Execute ``cells`` in a fresh kernel with ``workdir`` as the notebook folder; returns the notebook.

    ``before[i](notebook)`` runs in this process just before cell ``i`` (e.g. to expire a container).
    """
    client = notebook_client(cells, workdir, timeout=timeout, allow_errors=allow_errors)
    notebook = client.nb
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if before and index in before:
                before[index](notebook)
            client.execute_cell(cell, index)
    if save_as:
        nbformat.write(notebook, workdir / save_as)
    return notebook


def outputs_of(cell: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(cell.get("outputs", []))


def errors_of(cell: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The cell's error outputs (a traceback shown in the notebook)."""
    return [output for output in outputs_of(cell) if output.get("output_type") == "error"]


def texts_by_mime(cell: Mapping[str, Any], mime: str) -> list[str]:
    """Every value of ``mime`` in the cell's display/execute_result outputs (final, updates applied)."""
    found = []
    for output in outputs_of(cell):
        data = output.get("data", {})
        if mime in data:
            value = data[mime]
            found.append(value if isinstance(value, str) else json.dumps(value))
    return found


# The model's answer is Markdown we render to HTML ourselves: a <div> of blocks (paragraphs, lists,
# headings...). Code blocks, file links, tables and the status line open differently.
_ANSWER_HTML = re.compile(r"<div><(p|ul|ol|h[1-6]|blockquote|pre)\b")


def answers_of(cell: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """The displays of the model's answer in a cell: ``{"text/html": ..., "text/plain": ...}`` each."""
    return [
        output["data"]
        for output in outputs_of(cell)
        if set(output.get("data", {})) == {"text/html", "text/plain"}
        and _ANSWER_HTML.match(output["data"]["text/html"])
    ]


def output_text(cell: Mapping[str, Any]) -> str:
    """All human-readable text of a cell: streams, errors, text/plain, text/markdown, text/html."""
    parts: list[str] = []
    for output in outputs_of(cell):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif output.get("output_type") == "error":
            parts.append(
                f"{output.get('ename')}: {output.get('evalue')}\n" + "\n".join(output.get("traceback", []))
            )
        for mime in ("text/plain", "text/markdown", "text/html"):
            value = output.get("data", {}).get(mime)
            if value:
                parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)
