"""The schema card: what the model is told about each notebook file in the container.

A card names the path, the type and shape, the columns with dtypes (truncated for wide frames),
the index, a few sample rows and the one line that loads the file, so the model can write the
analysis straight away instead of spending a step exploring. Cards are bounded in size: they go
with every prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ci_magic.backends.base import size_text
from ci_magic.variables.formats import FileFormat

__all__ = [
    "columns_line",
    "describe_file",
    "format_size",
    "index_line",
    "render_card",
    "sample_lines",
    "truncate",
]

MAX_COLUMNS = 40  # columns listed with their dtypes
SAMPLE_ROWS = 3
SAMPLE_COLUMNS = 8  # columns shown in the sample rows (first and last halves)
CELL_WIDTH = 24
PREVIEW_CHARS = 200


def format_size(n: int | None) -> str:
    """Bytes in binary units, as file managers and OpenAI's "512 MB" limit count them ("?": unknown)."""
    return "?" if n is None else size_text(n)


def render_card(container_path: str, body: list[str], loader: str) -> str:
    """The card for one file: header line, ``load:`` line, then the body lines indented."""
    header, *rest = body
    lines = [f"- {container_path}: {header}", f"  load: {loader}"]
    lines.extend(f"  {line}" if line else "" for line in rest)
    return "\n".join(lines)


def truncate(text: str, width: int = PREVIEW_CHARS) -> str:
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= width else text[: width - 1] + "…"


def columns_line(names: list[Any], dtypes: list[Any]) -> str:
    shown = [
        f"{name} ({dtype})" for name, dtype in zip(names[:MAX_COLUMNS], dtypes[:MAX_COLUMNS], strict=False)
    ]
    more = f", … {len(names) - MAX_COLUMNS} more" if len(names) > MAX_COLUMNS else ""
    return "columns: " + ", ".join(shown) + more


def index_line(index: Any) -> str:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return f"index: RangeIndex {index.start}..{index.stop - 1}" if len(index) else "index: empty"
    names = [n for n in index.names if n is not None]
    label = f" {', '.join(map(str, names))}" if names else ""
    sample = ", ".join(truncate(str(v), CELL_WIDTH) for v in index[:3])
    return f"index{label} ({index.dtype}, {'unique' if index.is_unique else 'not unique'}): {sample}, …"


def sample_lines(frame: Any, total: int | None) -> list[str]:
    """The first rows of a pandas frame; ``total`` is the full row count when known."""
    import pandas as pd

    head = frame.head(SAMPLE_ROWS)
    if head.empty:
        return []
    with pd.option_context("display.width", 200, "display.max_colwidth", CELL_WIDTH):
        text = head.to_string(max_cols=SAMPLE_COLUMNS)
    label = f"sample ({len(head)} of {total:,} rows):" if total is not None else f"first {len(head)} rows:"
    return [label, *("  " + line for line in text.splitlines())]


def describe_file(path: Path, fmt: FileFormat | None) -> tuple[str, list[str]]:
    """Header and lines for a file pushed by path, peeking at tabular files for their columns."""
    ext = fmt.ext if fmt is not None else ""
    header = f"file {path.name}"
    pd = sys.modules.get("pandas")
    # Peek at tabular files cheaply (a few rows, or Parquet metadata) so the model knows the columns.
    if ext in ("csv", "tsv") and pd is not None:
        frame = pd.read_csv(path, nrows=SAMPLE_ROWS, sep="\t" if ext == "tsv" else ",")
        return f"{header} ({fmt.label if fmt else ext}; dtypes inferred from the first rows)", [
            columns_line(list(frame.columns), list(frame.dtypes)),
            *sample_lines(frame, None),
        ]
    if ext == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        return f"{header} (Parquet, {meta.metadata.num_rows:,} rows)", [
            columns_line(schema.names, [str(t) for t in schema.types])
        ]
    if ext in ("xlsx", "xlsm") and pd is not None:
        with pd.ExcelFile(path) as book:
            sheets = book.sheet_names
            frame = pd.read_excel(book, sheet_name=sheets[0], nrows=SAMPLE_ROWS)
        return f"{header} (Excel, sheets: {', '.join(map(str, sheets))})", [
            f"first sheet {sheets[0]!r}: " + columns_line(list(frame.columns), list(frame.dtypes)),
            *sample_lines(frame, None),
        ]
    return header, []
