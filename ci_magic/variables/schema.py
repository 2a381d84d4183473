"""The schema card: what the model is told about each notebook file in the container.

A card names the path, the type and shape, the columns with dtypes (truncated for wide frames),
the index, a few sample rows and the one line that loads the file, so the model can write the
analysis straight away instead of spending a step exploring. Cards are bounded in size: they go
with every prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ci_magic.variables.codecs import EncodedValue

__all__ = ["card_body", "format_size", "render_card"]

MAX_COLUMNS = 40  # columns listed with their dtypes
SAMPLE_ROWS = 3
SAMPLE_COLUMNS = 8  # columns shown in the sample rows (first and last halves)
CELL_WIDTH = 24
PREVIEW_CHARS = 200


def format_size(n: int | None) -> str:
    """Bytes in binary units, as file managers and OpenAI's "512 MB" limit count them."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render_card(container_path: str, body: list[str], loader: str) -> str:
    """The card for one file: header line, ``load:`` line, then the body lines indented."""
    header, *rest = body
    lines = [f"- {container_path}: {header}", f"  load: {loader}"]
    lines.extend(f"  {line}" if line else "" for line in rest)
    return "\n".join(lines)


def card_body(value: Any, encoded: EncodedValue) -> list[str]:
    """Header and detail lines for a pushed value (without the path and loader, which vary by container).

    Never raises: a value that cannot be described still gets its type and size.
    """
    size = format_size(encoded.size)
    source = f"notebook variable `{encoded.name}`" if encoded.kind != "file" else "notebook file"
    try:
        header, lines = _DESCRIBERS.get(encoded.kind, _describe_other)(value, encoded)
    except Exception as exc:  # describing is a courtesy: never fail a push over it
        header, lines = type(value).__name__, [f"(could not describe: {type(exc).__name__})"]
    if encoded.note:
        lines.append(f"note: {encoded.note}")
    return [f"{header}, {size} {encoded.fmt or 'file'} (from {source})", *lines]


def _truncate(text: str, width: int = PREVIEW_CHARS) -> str:
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _columns_line(names: list[Any], dtypes: list[Any]) -> str:
    shown = [
        f"{name} ({dtype})" for name, dtype in zip(names[:MAX_COLUMNS], dtypes[:MAX_COLUMNS], strict=False)
    ]
    more = f", … {len(names) - MAX_COLUMNS} more" if len(names) > MAX_COLUMNS else ""
    return "columns: " + ", ".join(shown) + more


def _index_line(index: Any) -> str:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return f"index: RangeIndex {index.start}..{index.stop - 1}" if len(index) else "index: empty"
    names = [n for n in index.names if n is not None]
    label = f" {', '.join(map(str, names))}" if names else ""
    sample = ", ".join(_truncate(str(v), CELL_WIDTH) for v in index[:3])
    return f"index{label} ({index.dtype}, {'unique' if index.is_unique else 'not unique'}): {sample}, …"


def _sample_lines(frame: Any, total: int | None) -> list[str]:
    """The first rows of a pandas frame; ``total`` is the full row count when known."""
    import pandas as pd

    head = frame.head(SAMPLE_ROWS)
    if head.empty:
        return []
    with pd.option_context("display.width", 200, "display.max_colwidth", CELL_WIDTH):
        text = head.to_string(max_cols=SAMPLE_COLUMNS)
    label = f"sample ({len(head)} of {total:,} rows):" if total is not None else f"first {len(head)} rows:"
    return [label, *("  " + line for line in text.splitlines())]


def _describe_frame(frame: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    if encoded.kind == "series":
        name = frame.name if frame.name is not None else encoded.name
        header = f"pandas Series {name!r} ({frame.dtype}), {len(frame):,} values"
        lines = [_index_line(frame.index)]
        frame = frame.to_frame(name=name)
    else:
        rows, cols = frame.shape
        header = f"pandas DataFrame, {rows:,} rows x {cols:,} columns"
        lines = [_columns_line(list(frame.columns), list(frame.dtypes)), _index_line(frame.index)]
    return header, lines + _sample_lines(frame, len(frame))


def _describe_polars(frame: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    rows, cols = frame.shape
    lines = [_columns_line(list(frame.columns), [str(t) for t in frame.dtypes])]
    return f"polars DataFrame (loads as pandas), {rows:,} rows x {cols:,} columns", lines + _sample_lines(
        frame.head(SAMPLE_ROWS).to_pandas(), rows
    )


def _describe_ndarray(arr: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    import numpy as np

    header = f"numpy array {arr.dtype}, shape {arr.shape}"
    if arr.size == 0:
        return header, []
    with np.printoptions(threshold=12, edgeitems=3, linewidth=120, precision=6):
        preview = np.array2string(arr if arr.ndim < 3 else arr[(0,) * (arr.ndim - 2)])
    return header, [f"values: {_truncate(preview)}"]


def _describe_json(value: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    if isinstance(value, dict):
        keys = ", ".join(_truncate(repr(k), CELL_WIDTH) for k in list(value)[:MAX_COLUMNS])
        more = f", … {len(value) - MAX_COLUMNS} more" if len(value) > MAX_COLUMNS else ""
        header, lines = f"JSON object with {len(value):,} keys", [f"keys: {keys}{more}"]
    elif isinstance(value, (list, tuple)):
        header, lines = f"JSON array of {len(value):,} items", []
        if value:
            lines.append(f"first item: {_truncate(json.dumps(value[0], default=str))}")
    else:
        header, lines = f"JSON {type(value).__name__}", []
    if encoded.data is not None and len(encoded.data) <= PREVIEW_CHARS:
        lines.append(f"content: {encoded.data.decode('utf-8')}")
    return header, lines


def _describe_text(value: str, encoded: EncodedValue) -> tuple[str, list[str]]:
    first = next((line for line in value.splitlines() if line.strip()), "")
    return f"text, {len(value):,} characters, {value.count(chr(10)) + 1:,} lines", [
        f"starts: {_truncate(first, 120)!r}"
    ]


def _describe_bytes(value: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    head = bytes(value[:16]).hex(" ")
    return f"bytes, {len(value):,} bytes", [f"first bytes: {head}"] if head else []


def _describe_image(image: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    width, height = image.size
    return f"image {width}x{height} px, mode {image.mode}", []


def _describe_figure(figure: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    lines = [f"titles: {', '.join(titles)}"] if titles else []
    return f"matplotlib figure rendered as {encoded.fmt}, {len(figure.axes)} axes", lines


def _describe_file(path: Path, encoded: EncodedValue) -> tuple[str, list[str]]:
    ext = encoded.fmt
    header = f"file {path.name}"
    pd = sys.modules.get("pandas")
    # Peek at tabular files cheaply (a few rows, or Parquet metadata) so the model knows the columns.
    if ext in ("csv", "tsv") and pd is not None:
        frame = pd.read_csv(path, nrows=SAMPLE_ROWS, sep="\t" if ext == "tsv" else ",")
        return header + " (CSV; dtypes inferred from the first rows)", [
            _columns_line(list(frame.columns), list(frame.dtypes)),
            *_sample_lines(frame, None),
        ]
    if ext == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        return f"{header} (Parquet, {meta.metadata.num_rows:,} rows)", [
            _columns_line(schema.names, [str(t) for t in schema.types])
        ]
    if ext in ("xlsx", "xlsm") and pd is not None:
        with pd.ExcelFile(path) as book:
            sheets = book.sheet_names
            frame = pd.read_excel(book, sheet_name=sheets[0], nrows=SAMPLE_ROWS)
        return f"{header} (Excel, sheets: {', '.join(map(str, sheets))})", [
            f"first sheet {sheets[0]!r}: " + _columns_line(list(frame.columns), list(frame.dtypes)),
            *_sample_lines(frame, None),
        ]
    return header, []


def _describe_other(value: Any, encoded: EncodedValue) -> tuple[str, list[str]]:
    return f"{type(value).__module__}.{type(value).__qualname__} ({encoded.fmt})", []


_DESCRIBERS = {
    "dataframe": _describe_frame,
    "series": _describe_frame,
    "polars": _describe_polars,
    "ndarray": _describe_ndarray,
    "json": _describe_json,
    "text": _describe_text,
    "bytes": _describe_bytes,
    "image": _describe_image,
    "figure": _describe_figure,
    "file": _describe_file,
}
