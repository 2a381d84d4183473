"""Notebook values <-> container files.

``prepare`` classifies a value and fingerprints it without serializing (so an unchanged variable
costs a hash or a snapshot check, never an encode); ``Prepared.encode`` writes it with
pandas/pyarrow/numpy writers.
``decode`` turns a downloaded file back into an object by its extension. Nothing here unpickles.

Parquet settings were measured on a 1,000,000 x 10 mixed frame (2 cores, `bench_variables.py
--codecs`): lz4 writes in ~115 ms and reads in ~45-55 ms at ~53 MB; snappy is as large, writes in
~125 ms and reads in ~90-115 ms; zstd is ~20% smaller but writes ~1.7x slower; no compression is
~30% larger (it costs more on a real network than it saves in CPU). pyarrow's "lz4" is Parquet's
LZ4_RAW codec, readable by pyarrow >= 5 (2021), polars and DuckDB. Statistics are off (the model
reads whole files, it never filters row groups) and dictionary encoding is tried only on string and
categorical columns, which saves ~30% of the write time against pyarrow's "dictionary everywhere".
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci_magic.errors import ContainerFileError, VariableError
from ci_magic.filenames import safe_relative_name, variable_name_for
from ci_magic.variables import fingerprint as fp
from ci_magic.variables.snapshot import FrameSnapshot

__all__ = [
    "DATA_LIKE_KINDS",
    "SUPPORTED_TYPES",
    "DecodedFile",
    "EncodedValue",
    "Prepared",
    "decode",
    "encode",
    "file_reader",
    "is_data_like",
    "kind_of",
    "loader_line",
    "prepare",
]

SUPPORTED_TYPES = (
    "pandas DataFrame/Series, numpy arrays, polars DataFrames, dict/list/tuple/int/float/bool/None "
    "(as JSON), str, bytes, PIL images, matplotlib figures and pathlib.Path to a file"
)
DATA_LIKE_KINDS = frozenset({"dataframe", "series", "polars", "ndarray", "image", "figure", "file"})

_FORMATS: dict[str, tuple[str, ...]] = {
    "dataframe": ("parquet", "csv", "tsv", "feather", "json", "xlsx"),
    "series": ("parquet", "csv", "tsv", "feather", "json", "xlsx"),
    "polars": ("parquet", "csv", "feather"),
    "ndarray": ("npy", "csv", "json"),
    "json": ("json",),
    "figure": ("png", "svg", "pdf", "jpg"),
    "image": ("png", "jpg", "webp", "gif", "bmp", "tiff"),
    "text": (),  # any extension: the text is written as is
    "bytes": (),
    "file": (),
}
_DEFAULT_FORMAT = {
    "dataframe": "parquet",
    "series": "parquet",
    "polars": "parquet",
    "ndarray": "npy",
    "json": "json",
    "figure": "png",
    "image": "png",
    "text": "txt",
    "bytes": "bin",
}
_ALIASES = {
    "pq": "parquet",
    "arrow": "feather",
    "jpeg": "jpg",
    "tif": "tiff",
    "pkl": "pickle",
    "excel": "xlsx",
    "text": "txt",
}
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "lz4", "write_statistics": False}

# fmt: off
_TEXT_EXTS = frozenset({
    "txt", "md", "log", "py", "sql", "rst", "tex", "yaml", "yml", "toml", "ini", "cfg", "html", "htm", "xml",
    "svg", "js", "css", "sh", "r",
})
# fmt: on
_IMAGE_MIME = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}


# ---------------------------------------------------------------------------------------------
# classification


def kind_of(value: Any) -> str | None:
    """The codec family of a value, or None when it has none (only ``--pickle`` can send it)."""
    pd = sys.modules.get("pandas")
    if pd is not None:
        if isinstance(value, pd.DataFrame):
            return "dataframe"
        if isinstance(value, pd.Series):
            return "series"
    cls = type(value)
    if cls.__module__.split(".")[0] == "polars" and cls.__name__ == "DataFrame":
        return "polars"
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return "ndarray"
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(value, pil.Image):
        return "image"
    mpl_figure = sys.modules.get("matplotlib.figure")
    if mpl_figure is not None and isinstance(value, mpl_figure.Figure):
        return "figure"
    if isinstance(value, os.PathLike):
        return "file"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if value is None or isinstance(value, (bool, int, float, dict, list, tuple)):
        return "json"
    if np is not None and isinstance(value, np.generic):
        return "json"
    return None


def is_data_like(value: Any) -> bool:
    """Whether a bare name in a prompt should push this value (frames, arrays, images, files)."""
    kind = kind_of(value)
    if kind == "file":
        return Path(value).is_file()
    return kind in DATA_LIKE_KINDS


# ---------------------------------------------------------------------------------------------
# encoding


@dataclass(frozen=True)
class EncodedValue:
    """A value as a container file: its bytes (or the local file sent as is) and how to load it."""

    name: str
    filename: str  # relative to /mnt/data
    kind: str
    fmt: str
    fingerprint: str
    reader: str  # the loader line with "{path}" where the container path goes
    data: bytes | None = None
    path: Path | None = None
    note: str = ""  # e.g. why a frame went as CSV instead of Parquet

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        return self.path.stat().st_size if self.path is not None else 0

    @property
    def source(self) -> Path | bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path

    @property
    def loader(self) -> str:
        return self.loader_for(f"/mnt/data/{self.filename}")

    def loader_for(self, container_path: str) -> str:
        return loader_line(self.reader, container_path)


def loader_line(reader: str, container_path: str) -> str:
    """A loader template (``{path}`` placeholder) for the file at ``container_path``."""
    return reader.replace("{path}", repr(container_path))


@dataclass
class Prepared:
    """A classified, fingerprinted value, not yet serialized."""

    value: Any
    name: str
    kind: str
    fmt: str
    filename: str
    fingerprint: str
    requested: bool = False  # the user chose the format (--format or --as with an extension)
    payload: bytes | None = field(default=None, repr=False)  # rendered while fingerprinting
    snapshot: FrameSnapshot | None = field(default=None, repr=False)  # cheap "unchanged" proof next time

    def encode(self) -> EncodedValue:
        """Serialize with pandas/pyarrow/numpy writers (``VariableError`` if the format cannot hold it)."""
        return _ENCODERS["pickle" if self.fmt == "pickle" else self.kind](self)

    def encoded(
        self,
        data: bytes | None,
        reader: str,
        *,
        path: Path | None = None,
        fmt: str | None = None,
        note: str = "",
    ) -> EncodedValue:
        fmt = fmt or self.fmt
        filename = self.filename if fmt == self.fmt else _with_extension(self.filename, fmt)
        return EncodedValue(self.name, filename, self.kind, fmt, self.fingerprint, reader, data, path, note)


def prepare(
    value: Any,
    name: str,
    *,
    fmt: str | None = None,
    filename: str | None = None,
    allow_pickle: bool = False,
    snapshot: FrameSnapshot | None = None,
) -> Prepared:
    """Classify and fingerprint ``value`` as notebook variable ``name`` (raises ``VariableError``).

    ``snapshot`` (from the previous push of this variable) skips hashing a pandas object that
    provably did not change; the result carries a fresh snapshot when one can be taken.
    """
    kind = kind_of(value)
    fmt = _normalize_format(fmt)
    if fmt is None and filename and _normalize_format(_extension(filename)) == "pickle":
        fmt = "pickle"  # "--as model.pkl --pickle"
    requested = fmt is not None or bool(filename and _extension(filename))
    if kind == "file" and fmt != "pickle":
        return _prepare_file(value, name, fmt, filename)
    payload: bytes | None = None
    taken: FrameSnapshot | None = None
    if kind is None or fmt == "pickle" or (kind == "ndarray" and value.dtype.hasobject and fmt != "json"):
        if not allow_pickle:
            raise _unsupported(name, value, kind)
        kind, fmt = kind or "pickle", "pickle"
        payload = _pickle_bytes(name, value)
        digest = _bytes_fingerprint(fmt, payload)
    else:
        fmt = _choose_format(name, kind, fmt, filename)
        if kind in ("dataframe", "series"):
            if snapshot is not None and snapshot.matches(value):
                digest, taken = snapshot.digest, snapshot
            else:
                digest = fp.digest(*fp.frame_parts(value))
                taken = FrameSnapshot.take(value, digest)
        elif kind == "polars":
            digest = fp.digest(*fp.arrow_table_parts(value.to_arrow()))
        elif kind == "ndarray":
            digest = fp.digest(*fp.ndarray_parts(value))
        elif kind == "image":
            digest = fp.digest(
                [value.mode, value.size, str(value.getpalette())], [memoryview(value.tobytes())]
            )
        else:
            payload = _figure_bytes(value, fmt) if kind == "figure" else _small_payload(name, kind, value)
            digest = _bytes_fingerprint(kind, payload)
    target = _target_name(name, fmt, filename)
    # The target name and format (and whether the user insisted on it) are part of the identity:
    # "--as" or "--format" changes force a push.
    identity = f"{digest}:{fmt}{'!' if requested else ''}:{target}"
    return Prepared(value, name, kind, fmt, target, identity, requested, payload, taken)


def encode(
    value: Any, name: str, *, fmt: str | None = None, filename: str | None = None, allow_pickle: bool = False
) -> EncodedValue:
    """Serialize ``value`` as the container file for variable ``name``."""
    return prepare(value, name, fmt=fmt, filename=filename, allow_pickle=allow_pickle).encode()


def _normalize_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = fmt.strip().lower().lstrip(".")
    return _ALIASES.get(fmt, fmt) or None


def _extension(filename: str) -> str:
    base = filename.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def _with_extension(filename: str, ext: str) -> str:
    ext = "pkl" if ext == "pickle" else ext
    current = _extension(filename)
    return f"{filename[: -len(current) - 1]}.{ext}" if current else f"{filename}.{ext}"


def _choose_format(name: str, kind: str, fmt: str | None, filename: str | None) -> str:
    allowed = _FORMATS[kind]
    from_name = _normalize_format(_extension(filename)) if filename else None
    if fmt is None:
        fmt = from_name if from_name and (not allowed or from_name in allowed) else _DEFAULT_FORMAT[kind]
        if filename and from_name and allowed and from_name not in allowed:
            raise VariableError(
                f"`{name}` is a {_label(kind)}, which can be sent as {', '.join(allowed)}; the name "
                f"{filename!r} does not say which. Use a name ending in one of those, or add --format."
            )
    elif allowed and fmt not in allowed:
        raise VariableError(
            f"--format {fmt} does not fit `{name}`, a {_label(kind)}. Use one of: {', '.join(allowed)} "
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


def _target_name(name: str, fmt: str, filename: str | None) -> str:
    ext = "pkl" if fmt == "pickle" else fmt
    if not filename:
        return f"{name}.{ext}"
    try:
        safe = safe_relative_name(filename)
    except ContainerFileError as exc:
        raise VariableError(f"--as {filename!r} is not a usable container file name: {exc.message}") from exc
    return safe if _extension(safe) or not ext else _with_extension(safe, ext)


def _label(kind: str) -> str:
    return {
        "dataframe": "pandas DataFrame",
        "series": "pandas Series",
        "polars": "polars DataFrame",
        "ndarray": "numpy array",
        "json": "JSON value",
        "figure": "matplotlib figure",
        "image": "PIL image",
        "text": "str",
        "bytes": "bytes",
        "file": "file",
    }.get(kind, kind)


def _unsupported(name: str, value: Any, kind: str | None) -> VariableError:
    cls = type(value)
    what = f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__
    if kind == "ndarray":
        return VariableError(
            f"`{name}` is a numpy array of Python objects ({value.dtype}), which .npy holds only as a "
            "pickle. "
            "Convert it first (e.g. `arr.astype(str)` or `arr.astype(float)`), or pass --pickle if you trust "
            "the container (loading a pickle runs code)."
        )
    if kind is not None:
        return VariableError(f"--format pickle for `{name}` needs --pickle too (loading a pickle runs code).")
    return VariableError(
        f"`{name}` is a {what}, which ci-magic cannot send to the container. Supported: {SUPPORTED_TYPES}. "
        "Convert it first (e.g. `list(x)` for a set, a DataFrame for records), or pass --pickle to send a "
        "pickle (only if you trust the container: loading a pickle runs code)."
    )


def _bytes_fingerprint(kind: str, payload: bytes) -> str:
    return fp.digest([kind], [memoryview(payload)])


def _pickle_bytes(name: str, value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise VariableError(
            f"`{name}` cannot be pickled ({type(exc).__name__}: {exc}). Convert it to a supported type: "
            f"{SUPPORTED_TYPES}."
        ) from exc


def _json_default(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist() if isinstance(obj, np.ndarray) else obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _small_payload(name: str, kind: str, value: Any) -> bytes:
    if kind == "bytes":
        return bytes(value)
    if kind == "text":
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise VariableError(
                f"`{name}` is a str that is not valid Unicode text ({exc.reason} at position {exc.start}). "
                "Encode it yourself and push the bytes."
            ) from exc
    try:
        return json.dumps(value, ensure_ascii=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise VariableError(
            f"`{name}` is a {type(value).__name__} but not JSON-serializable ({exc}). Convert its values to "
            "str/numbers/lists, push it as a DataFrame, or pass --pickle."
        ) from exc


def _figure_bytes(figure: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    # Dates in SVG/PDF metadata would change the bytes (and the fingerprint) on every render.
    metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else None
    figure.savefig(buf, format="jpeg" if fmt == "jpg" else fmt, bbox_inches="tight", metadata=metadata)
    return buf.getvalue()


def _prepare_file(value: Any, name: str, fmt: str | None, filename: str | None) -> Prepared:
    path = Path(value).expanduser()
    if fmt is not None:
        raise VariableError(
            f"{path} is a file and is sent as is, so --format {fmt} does not apply. Load it into a "
            "variable first if you want it converted."
        )
    try:
        stat = path.stat()
    except OSError as exc:
        raise VariableError(
            f"`{name}` points to {str(path)!r}, which does not exist or cannot be read ({exc.strerror}). "
            "Check the path."
        ) from exc
    if not path.is_file():
        raise VariableError(f"`{name}` points to {str(path)!r}, which is not a regular file. Push a file.")
    target = _target_name(name, _extension(path.name), filename or path.name)
    # Like make and rsync: size + mtime + inode say "changed" without reading the whole file.
    digest = fp.digest(["file", str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino], [])
    return Prepared(path, name, "file", _extension(target), target, f"{digest}:{target}", True)


# -- encoders, one per kind -------------------------------------------------------------------


def _default_index(index: Any) -> bool:
    import pandas as pd

    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1 and index.name is None


def _frame_reader(var: str, fmt: str, with_index: bool, series: bool) -> str:
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


def _encode_frame(p: Prepared) -> EncodedValue:
    series = p.kind == "series"
    frame = p.value.to_frame(name=p.value.name if p.value.name is not None else p.name) if series else p.value
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
                return _encode_frame_text(p, frame, "csv", with_index, series, note)
            if fmt == "parquet":
                data = _parquet_bytes(table)
            else:
                import pyarrow.feather as feather

                sink = pa.BufferOutputStream()
                feather.write_feather(table, sink, compression="lz4")
                data = sink.getvalue().to_pybytes()
            # Parquet/Feather restore the index from pandas metadata: no index_col needed.
            return p.encoded(data, _frame_reader(p.name, fmt, False, series), fmt=fmt)
        if fmt == "xlsx":
            buf = io.BytesIO()
            frame.to_excel(buf, index=with_index)
            return p.encoded(buf.getvalue(), _frame_reader(p.name, fmt, with_index, series))
        if fmt == "json":
            records = frame.reset_index() if with_index else frame
            data = records.to_json(orient="records", date_format="iso", force_ascii=False).encode("utf-8")
            return p.encoded(data, _frame_reader(p.name, fmt, False, series))
        return _encode_frame_text(p, frame, fmt, with_index, series, "")
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


def _encode_frame_text(
    p: Prepared, frame: Any, fmt: str, with_index: bool, series: bool, note: str
) -> EncodedValue:
    data = frame.to_csv(index=with_index, sep="\t" if fmt == "tsv" else ",").encode("utf-8")
    return p.encoded(data, _frame_reader(p.name, fmt, with_index, series), fmt=fmt, note=note)


def _encode_polars(p: Prepared) -> EncodedValue:
    table = p.value.to_arrow()
    if p.fmt == "parquet":
        data = _parquet_bytes(table)
    else:
        buf = io.BytesIO()
        (p.value.write_csv if p.fmt == "csv" else p.value.write_ipc)(buf)
        data = buf.getvalue()
    return p.encoded(data, _frame_reader(p.name, p.fmt, False, False))


def _encode_ndarray(p: Prepared) -> EncodedValue:
    import numpy as np

    arr = p.value
    buf = io.BytesIO()
    if p.fmt == "npy":
        np.save(buf, arr, allow_pickle=False)
        return p.encoded(buf.getvalue(), f"import numpy as np; {p.name} = np.load({{path}})")
    if p.fmt == "json":
        return p.encoded(
            json.dumps(arr.tolist(), default=_json_default).encode("utf-8"),
            f"import json, numpy as np; {p.name} = np.array(json.load(open({{path}})))",
        )
    if arr.ndim > 2 or arr.dtype.kind not in "biuf":
        raise VariableError(
            f"`{p.name}` ({arr.dtype}, {arr.ndim}-D) cannot be written as CSV: only 1-D/2-D numeric arrays "
            "can. Use the default .npy (--format npy)."
        )
    np.savetxt(buf, arr, delimiter=",", fmt="%d" if arr.dtype.kind in "biu" else "%.17g")
    return p.encoded(buf.getvalue(), f"import numpy as np; {p.name} = np.loadtxt({{path}}, delimiter=',')")


def _encode_image(p: Prepared) -> EncodedValue:
    image = p.value
    if p.fmt == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha channel or palette
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG"}.get(p.fmt, p.fmt.upper()))
    return p.encoded(buf.getvalue(), f"from PIL import Image; {p.name} = Image.open({{path}})")


def _encode_rendered(p: Prepared) -> EncodedValue:
    assert p.payload is not None
    if p.kind == "json":
        reader = f"import json; {p.name} = json.load(open({{path}}, encoding='utf-8'))"
    elif p.kind == "figure" and p.fmt in ("png", "jpg"):
        reader = f"from PIL import Image; {p.name} = Image.open({{path}})"
    else:
        reader = file_reader(p.filename, p.name)
    return p.encoded(p.payload, reader)


def _encode_pickle(p: Prepared) -> EncodedValue:
    assert p.payload is not None
    return p.encoded(p.payload, f"import pickle; {p.name} = pickle.load(open({{path}}, 'rb'))")


def _encode_file(p: Prepared) -> EncodedValue:
    var = p.name if p.name.isidentifier() else variable_name_for(p.filename)
    return p.encoded(None, file_reader(p.filename, var), path=p.value)


_ENCODERS: dict[str, Callable[[Prepared], EncodedValue]] = {
    "dataframe": _encode_frame,
    "series": _encode_frame,
    "polars": _encode_polars,
    "ndarray": _encode_ndarray,
    "image": _encode_image,
    "figure": _encode_rendered,
    "json": _encode_rendered,
    "text": _encode_rendered,
    "bytes": _encode_rendered,
    "pickle": _encode_pickle,
    "file": _encode_file,
}


def file_reader(filename: str, var: str) -> str:
    """The one line that loads a file of this extension in the container ("{path}" placeholder)."""
    ext = _extension(filename)
    pandas_calls = {
        "csv": "pd.read_csv({path})",
        "tsv": "pd.read_csv({path}, sep='\\t')",
        "parquet": "pd.read_parquet({path})",
        "feather": "pd.read_feather({path})",
        "xlsx": "pd.read_excel({path}, sheet_name=None)",
        "xls": "pd.read_excel({path}, sheet_name=None)",
        "jsonl": "pd.read_json({path}, lines=True)",
    }
    if ext in pandas_calls:
        return f"import pandas as pd; {var} = {pandas_calls[ext]}"
    if ext in ("npy", "npz"):
        return f"import numpy as np; {var} = np.load({{path}})"
    if ext == "json":
        return f"import json; {var} = json.load(open({{path}}, encoding='utf-8'))"
    if ext in _TEXT_EXTS:
        return f"{var} = open({{path}}, encoding='utf-8').read()"
    if ext in _IMAGE_MIME:
        return f"from PIL import Image; {var} = Image.open({{path}})"
    if ext in ("pkl", "pickle"):
        return f"import pickle; {var} = pickle.load(open({{path}}, 'rb'))"
    return f"{var} = open({{path}}, 'rb').read()"


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass(frozen=True)
class DecodedFile:
    """A downloaded file as an object: DataFrame, ndarray, dict of arrays, JSON value, str, image, bytes."""

    value: Any
    kind: str  # "dataframe" | "ndarray" | "arrays" | "json" | "text" | "image" | "bytes"
    mime: str | None = None  # images: what to display them as


def _read_parquet(data: bytes) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # split_blocks + self_destruct: no consolidation copy, and Arrow memory is freed column by column.
    return pq.read_table(pa.py_buffer(data)).to_pandas(split_blocks=True, self_destruct=True)


def _read_npz(data: bytes) -> dict[str, Any]:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _pandas(reader: str, **kwargs: Any) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        import pandas as pd

        return getattr(pd, reader)(io.BytesIO(data), **kwargs)

    return read


def _read_json_lines(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.decode("utf-8-sig").splitlines() if line.strip()]


def _numpy_load(data: bytes) -> Any:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


_DECODERS: dict[str, tuple[str, str, Callable[[bytes], Any]]] = {
    "csv": ("CSV", "dataframe", _pandas("read_csv")),
    "tsv": ("TSV", "dataframe", _pandas("read_csv", sep="\t")),
    "parquet": ("Parquet", "dataframe", _read_parquet),
    "pq": ("Parquet", "dataframe", _read_parquet),
    "feather": ("Feather", "dataframe", _pandas("read_feather")),
    "arrow": ("Arrow IPC", "dataframe", _pandas("read_feather")),
    "xlsx": ("Excel", "dataframe", _pandas("read_excel")),
    "xlsm": ("Excel", "dataframe", _pandas("read_excel")),
    "xls": ("Excel", "dataframe", _pandas("read_excel")),
    "npy": ("NumPy .npy (pickles refused)", "ndarray", _numpy_load),
    "npz": ("NumPy .npz (pickles refused)", "arrays", _read_npz),
    "json": ("JSON", "json", lambda data: json.loads(data.decode("utf-8-sig"))),
    "jsonl": ("JSON lines", "json", _read_json_lines),
    "ndjson": ("JSON lines", "json", _read_json_lines),
}


def decode(filename: str, data: bytes, *, kept_at: Path | None = None) -> DecodedFile:
    """The object a file holds, chosen by its extension; unknown extensions (and pickles) stay bytes.

    Raises ``ContainerFileError`` when the bytes do not parse as their extension says; the message
    says where the raw bytes were kept.
    """
    ext = _extension(filename)
    try:
        if ext in _DECODERS:
            _, kind, reader = _DECODERS[ext]
            return DecodedFile(reader(data), kind)
        if ext in _TEXT_EXTS:
            return DecodedFile(data.decode("utf-8-sig"), "text")
        if ext in _IMAGE_MIME:
            return DecodedFile(_image_or_bytes(data), "image", _IMAGE_MIME[ext])
    except Exception as exc:
        label = _DECODERS[ext][0] if ext in _DECODERS else "text (UTF-8)" if ext in _TEXT_EXTS else "an image"
        where = f" at {kept_at}" if kept_at is not None else ""
        missing = f" (install `{exc.name}` to read it)" if isinstance(exc, ImportError) and exc.name else ""
        raise ContainerFileError(
            f"{filename} could not be read as {label}{missing}: {type(exc).__name__}: {str(exc)[:300]}. "
            f"The raw bytes were kept{where}; open them yourself, or ask the model to write the file again."
        ) from exc
    return DecodedFile(data, "bytes")


def _image_or_bytes(data: bytes) -> Any:
    try:
        from PIL import Image
    except ImportError:
        return data
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now so a truncated file fails here, not later in the user's code
    return image
