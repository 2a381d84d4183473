"""One mime bundle per saved file: images inline, tables previewed, documents sandboxed, the rest linked.

Every bundle has ``text/plain`` naming the local path, so a terminal (and ``nbconvert --to
script``) reports where the file went. Links are relative to ``link_base`` (the notebook's
folder), which is where JupyterLab, classic Notebook and VS Code resolve them from. A file that
cannot be previewed (missing library, unreadable content) falls back to the link: showing
results never fails because of one odd file.

Files come from the sandbox, so a preview reads only a first batch, within a byte budget, and
checks what that batch would expand to *before* decoding it, from the file's own metadata: the
Parquet footer (the first row group's uncompressed column sizes), the Arrow IPC footer and message
headers of a Feather file (the decompressed length stored before each compressed buffer), the zip
directory of an .xlsx, an image's header (its pixel count). A file over budget shows one line,
``preview skipped: file expands to ~N GB``, and its link: a 64 KB decompression bomb costs the
kernel nothing.
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ci_magic.render.safe_html import (
    IFRAME_MAX_BYTES,
    IMAGE_MAX_PIXELS,
    image_pixels,
    sandboxed_iframe,
    svg_image_html,
)
from ci_magic.render.tables import rows_bundle
from ci_magic.result import SavedFile
from ci_magic.variables.formats import FileFormat, format_of

__all__ = ["file_bundle", "human_size", "link_bundle", "relative_path"]

PREVIEW_ROWS = 10
PREVIEW_COLUMNS = 20
CELL_CHARS = 40
IMAGE_MAX_BYTES = 10_000_000
JSON_MAX_BYTES = 1_000_000
JSON_PREVIEW_CHARS = 4_000
CSV_COUNT_MAX_BYTES = 64_000_000
CSV_LINE_MAX_CHARS = 1_000_000
# The most a preview may decompress at once (a Feather file's first record batch and its
# dictionaries, an .xlsx's parts): a file whose first batch expands to more is not read at all.
PREVIEW_EXPANDED_MAX = 64 * 1024 * 1024
# Parquet decompresses page by page (pages are ~1 MB from ordinary writers), so the first row
# group's uncompressed size is an upper bound on the cost, allowed to be larger: a million rows of
# sixteen float columns still preview.
PARQUET_ROW_GROUP_MAX = 128 * 1024 * 1024
# Footers and message headers are read whole; real ones are kilobytes.
METADATA_MAX_BYTES = 16 * 1024 * 1024


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
    fmt = format_of(saved.path.name)  # the table of formats says how (and whether) to preview it
    if not saved.path.is_file():
        return link.bundle("missing: it was moved or deleted after saving")
    try:
        if fmt is None or fmt.preview is None:
            return link.bundle()
        if fmt.preview == "image":
            return _image_bundle(saved, link, fmt.mime or "image/png")
        if fmt.preview == "table":
            return _table_bundle(saved, link, fmt)
        if fmt.preview == "document":
            return _document_bundle(saved, link, fmt)
        if fmt.preview == "json":
            return _json_bundle(saved, link)
    except OverBudget as skipped:
        return link.bundle(str(skipped))
    except Exception as error:  # a preview is optional: the link always works
        return link.bundle(f"no preview: {type(error).__name__}: {error}")
    return link.bundle()


class OverBudget(Exception):
    """A file whose preview would decode more than the budget; the message is the one line shown."""

    @classmethod
    def expands_to(cls, size: int) -> OverBudget:
        return cls(f"preview skipped: file expands to ~{human_size(size)}")


def _read_at_most(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it holds more than ``limit`` (never reads past limit + 1)."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    return None if len(data) > limit else data


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
    data = _read_at_most(saved.path, IMAGE_MAX_BYTES)
    if data is None:
        return link.bundle(f"too large to show inline ({human_size(saved.size)})")
    _check_image_pixels(data)
    # No text/html here: frontends prefer it over image/png, and a data-URL copy would store the
    # image twice in the notebook.
    return {mime: base64.b64encode(data).decode("ascii"), "text/plain": f"image {link.plain}"}


def _check_image_pixels(data: bytes) -> None:
    """Refuse a decompression bomb from its header: a small file the browser would inflate to GBs."""
    pixels = image_pixels(data)
    if pixels is not None and pixels > IMAGE_MAX_PIXELS:
        raise OverBudget(f"preview skipped: the image declares {pixels:,} pixels (~{human_size(pixels * 4)})")


def _document_bundle(saved: SavedFile, link: _Link, fmt: FileFormat) -> dict[str, object]:
    data = _read_at_most(saved.path, IFRAME_MAX_BYTES)
    if data is None:
        return link.bundle(f"too large to preview ({human_size(saved.size)}); open the file")
    if fmt.mime == "image/svg+xml":
        # An SVG loaded as an image runs in the browser's static mode (no scripts, no loads) and
        # sizes itself, unlike a fixed-height frame.
        image = f"<div>{svg_image_html(data, alt=saved.name)}</div>"
        note = "<small>(SVG shown as an image: scripts disabled)</small>"
        return {
            "text/html": f"<div>{link.html} {note}{image}</div>",
            "text/plain": f"image {link.plain}",
        }
    frame = sandboxed_iframe(data.decode("utf-8", errors="replace"), title=saved.name)
    return {
        "text/html": f"<div>{link.html} <small>(preview: scripts disabled)</small>{frame}</div>",
        "text/plain": f"document {link.plain}",
    }


def _json_bundle(saved: SavedFile, link: _Link) -> dict[str, object]:
    data = _read_at_most(saved.path, JSON_MAX_BYTES)
    if data is None:
        return link.bundle(f"JSON, too large to preview ({human_size(saved.size)})")
    value = json.loads(data.decode("utf-8", errors="replace"))
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
    rows: Sequence[Sequence[object]]
    n_rows: int | None  # None: not counted (file too large)
    n_columns: int
    note: str = ""


def _table_bundle(saved: SavedFile, link: _Link, fmt: FileFormat) -> dict[str, object]:
    table = _read_table(saved.path, fmt.ext)
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


def _read_table(path: Path, ext: str) -> _Table:
    """A first batch of the table, by the format's canonical extension (a row of the formats table)."""
    if ext in ("csv", "tsv"):
        return _read_delimited(path, "\t" if ext == "tsv" else None)
    if ext == "parquet":
        return _read_parquet(path)
    if ext == "feather":
        return _read_feather(path)
    return _read_xlsx(path)


def _footer_length(path: Path, magic: bytes, length_format: str) -> int:
    """The footer length a columnar file states in its last bytes, refused when implausibly large."""
    tail = struct.calcsize(length_format) + len(magic)
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(0, size - tail))
        end = handle.read(tail)
    if len(end) < tail or not end.endswith(magic):
        raise ValueError(f"not a {magic.decode(errors='replace').strip(chr(0))} file (no magic at its end)")
    (length,) = struct.unpack(length_format, end[: -len(magic)])
    if not 0 < length <= min(METADATA_MAX_BYTES, size):
        raise OverBudget(f"preview skipped: its footer claims {human_size(max(length, 0))}")
    return int(length)


def _read_parquet(path: Path) -> _Table:
    import pyarrow.parquet as pq

    _footer_length(path, b"PAR1", "<i")
    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    names = parquet.schema_arrow.names
    shown = set(names[:PREVIEW_COLUMNS])
    if metadata.num_row_groups:
        # Pages are decompressed whole: the first batch of a column costs its first row group's
        # uncompressed size, whatever the batch size (one 1 GB page of zeros is 50 KB of zstd).
        first = metadata.row_group(0)
        cost = sum(
            first.column(i).total_uncompressed_size
            for i in range(first.num_columns)
            if metadata.schema.column(i).path.split(".")[0] in shown
        )
        if cost > PARQUET_ROW_GROUP_MAX:
            total = sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
            raise OverBudget.expands_to(max(cost, total))
    columns = [name for name in names if name in shown]
    batch = next(parquet.iter_batches(batch_size=PREVIEW_ROWS, columns=columns), None)
    rows = [list(r.values()) for r in batch.to_pylist()] if batch is not None else []
    return _Table(names, rows, metadata.num_rows, len(names))


def _read_feather(path: Path) -> _Table:
    import pyarrow as pa

    layout = _ArrowFileLayout.read(path)
    cost = layout.decompressed_size()
    if cost > PREVIEW_EXPANDED_MAX:
        raise OverBudget.expands_to(cost)
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        names = reader.schema.names
        first = reader.get_batch(0) if reader.num_record_batches else None
        rows = (
            [list(r.values()) for r in first.slice(0, PREVIEW_ROWS).to_pylist()] if first is not None else []
        )
    return _Table(names, rows, layout.rows(), len(names))


class _ArrowFileLayout:
    """What an Arrow IPC (Feather v2) file will cost to read, from its footer and message headers only.

    The footer lists the dictionary and record batch blocks; each message header lists its body's
    buffers; a compressed buffer starts with its decompressed length (an int64). Reading the
    first batch decompresses every dictionary and that batch, so that is the cost counted.
    Uncompressed buffers are memory-mapped, not copied. Flatbuffers are walked by hand: pyarrow
    offers no way to read these headers without decoding the bodies.
    """

    _MAGIC = b"ARROW1"
    _DICTIONARY_BATCH, _RECORD_BATCH = 2, 3
    MAX_BATCHES_COUNTED = 10_000

    def __init__(
        self, path: Path, dictionaries: list[tuple[int, int]], batches: list[tuple[int, int]]
    ) -> None:
        self.path = path
        self.dictionaries = dictionaries  # (offset, metadata length) of each block
        self.batches = batches

    @classmethod
    def read(cls, path: Path) -> _ArrowFileLayout:
        length = _footer_length(path, cls._MAGIC, "<i")
        with path.open("rb") as handle:
            handle.seek(path.stat().st_size - len(cls._MAGIC) - 4 - length)
            footer = handle.read(length)
        root = _u32(footer, 0)
        return cls(path, _blocks(footer, _field(footer, root, 2)), _blocks(footer, _field(footer, root, 3)))

    def decompressed_size(self) -> int:
        with self.path.open("rb") as handle:
            return sum(self._batch_cost(handle, block) for block in [*self.dictionaries, *self.batches[:1]])

    def rows(self) -> int | None:
        if len(self.batches) > self.MAX_BATCHES_COUNTED:
            return None
        with self.path.open("rb") as handle:
            return sum(self._batch_rows(handle, block) for block in self.batches)

    def _record_batch(self, handle: Any, block: tuple[int, int]) -> tuple[bytes, int, int]:
        """The message's flatbuffer, the RecordBatch table's position in it, and the body's offset."""
        offset, metadata_length = block
        if not 8 <= metadata_length <= METADATA_MAX_BYTES:
            raise OverBudget(f"preview skipped: a message header claims {human_size(metadata_length)}")
        handle.seek(offset)
        header = handle.read(metadata_length)
        start = 8 if header[:4] == b"\xff\xff\xff\xff" else 4
        message = header[start:]
        root = _u32(message, 0)
        kind = _field(message, root, 1)
        body = _field(message, root, 2)
        kind_value = message[kind] if kind else 0
        if not body or kind_value not in (self._DICTIONARY_BATCH, self._RECORD_BATCH):
            raise ValueError("an Arrow block that is not a batch")
        table = _deref(message, body)
        if kind_value == self._DICTIONARY_BATCH:
            data = _field(message, table, 1)
            if not data:
                raise ValueError("a dictionary batch without data")
            table = _deref(message, data)
        return message, table, offset + metadata_length

    def _batch_rows(self, handle: Any, block: tuple[int, int]) -> int:
        message, table, _ = self._record_batch(handle, block)
        length = _field(message, table, 0)
        return _i64(message, length) if length else 0

    def _batch_cost(self, handle: Any, block: tuple[int, int]) -> int:
        message, table, body = self._record_batch(handle, block)
        if not _field(message, table, 3):  # no BodyCompression: buffers are mapped in place
            return 0
        cost = 0
        for buffer_offset, buffer_length in _structs(message, _field(message, table, 2), "<qq"):
            if buffer_length < 8:
                continue
            handle.seek(body + buffer_offset)
            (decompressed,) = struct.unpack("<q", handle.read(8))
            cost += buffer_length - 8 if decompressed == -1 else max(decompressed, 0)
        return cost


# Flatbuffers, the little we need: tables with a vtable, offsets to tables and vectors of structs.


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])


def _i64(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<q", data, at)[0])


def _deref(data: bytes, at: int) -> int:
    return at + _u32(data, at)


def _field(data: bytes, table: int, index: int) -> int:
    """Absolute position of field ``index`` of the table at ``table`` (0: absent)."""
    vtable = table - int(struct.unpack_from("<i", data, table)[0])
    vtable_length = int(struct.unpack_from("<H", data, vtable)[0])
    entry = 4 + 2 * index
    if entry + 2 > vtable_length:
        return 0
    relative = int(struct.unpack_from("<H", data, vtable + entry)[0])
    return table + relative if relative else 0


def _structs(data: bytes, field: int, layout: str) -> Iterable[tuple[int, ...]]:
    if not field:
        return []
    vector = _deref(data, field)
    count = _u32(data, vector)
    size = struct.calcsize(layout)
    if vector + 4 + count * size > len(data):
        raise ValueError("a truncated Arrow header")
    return [struct.unpack_from(layout, data, vector + 4 + i * size) for i in range(count)]


def _blocks(footer: bytes, field: int) -> list[tuple[int, int]]:
    # Block: offset int64, metaDataLength int32, 4 bytes of padding, bodyLength int64.
    return [(offset, metadata_length) for offset, metadata_length, _ in _structs(footer, field, "<qi4xq")]


def _read_delimited(path: Path, delimiter: str | None) -> _Table:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        if delimiter is None:
            sample = handle.read(16_384)
            handle.seek(0)
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        # Lines are read with a length limit, so one endless line (or quoted field) costs at most
        # CSV_LINE_MAX_CHARS, not the file.
        reader = csv.reader(_bounded_lines(handle, CSV_LINE_MAX_CHARS), delimiter=delimiter)
        columns = next(reader, [])
        rows = list(itertools.islice(reader, PREVIEW_ROWS))
        counted = None
        if path.stat().st_size <= CSV_COUNT_MAX_BYTES:
            try:
                counted = len(rows) + sum(1 for _ in reader)
            except (csv.Error, _LineTooLong):
                counted = None
    return _Table(columns, rows, counted, len(columns))


class _LineTooLong(Exception):
    pass


def _bounded_lines(handle: Any, limit: int) -> Iterator[str]:
    while line := handle.readline(limit + 1):
        if len(line) > limit:
            raise _LineTooLong(f"a line longer than {limit:,} characters")
        yield line


def _read_xlsx(path: Path) -> _Table:
    import openpyxl

    # An .xlsx is a zip: its directory says what every part inflates to, before any is read.
    with zipfile.ZipFile(path) as archive:
        expanded = sum(member.file_size for member in archive.infolist())
    if expanded > PREVIEW_EXPANDED_MAX:
        raise OverBudget.expands_to(expanded)
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
