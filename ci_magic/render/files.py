"""One mime bundle per saved file: images inline, tables previewed, documents sandboxed, the rest linked.

Every bundle has ``text/plain`` naming the local path, so a terminal (and ``nbconvert --to
script``) reports where the file went. Links are relative to ``link_base`` (the notebook's
folder), which is where JupyterLab, classic Notebook and VS Code resolve them from. A file that
cannot be previewed (missing library, unreadable content) falls back to the link: showing
results never fails because of one odd file.
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ci_magic.render.safe_html import IFRAME_MAX_BYTES, sandboxed_iframe
from ci_magic.render.tables import rows_bundle
from ci_magic.result import SavedFile

__all__ = ["file_bundle", "human_size", "link_bundle", "relative_path"]

PREVIEW_ROWS = 10
PREVIEW_COLUMNS = 20
CELL_CHARS = 40
IMAGE_MAX_BYTES = 10_000_000
JSON_MAX_BYTES = 1_000_000
JSON_PREVIEW_CHARS = 4_000
CSV_COUNT_MAX_BYTES = 64_000_000

_IMAGE_MIMES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
_TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".xlsx", ".parquet", ".feather"})
_DOCUMENT_SUFFIXES = frozenset({".html", ".htm", ".svg"})


def human_size(size: int) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def relative_path(path: Path, link_base: Path | None = None) -> str:
    """``path`` relative to ``link_base`` (default: the current directory), with forward slashes."""
    base = (link_base or Path.cwd()).resolve()
    try:
        return Path(os.path.relpath(path.resolve(), base)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.resolve().as_posix()


def link_bundle(saved: SavedFile, *, link_base: Path | None = None, note: str = "") -> dict[str, object]:
    """Just the link: name, size and local path (``note`` in brackets after it)."""
    return _Link(saved, relative_path(saved.path, link_base)).bundle(note)


def file_bundle(saved: SavedFile, *, link_base: Path | None = None) -> dict[str, object]:
    """The mime bundle that shows ``saved`` (``text/html`` + ``text/plain``, or an image type)."""
    link = _Link(saved, relative_path(saved.path, link_base))
    suffix = saved.suffix
    if not saved.path.is_file():
        return link.bundle("missing: it was moved or deleted after saving")
    try:
        if suffix in _IMAGE_MIMES:
            return _image_bundle(saved, link, _IMAGE_MIMES[suffix])
        if suffix in _TABLE_SUFFIXES:
            return _table_bundle(saved, link)
        if suffix in _DOCUMENT_SUFFIXES:
            return _document_bundle(saved, link)
        if suffix == ".json":
            return _json_bundle(saved, link)
    except Exception as error:  # a preview is optional: the link always works
        return link.bundle(f"no preview: {type(error).__name__}: {error}")
    return link.bundle()


@dataclass(frozen=True)
class _Link:
    saved: SavedFile
    relative: str  # the local copy, from the notebook's folder

    @property
    def html(self) -> str:
        name = html.escape(self.saved.name)
        return (
            f'<a href="{html.escape(quote(self.relative))}" target="_blank" rel="noopener">{name}</a> '
            f"<small>({human_size(self.saved.size)})</small>"
        )

    @property
    def plain(self) -> str:
        return f"{self.saved.name} ({human_size(self.saved.size)}): {self.relative}"

    def bundle(self, note: str = "") -> dict[str, object]:
        suffix = f" <small>{html.escape(note)}</small>" if note else ""
        return {
            "text/html": f"<div>file {self.html}{suffix}</div>",
            "text/plain": f"file {self.plain}" + (f" [{note}]" if note else ""),
        }


def _image_bundle(saved: SavedFile, link: _Link, mime: str) -> dict[str, object]:
    if saved.size > IMAGE_MAX_BYTES:
        return link.bundle(f"too large to show inline ({human_size(saved.size)})")
    data = saved.path.read_bytes()
    # No text/html here: frontends prefer it over image/png, and a data-URL copy would store the
    # image twice in the notebook.
    return {mime: base64.b64encode(data).decode("ascii"), "text/plain": f"image {link.plain}"}


def _document_bundle(saved: SavedFile, link: _Link) -> dict[str, object]:
    if saved.size > IFRAME_MAX_BYTES:
        return link.bundle(f"too large to preview ({human_size(saved.size)}); open the file")
    if saved.suffix == ".svg":
        # An SVG loaded as an image runs in the browser's static mode (no scripts, no loads) and
        # sizes itself, unlike a fixed-height frame.
        data = base64.b64encode(saved.path.read_bytes()).decode("ascii")
        alt = html.escape(saved.name)
        image = f'<div><img src="data:image/svg+xml;base64,{data}" style="max-width:100%" alt="{alt}"></div>'
        note = "<small>(SVG shown as an image: scripts disabled)</small>"
        return {
            "text/html": f"<div>{link.html} {note}{image}</div>",
            "text/plain": f"image {link.plain}",
        }
    document = saved.path.read_text(encoding="utf-8", errors="replace")
    frame = sandboxed_iframe(document, title=saved.name)
    return {
        "text/html": f"<div>{link.html} <small>(preview: scripts disabled)</small>{frame}</div>",
        "text/plain": f"document {link.plain}",
    }


def _json_bundle(saved: SavedFile, link: _Link) -> dict[str, object]:
    if saved.size > JSON_MAX_BYTES:
        return link.bundle(f"JSON, too large to preview ({human_size(saved.size)})")
    value = json.loads(saved.path.read_text(encoding="utf-8", errors="replace"))
    pretty = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    cut = len(pretty) > JSON_PREVIEW_CHARS
    shown = pretty[:JSON_PREVIEW_CHARS] + ("\n…" if cut else "")
    pre = f"<pre style='max-height:24em;overflow:auto'>{html.escape(shown)}</pre>"
    return {
        "text/html": f"<div>{link.html}{pre}</div>",
        # Plain text names the shape only: a JSON dump is noise in a terminal.
        "text/plain": f"json {link.plain}, {_describe_json(value)}",
    }


def _describe_json(value: object) -> str:
    if isinstance(value, dict):
        return f"an object with {len(value)} key(s)"
    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    return f"a {type(value).__name__}"


# -- tables -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    columns: list[str]
    rows: list[Sequence[object]]
    n_rows: int | None  # None: not counted (file too large)
    n_columns: int
    note: str = ""


def _table_bundle(saved: SavedFile, link: _Link) -> dict[str, object]:
    table = _read_table(saved.path, saved.suffix, saved.size)
    rows_text = f"{table.n_rows:,}" if table.n_rows is not None else "? (not counted: large file)"
    shape = f"{rows_text} rows × {table.n_columns} columns" + (f", {table.note}" if table.note else "")
    shown_columns = table.columns[:PREVIEW_COLUMNS]
    more_columns = len(table.columns) > PREVIEW_COLUMNS
    header = [_cell(c) for c in shown_columns] + (["…"] if more_columns else [])
    rows = [[_cell(v) for v in row[:PREVIEW_COLUMNS]] + (["…"] if more_columns else []) for row in table.rows]
    title = f"{shape}; first {len(rows)} rows" if table.n_rows is None or table.n_rows > len(rows) else shape
    preview = rows_bundle(title, header, rows)
    return {
        "text/html": f"<div>{link.html}{preview['text/html']}</div>",
        "text/plain": f"table {link.plain}\n{preview['text/plain']}",
    }


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _read_table(path: Path, suffix: str, size: int) -> _Table:
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else None, size)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        first = next(parquet.iter_batches(batch_size=PREVIEW_ROWS), None)
        names = parquet.schema_arrow.names
        rows = [list(r.values()) for r in first.to_pylist()] if first is not None else []
        return _Table(names, rows, parquet.metadata.num_rows, len(names))
    if suffix == ".feather":
        import pyarrow.feather as feather

        table = feather.read_table(path, memory_map=True)
        rows = [list(r.values()) for r in table.slice(0, PREVIEW_ROWS).to_pylist()]
        return _Table(table.column_names, rows, table.num_rows, table.num_columns)
    return _read_xlsx(path)


def _read_delimited(path: Path, delimiter: str | None, size: int) -> _Table:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        if delimiter is None:
            sample = handle.read(16_384)
            handle.seek(0)
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(handle, delimiter=delimiter)
        columns = next(reader, [])
        rows = list(itertools.islice(reader, PREVIEW_ROWS))
        counted = None
        if size <= CSV_COUNT_MAX_BYTES:
            counted = len(rows) + sum(1 for _ in reader)
    return _Table(columns, rows, counted, len(columns))


def _read_xlsx(path: Path) -> _Table:
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheet = book.active if book.active is not None else book.worksheets[0]
        values: Iterator[tuple[object, ...]] = sheet.iter_rows(values_only=True)
        columns = [_cell(c) for c in next(values, ())]
        rows = [list(r) for r in itertools.islice(values, PREVIEW_ROWS)]
        n_rows = sheet.max_row - 1 if sheet.max_row else None
        n_columns = sheet.max_column or len(columns)
        sheets = len(book.sheetnames)
        note = f"sheet {sheet.title!r}" + (f" (1 of {sheets})" if sheets > 1 else "")
        return _Table(columns, rows, n_rows, n_columns, note)
    finally:
        book.close()
