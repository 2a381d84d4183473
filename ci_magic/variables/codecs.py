"""Notebook values -> container files: one codec per kind of value.

A codec knows everything about its kind in one place: which values it takes, the formats it can
write (the first is the default), how to fingerprint a value without serializing it (so an
unchanged variable costs a hash or a snapshot check, never an encode), how big the file will be
*before* encoding it (so an oversized frame is refused before any large allocation), how to
encode it, and what the schema card says about it. File extensions and loader lines come from
the one table in ``formats``. Nothing here unpickles; pickling is opt-in (``--pickle``).

Parquet settings were measured on a 1,000,000 x 10 mixed frame (2 cores, `bench_variables.py
--codecs`): lz4 writes in ~115 ms and reads in ~45-55 ms at ~53 MB; snappy is as large, writes in
~125 ms and reads in ~90-115 ms; zstd is ~20% smaller but writes ~1.7x slower; no compression is
~30% larger (it costs more on a real network than it saves in CPU). pyarrow's "lz4" is Parquet's
LZ4_RAW codec, readable by pyarrow >= 5 (2021), polars and DuckDB. Statistics are off (the model
reads whole files, it never filters row groups) and dictionary encoding is tried only on string and
categorical columns, which saves ~30% of the write time against pyarrow's "dictionary everywhere".
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci_magic.errors import ContainerFileError, VariableError
from ci_magic.filenames import safe_relative_name, variable_name_for
from ci_magic.variables import fingerprint as fp
from ci_magic.variables import schema
from ci_magic.variables.formats import FORMATS, canonical_extension, extension, format_of
from ci_magic.variables.registry import Origin, PushRequest
from ci_magic.variables.snapshot import FrameSnapshot

__all__ = ["CODECS", "SUPPORTED_TYPES", "Codec", "Prepared", "codec_for", "is_data_like", "prepare"]

# Frames smaller than this in memory are encoded and measured exactly; bigger ones are first
# sized from an encoded sample, so one that cannot fit the upload cap is refused before encoding.
SAMPLE_ABOVE_BYTES = 32 * 2**20
SAMPLE_ROWS = 20_000
# A strided sample cuts the runs that dictionary and run-length encoding feed on, so it compresses
# worse than the whole frame: count only this share of the extrapolated size before refusing.
SAMPLE_MARGIN = 0.8
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "lz4", "write_statistics": False}


@dataclass
class Prepared:
    """One value on its way to the container: classified and fingerprinted, then (unless it is
    unchanged) encoded, which fills ``source``, ``size``, ``reader`` and ``card_body``."""

    name: str
    value: Any
    origin: Origin
    codec: Codec
    fmt: str  # the file's extension
    filename: str  # relative to /mnt/data
    fingerprint: str = ""
    requested: bool = False  # the user chose the format (--format, or --as with an extension)
    snapshot: FrameSnapshot | None = field(default=None, repr=False)  # cheap "unchanged" proof next time
    source: bytes | Path | None = field(default=None, repr=False)  # what is uploaded
    size: int = 0
    reader: str = ""  # the container's loader line, "{path}" where the file's path goes
    note: str = ""  # e.g. why a frame went as CSV instead of Parquet
    card_body: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.codec.kind

    @property
    def encoded(self) -> bool:
        return self.source is not None and bool(self.reader)

    def encode(self) -> None:
        """Serialize with the codec (``VariableError`` when the format cannot hold the value)."""
        self.codec.encode(self)
        self.card_body = tuple(card_body(self))

    def set_file(self, source: bytes | Path, reader: str, *, fmt: str | None = None, note: str = "") -> None:
        """Record the encoded file and the line that loads it (``{path}`` where its path goes)."""
        if fmt is not None and fmt != self.fmt:
            self.fmt, self.filename = fmt, _with_extension(self.filename, fmt)
        self.source = source
        self.size = len(source) if isinstance(source, bytes) else source.stat().st_size
        self.reader = reader
        self.note = note or self.note

    def estimated_size(self) -> int:
        """How big the file will be, known before encoding (an under- rather than an over-estimate)."""
        if self.source is not None:
            return self.size
        return self.codec.estimate(self)


# ---- the codecs ----------------------------------------------------------------------------------


class Codec:
    """One kind of notebook value. Subclasses fill in the class attributes and the methods."""

    kind = ""
    label = ""  # how the kind is named in messages
    formats: tuple[str, ...] = ()  # writable extensions, default first; () = any name, sent as is
    default_format = ""
    data_like = False  # pushed when a prompt names it

    def claims(self, value: Any) -> bool:
        raise NotImplementedError

    def summary(self, value: Any) -> str:
        """A few words for the push report: ``12 x 3``, ``shape (3, 4)``, ``42 characters``."""
        return type(value).__name__

    def fingerprint(self, p: Prepared, previous: FrameSnapshot | None) -> None:
        """Set ``p.fingerprint`` (and for small kinds the rendered bytes, made while hashing)."""
        data = self.render(p)
        p.fingerprint = fp.digest([self.kind], [memoryview(data)])
        p.set_file(data, self.loader(p))

    def render(self, p: Prepared) -> bytes:
        raise NotImplementedError

    def loader(self, p: Prepared) -> str:
        """The loader line for the file's extension, from the formats table (raw bytes if unknown)."""
        return FORMATS.get(p.fmt, FORMATS["bin"]).load.format(var=p.name, path="{path}")

    def estimate(self, p: Prepared) -> int:
        return 0  # unknown: encode, then check the real size

    def encode(self, p: Prepared) -> None:
        if p.source is None:
            p.set_file(self.render(p), self.loader(p))

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        return f"{type(value).__module__}.{type(value).__qualname__} ({p.fmt})", []


class FrameCodec(Codec):
    """pandas DataFrame and Series, polars DataFrame (loaded as pandas in the container)."""

    kind = "dataframe"
    label = "pandas DataFrame/Series or polars DataFrame"
    formats = ("parquet", "csv", "tsv", "feather", "json", "xlsx")
    default_format = "parquet"
    data_like = True

    def claims(self, value: Any) -> bool:
        pd = sys.modules.get("pandas")
        return (pd is not None and isinstance(value, (pd.DataFrame, pd.Series))) or _is_polars(value)

    def summary(self, value: Any) -> str:
        if getattr(value, "ndim", 2) == 1:
            return f"{len(value):,} values"
        rows, cols = value.shape
        return f"{rows:,} x {cols:,}"

    def fingerprint(self, p: Prepared, previous: FrameSnapshot | None) -> None:
        if _is_polars(p.value):
            digest = fp.digest(*fp.arrow_table_parts(p.value.to_arrow()))
        elif previous is not None and previous.matches(p.value):
            digest, p.snapshot = previous.digest, previous
        else:
            digest = fp.digest(*fp.frame_parts(p.value))
            p.snapshot = FrameSnapshot.take(p.value, digest)
        p.fingerprint = digest

    def estimate(self, p: Prepared) -> int:
        value = p.value
        if _is_polars(value):
            memory = int(value.estimated_size())
        else:
            usage = value.memory_usage(index=True, deep=True)
            memory = int(usage if isinstance(usage, int) else usage.sum())
        rows = len(value)
        if memory <= SAMPLE_ABOVE_BYTES or rows <= SAMPLE_ROWS:
            return 0  # cheap to encode: the real size is checked right after
        step = max(1, rows // SAMPLE_ROWS)
        sample = value.gather_every(step) if _is_polars(value) else value.iloc[::step]
        trial = dataclasses.replace(p, value=sample, snapshot=None, source=None, reader="", note="")
        self.encode(trial)
        return int(trial.size * rows / max(1, len(sample)) * SAMPLE_MARGIN)

    def encode(self, p: Prepared) -> None:
        if _is_polars(p.value):
            self._encode_polars(p)
            return
        series = getattr(p.value, "ndim", 2) == 1
        frame = (
            p.value.to_frame(name=p.value.name if p.value.name is not None else p.name) if series else p.value
        )
        with_index = not _default_index(frame.index)
        fmt = p.fmt
        try:
            if fmt in ("parquet", "feather"):
                import pyarrow as pa

                try:
                    table = pa.Table.from_pandas(frame, preserve_index=None)
                except (pa.ArrowException, ValueError, TypeError) as exc:
                    why = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if p.requested:
                        raise VariableError(
                            f"`{p.name}` cannot be written as {fmt} ({why}). Use --format csv, or fix the "
                            "column (e.g. `df[col] = df[col].astype(str)` for mixed types)."
                        ) from exc
                    note = f"Parquet cannot hold this frame ({why}); sent as CSV, so dtypes are not kept"
                    self._encode_text(p, frame, "csv", with_index, series, note)
                    return
                data = _parquet_bytes(table) if fmt == "parquet" else _feather_bytes(table)
                # Parquet/Feather restore the index from pandas metadata: no index_col needed.
                p.set_file(data, _frame_loader(p.name, fmt, False, series))
            elif fmt == "xlsx":
                buf = io.BytesIO()
                frame.to_excel(buf, index=with_index)
                p.set_file(buf.getvalue(), _frame_loader(p.name, fmt, with_index, series))
            elif fmt == "json":
                records = frame.reset_index() if with_index else frame
                data = records.to_json(orient="records", date_format="iso", force_ascii=False).encode("utf-8")
                p.set_file(data, _frame_loader(p.name, fmt, False, series))
            else:
                self._encode_text(p, frame, fmt, with_index, series, "")
        except ImportError as exc:
            raise VariableError(
                f"Writing `{p.name}` as {fmt} needs a package that is not installed ({exc.name}). Install it "
                "(`pip install openpyxl` for xlsx) or use --format parquet/csv."
            ) from exc
        except (ValueError, TypeError) as exc:
            raise VariableError(
                f"`{p.name}` cannot be written as {fmt} ({type(exc).__name__}: {str(exc)[:200]}). "
                "Try --format parquet or csv."
            ) from exc

    @staticmethod
    def _encode_text(p: Prepared, frame: Any, fmt: str, with_index: bool, series: bool, note: str) -> None:
        data = frame.to_csv(index=with_index, sep="\t" if fmt == "tsv" else ",").encode("utf-8")
        p.set_file(data, _frame_loader(p.name, fmt, with_index, series), fmt=fmt, note=note)

    @staticmethod
    def _encode_polars(p: Prepared) -> None:
        if p.fmt not in ("parquet", "csv", "feather"):
            raise VariableError(
                f"--format {p.fmt} does not fit `{p.name}`, a polars DataFrame. Use parquet, csv or feather."
            )
        if p.fmt == "parquet":
            data = _parquet_bytes(p.value.to_arrow())
        else:
            buf = io.BytesIO()
            (p.value.write_csv if p.fmt == "csv" else p.value.write_ipc)(buf)
            data = buf.getvalue()
        p.set_file(data, _frame_loader(p.name, p.fmt, False, False))

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        if _is_polars(value):
            rows, cols = value.shape
            lines = [schema.columns_line(list(value.columns), [str(t) for t in value.dtypes])]
            header = f"polars DataFrame (loads as pandas), {rows:,} rows x {cols:,} columns"
            return header, lines + schema.sample_lines(value.head(schema.SAMPLE_ROWS).to_pandas(), rows)
        if value.ndim == 1:
            name = value.name if value.name is not None else p.name
            header = f"pandas Series {name!r} ({value.dtype}), {len(value):,} values"
            return header, [
                schema.index_line(value.index),
                *schema.sample_lines(value.to_frame(name=name), len(value)),
            ]
        rows, cols = value.shape
        lines = [schema.columns_line(list(value.columns), list(value.dtypes)), schema.index_line(value.index)]
        return f"pandas DataFrame, {rows:,} rows x {cols:,} columns", lines + schema.sample_lines(value, rows)


class ArrayCodec(Codec):
    kind = "ndarray"
    label = "numpy array"
    formats = ("npy", "csv", "json")
    default_format = "npy"
    data_like = True

    def claims(self, value: Any) -> bool:
        np = sys.modules.get("numpy")
        return np is not None and isinstance(value, np.ndarray)

    def summary(self, value: Any) -> str:
        return f"{value.dtype}, shape {value.shape}"

    def fingerprint(self, p: Prepared, previous: FrameSnapshot | None) -> None:
        p.fingerprint = fp.digest(*fp.ndarray_parts(p.value))

    def estimate(self, p: Prepared) -> int:
        # .npy is the buffer plus a header; text needs at least a digit and a separator per value.
        return int(p.value.nbytes) + 128 if p.fmt == "npy" else 2 * int(p.value.size)

    def encode(self, p: Prepared) -> None:
        import numpy as np

        arr = p.value
        buf = io.BytesIO()
        if p.fmt == "npy":
            np.save(buf, arr, allow_pickle=False)
            p.set_file(buf.getvalue(), f"import numpy as np; {p.name} = np.load({{path}})")
        elif p.fmt == "json":
            data = json.dumps(arr.tolist(), default=_json_default).encode("utf-8")
            p.set_file(data, f"import json, numpy as np; {p.name} = np.array(json.load(open({{path}})))")
        else:
            if arr.ndim > 2 or arr.dtype.kind not in "biuf":
                raise VariableError(
                    f"`{p.name}` ({arr.dtype}, {arr.ndim}-D) cannot be written as CSV: only 1-D/2-D numeric "
                    "arrays can. Use the default .npy (--format npy)."
                )
            np.savetxt(buf, arr, delimiter=",", fmt="%d" if arr.dtype.kind in "biu" else "%.17g")
            p.set_file(buf.getvalue(), f"import numpy as np; {p.name} = np.loadtxt({{path}}, delimiter=',')")

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        import numpy as np

        header = f"numpy array {value.dtype}, shape {value.shape}"
        if value.size == 0:
            return header, []
        with np.printoptions(threshold=12, edgeitems=3, linewidth=120, precision=6):
            preview = np.array2string(value if value.ndim < 3 else value[(0,) * (value.ndim - 2)])
        return header, [f"values: {schema.truncate(preview)}"]


class JsonCodec(Codec):
    kind = "json"
    label = "dict/list/tuple/int/float/bool/None (as JSON)"
    formats = ("json",)
    default_format = "json"

    def claims(self, value: Any) -> bool:
        np = sys.modules.get("numpy")
        return (
            value is None
            or isinstance(value, (bool, int, float, dict, list, tuple))
            or (np is not None and isinstance(value, np.generic))
        )

    def summary(self, value: Any) -> str:
        return f"{len(value):,} items" if isinstance(value, (dict, list, tuple)) else type(value).__name__

    def render(self, p: Prepared) -> bytes:
        try:
            return json.dumps(p.value, ensure_ascii=False, default=_json_default).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise VariableError(
                f"`{p.name}` is a {type(p.value).__name__} but not JSON-serializable ({exc}). Convert its "
                "values to str/numbers/lists, push it as a DataFrame, or pass --pickle."
            ) from exc

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        if isinstance(value, dict):
            keys = ", ".join(
                schema.truncate(repr(k), schema.CELL_WIDTH) for k in list(value)[: schema.MAX_COLUMNS]
            )
            more = f", … {len(value) - schema.MAX_COLUMNS} more" if len(value) > schema.MAX_COLUMNS else ""
            header, lines = f"JSON object with {len(value):,} keys", [f"keys: {keys}{more}"]
        elif isinstance(value, (list, tuple)):
            header, lines = f"JSON array of {len(value):,} items", []
            if value:
                lines.append(f"first item: {schema.truncate(json.dumps(value[0], default=str))}")
        else:
            header, lines = f"JSON {type(value).__name__}", []
        if isinstance(p.source, bytes) and len(p.source) <= schema.PREVIEW_CHARS:
            lines.append(f"content: {p.source.decode('utf-8')}")
        return header, lines


class TextCodec(Codec):
    kind = "text"
    label = "str"
    default_format = "txt"

    def claims(self, value: Any) -> bool:
        return isinstance(value, str)

    def summary(self, value: Any) -> str:
        return f"{len(value):,} characters"

    def render(self, p: Prepared) -> bytes:
        try:
            return p.value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise VariableError(
                f"`{p.name}` is a str that is not valid Unicode text ({exc.reason} at position {exc.start}). "
                "Encode it yourself and push the bytes."
            ) from exc

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        first = next((line for line in value.splitlines() if line.strip()), "")
        return f"text, {len(value):,} characters, {value.count(chr(10)) + 1:,} lines", [
            f"starts: {schema.truncate(first, 120)!r}"
        ]


class BytesCodec(Codec):
    kind = "bytes"
    label = "bytes"
    default_format = "bin"

    def claims(self, value: Any) -> bool:
        return isinstance(value, (bytes, bytearray, memoryview))

    def summary(self, value: Any) -> str:
        return f"{len(value):,} bytes"

    def render(self, p: Prepared) -> bytes:
        return bytes(p.value)

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        head = bytes(value[:16]).hex(" ")
        return f"bytes, {len(value):,} bytes", [f"first bytes: {head}"] if head else []


class ImageCodec(Codec):
    """PIL images and matplotlib figures."""

    kind = "image"
    label = "PIL image or matplotlib figure"
    formats = ("png", "jpg", "webp", "gif", "bmp", "tiff", "svg", "pdf")
    default_format = "png"
    data_like = True

    def claims(self, value: Any) -> bool:
        return _is_pil(value) or _is_figure(value)

    def summary(self, value: Any) -> str:
        if _is_pil(value):
            return "{} x {} px".format(*value.size)
        return f"figure, {len(value.axes)} axes"

    def fingerprint(self, p: Prepared, previous: FrameSnapshot | None) -> None:
        if _is_figure(p.value):
            super().fingerprint(p, previous)  # rendering is the only way to see what it shows
            return
        if p.fmt in ("svg", "pdf"):
            raise VariableError(
                f"`{p.name}` is a PIL image: it can be sent as png, jpg, webp, gif, bmp or tiff."
            )
        image = p.value
        p.fingerprint = fp.digest(
            [image.mode, image.size, str(image.getpalette())], [memoryview(image.tobytes())]
        )

    def render(self, p: Prepared) -> bytes:
        buf = io.BytesIO()
        if _is_figure(p.value):
            # Dates in SVG/PDF metadata would change the bytes (and the fingerprint) on every render.
            metadata = (
                {"Date": None} if p.fmt == "svg" else {"CreationDate": None} if p.fmt == "pdf" else None
            )
            p.value.savefig(
                buf, format="jpeg" if p.fmt == "jpg" else p.fmt, bbox_inches="tight", metadata=metadata
            )
            return buf.getvalue()
        image = p.value
        if p.fmt == "jpg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha channel or palette
        image.save(buf, format={"jpg": "JPEG"}.get(p.fmt, p.fmt.upper()))
        return buf.getvalue()

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        if _is_pil(value):
            width, height = value.size
            return f"image {width}x{height} px, mode {value.mode}", []
        titles = [ax.get_title() for ax in value.axes if ax.get_title()]
        lines = [f"titles: {', '.join(titles)}"] if titles else []
        return f"matplotlib figure rendered as {p.fmt}, {len(value.axes)} axes", lines


class PathCodec(Codec):
    """A ``pathlib.Path`` (or any ``os.PathLike``) to a file: the file is sent as is."""

    kind = "file"
    label = "pathlib.Path to a file"
    data_like = True

    def claims(self, value: Any) -> bool:
        return isinstance(value, os.PathLike)

    def summary(self, value: Any) -> str:
        return schema.format_size(Path(value).stat().st_size) if Path(value).is_file() else "file"

    def fingerprint(self, p: Prepared, previous: FrameSnapshot | None) -> None:
        path = Path(p.value).expanduser()
        try:
            stat = path.stat()
        except OSError as exc:
            raise VariableError(
                f"`{p.name}` points to {str(path)!r}, which does not exist or cannot be read "
                f"({exc.strerror}). Check the path."
            ) from exc
        if not path.is_file():
            raise VariableError(
                f"`{p.name}` points to {str(path)!r}, which is not a regular file. Push a file."
            )
        p.value = path
        # Like make and rsync: size + mtime + inode say "changed" without reading the whole file.
        digest = fp.digest(["file", str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino], [])
        p.fingerprint = f"{digest}:{p.filename}"

    def estimate(self, p: Prepared) -> int:
        return Path(p.value).stat().st_size

    def encode(self, p: Prepared) -> None:
        var = p.name if p.name.isidentifier() else variable_name_for(p.filename)
        fmt = format_of(p.filename) or FORMATS["bin"]
        p.set_file(Path(p.value), fmt.load.format(var=var, path="{path}"))

    def describe(self, value: Any, p: Prepared) -> tuple[str, list[str]]:
        return schema.describe_file(Path(value), format_of(p.filename))


class PickleCodec(Codec):
    """Any picklable value, only with ``--pickle`` (loading a pickle runs code in the container)."""

    kind = "pickle"
    label = "pickle"
    formats = ("pkl",)
    default_format = "pkl"

    def claims(self, value: Any) -> bool:
        return False  # never chosen by type: only by --pickle

    def render(self, p: Prepared) -> bytes:
        try:
            return pickle.dumps(p.value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise VariableError(
                f"`{p.name}` cannot be pickled ({type(exc).__name__}: {exc}). Convert it to a supported "
                f"type: {SUPPORTED_TYPES}."
            ) from exc


# Checked in this order: the first codec that claims a value writes it.
CODECS: tuple[Codec, ...] = (
    FrameCodec(),
    ArrayCodec(),
    ImageCodec(),
    PathCodec(),
    TextCodec(),
    BytesCodec(),
    JsonCodec(),
)
PICKLE = PickleCodec()
SUPPORTED_TYPES = ", ".join(c.label for c in CODECS)


def codec_for(value: Any) -> Codec | None:
    """The codec of a value, or None when it has none (only ``--pickle`` can send it)."""
    return next((c for c in CODECS if c.claims(value)), None)


def is_data_like(value: Any) -> bool:
    """Whether a bare name in a prompt should push this value (frames, arrays, images, files)."""
    codec = codec_for(value)
    if isinstance(codec, PathCodec):
        return Path(value).is_file()
    return codec is not None and codec.data_like


def card_body(p: Prepared) -> list[str]:
    """Header and detail lines of the schema card (the path and loader vary by container).

    Never raises: a value that cannot be described still gets its type and size.
    """
    source = f"notebook variable `{p.name}`" if p.kind != "file" else "notebook file"
    try:
        header, lines = p.codec.describe(p.value, p)
    except Exception as exc:  # describing is a courtesy: never fail a push over it
        header, lines = type(p.value).__name__, [f"(could not describe: {type(exc).__name__})"]
    if p.note:
        lines.append(f"note: {p.note}")
    return [f"{header}, {schema.format_size(p.size)} {p.fmt or 'file'} (from {source})", *lines]


# ---- classification ------------------------------------------------------------------------------


def prepare(request: PushRequest, *, snapshot: FrameSnapshot | None = None) -> Prepared:
    """Classify and fingerprint a request (raises ``VariableError``); nothing is encoded yet
    except the small kinds, whose bytes are what gets hashed.

    ``snapshot`` (from the previous push of this variable) skips hashing a pandas object that
    provably did not change; the result carries a fresh snapshot when one can be taken.
    """
    name, value, filename = request.name, request.value, request.filename
    codec = codec_for(value)
    fmt = canonical_extension(request.fmt.strip()) if request.fmt and request.fmt.strip() else None
    named_ext = canonical_extension(extension(filename)) if filename else ""
    if fmt is None and named_ext == "pkl":
        fmt = "pkl"  # "--as model.pkl --pickle"
    requested = fmt is not None or bool(named_ext)
    if isinstance(codec, PathCodec) and fmt != "pkl":
        if fmt is not None:
            raise VariableError(
                f"{value} is a file and is sent as is, so --format {request.fmt} does not apply. Load it "
                "into a variable first if you want it converted."
            )
        target = _target_name(name, extension(Path(value).name), filename or Path(value).name)
        p = Prepared(name, value, request.origin, codec, extension(target), target, requested=True)
    elif (
        codec is None
        or fmt == "pkl"
        or (isinstance(codec, ArrayCodec) and value.dtype.hasobject and fmt != "json")
    ):
        if not request.allow_pickle:
            raise _unsupported(name, value, codec)
        p = Prepared(
            name,
            value,
            request.origin,
            PICKLE,
            "pkl",
            _target_name(name, "pkl", filename),
            requested=requested,
        )
    else:
        fmt = _choose_format(name, codec, fmt, filename)
        p = Prepared(
            name, value, request.origin, codec, fmt, _target_name(name, fmt, filename), requested=requested
        )
    p.codec.fingerprint(p, snapshot)
    if p.kind != "file":
        # The target name and format (and whether the user insisted on it) are part of the identity:
        # "--as" or "--format" changes force a push.
        p.fingerprint = f"{p.fingerprint}:{p.fmt}{'!' if requested else ''}:{p.filename}"
    return p


def _choose_format(name: str, codec: Codec, fmt: str | None, filename: str | None) -> str:
    allowed = codec.formats
    from_name = canonical_extension(extension(filename)) if filename else ""
    if fmt is None:
        if filename and from_name and allowed and from_name not in allowed:
            raise VariableError(
                f"`{name}` is a {codec.label}, which can be sent as {', '.join(allowed)}; the name "
                f"{filename!r} does not say which. Use a name ending in one of those, or add --format."
            )
        fmt = from_name or codec.default_format
    elif allowed and fmt not in allowed:
        raise VariableError(
            f"--format {fmt} does not fit `{name}`, a {codec.label}. Use one of: {', '.join(allowed)} "
            "(or --pickle with --format pickle)."
        )
    elif filename and from_name and from_name != fmt:
        raise VariableError(
            f"--as {filename!r} and --format {fmt} disagree for `{name}`. Give just one, or make the "
            f"name end in .{fmt}."
        )
    if not fmt.isalnum():
        raise VariableError(
            f"--format {fmt!r} is not a file extension. Use letters and digits only, e.g. csv."
        )
    return fmt


def _target_name(name: str, ext: str, filename: str | None) -> str:
    if not filename:
        return f"{name}.{ext}"
    try:
        safe = safe_relative_name(filename)
    except ContainerFileError as exc:
        raise VariableError(f"--as {filename!r} is not a usable container file name: {exc.message}") from exc
    return safe if extension(safe) or not ext else _with_extension(safe, ext)


def _with_extension(filename: str, ext: str) -> str:
    current = extension(filename)
    return f"{filename[: -len(current) - 1]}.{ext}" if current else f"{filename}.{ext}"


def _unsupported(name: str, value: Any, codec: Codec | None) -> VariableError:
    cls = type(value)
    what = f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__
    if isinstance(codec, ArrayCodec):
        return VariableError(
            f"`{name}` is a numpy array of Python objects ({value.dtype}), which .npy holds only as a "
            "pickle. Convert it first (e.g. `arr.astype(str)` or `arr.astype(float)`), or pass --pickle if "
            "you trust the container (loading a pickle runs code)."
        )
    if codec is not None:
        return VariableError(f"--format pickle for `{name}` needs --pickle too (loading a pickle runs code).")
    return VariableError(
        f"`{name}` is a {what}, which ci-magic cannot send to the container. Supported: {SUPPORTED_TYPES}. "
        "Convert it first (e.g. `list(x)` for a set, a DataFrame for records), or pass --pickle to send a "
        "pickle (only if you trust the container: loading a pickle runs code)."
    )


# ---- helpers -------------------------------------------------------------------------------------


def _is_polars(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.split(".")[0] == "polars" and cls.__name__ == "DataFrame"


def _is_pil(value: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _is_figure(value: Any) -> bool:
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(value, figure.Figure)


def _json_default(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist() if isinstance(obj, np.ndarray) else obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _default_index(index: Any) -> bool:
    import pandas as pd

    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1 and index.name is None


def _frame_loader(var: str, fmt: str, with_index: bool, series: bool) -> str:
    idx = ", index_col=0" if with_index else ""
    call = {
        "parquet": "pd.read_parquet({path})",
        "csv": f"pd.read_csv({{path}}{idx})",
        "tsv": f"pd.read_csv({{path}}, sep='\\t'{idx})",
        "feather": "pd.read_feather({path})",
        "json": "pd.read_json({path}, orient='records')",
        "xlsx": f"pd.read_excel({{path}}{idx})",
    }[fmt]
    return f"import pandas as pd; {var} = {call}{'.iloc[:, 0]' if series else ''}"


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dictionary = [
        f.name
        for f in table.schema
        if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=dictionary or False, **_PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def _feather_bytes(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.feather as feather

    sink = pa.BufferOutputStream()
    feather.write_feather(table, sink, compression="lz4")
    return sink.getvalue().to_pybytes()
