"""The one table of file formats: extension -> what the file holds, how to load it, how big it gets.

Every module that needs to know about an extension looks it up here (push codecs, the schema
card, pull decoding, previews), so a format is described once. A row says:

- ``holds``: what decoding on the host gives (``dataframe``, ``ndarray``, ``arrays``, ``json``,
  ``text``, ``image``, ``bytes``);
- ``load``: the line that loads the file *in the container* (``{var}`` and ``{path}`` filled in);
- ``read``: how the host decodes it (never unpickles), and ``decoded_size``: the memory the
  decoded object will take, estimated from the file's own metadata *before* decoding, so a small
  file that expands to gigabytes (a decompression bomb) is refused instead of loaded;
- ``preview``: how the notebook previews a saved copy (``image``: the browser shows it as is,
  ``table``, ``document``: a sandboxed frame or, for SVG, an image, ``json``); None: a link only.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "FileFormat",
    "canonical_extension",
    "extension",
    "extension_for_mime",
    "format_of",
    "is_shown_image",
    "loader_for",
    "machine_named",
]

# Bytes per row a variable-width cell (string, binary) costs once decoded, besides its characters:
# an 8-byte offset and, for pandas object strings, a pointer into a Python object.
VARIABLE_CELL_BYTES = 16


@dataclass(frozen=True)
class FileFormat:
    ext: str  # canonical extension, lower case, no dot
    label: str  # how a person names it: "Parquet"
    holds: str  # what the host decodes it to
    load: str  # the container's loader line, with {var} and {path}
    read: Callable[[Path], Any] | None = None  # None: the host keeps the bytes
    decoded_size: Callable[[Path], int] | None = None  # None: about the file's own size
    mime: str | None = None
    aliases: tuple[str, ...] = ()
    preview: str | None = None  # "image", "table", "document", "json"; None: a link only

    def loader(self, var: str, container_path: str) -> str:
        return self.load.format(var=var, path=repr(container_path))


# ---- readers (host side; every one refuses pickles) --------------------------------------------


def _pandas(reader: str, **kwargs: Any) -> Callable[[Path], Any]:
    def read(path: Path) -> Any:
        import pandas as pd

        return getattr(pd, reader)(path, **kwargs)

    return read


def _read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    # ParquetFile reads a memory-mapped file directly (read_table goes through the dataset layer,
    # ~1.5x slower here); split_blocks + self_destruct: no consolidation copy, and Arrow memory is
    # freed column by column.
    table = pq.ParquetFile(path, memory_map=True).read(use_threads=True)
    return table.to_pandas(split_blocks=True, self_destruct=True)


def _read_arrow(path: Path) -> Any:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().to_pandas(split_blocks=True, self_destruct=True)


def _read_npy(path: Path) -> Any:
    import numpy as np

    return np.load(path, allow_pickle=False)


def _read_npz(path: Path) -> dict[str, Any]:
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_bytes().decode("utf-8-sig"))


def _read_json_lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8-sig").splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def _read_image(path: Path) -> Any:
    try:
        from PIL import Image
    except ImportError:
        return path.read_bytes()
    with Image.open(path) as image:
        image.load()  # decode now so a truncated file fails here, not later in the user's code
        return image.copy()


# ---- decoded sizes, from metadata only ---------------------------------------------------------


def _arrow_row_bytes(schema: Any) -> int:
    """Bytes per row of an Arrow schema once in memory (variable-width cells at their minimum)."""
    import pyarrow as pa

    total = 0
    for field in schema:
        kind = field.type
        if pa.types.is_dictionary(kind):
            kind = kind.index_type  # the values are stored once
        try:
            total += max(1, kind.bit_width // 8)
        except ValueError:  # strings, lists, structs: no fixed width
            total += VARIABLE_CELL_BYTES
    return max(total, 1)


def _parquet_size(path: Path) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    # Dictionary and run-length pages are tiny on disk and in their "uncompressed" size; rows times
    # the row width is what decoding them allocates.
    by_rows = meta.num_rows * _arrow_row_bytes(meta.schema.to_arrow_schema())
    uncompressed = sum(
        meta.row_group(g).column(c).total_uncompressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    )
    return max(by_rows, uncompressed)


def _arrow_size(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        rows = reader.count_rows()  # reads each batch's metadata, decompresses nothing
        return rows * _arrow_row_bytes(reader.schema)


def _npy_size(path: Path) -> int:
    import numpy as np

    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)  # the header only
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize


def _zip_size(path: Path) -> int:
    """The sum of the members' uncompressed sizes (zipfile stops reading a member at its size)."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def _image_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        width, height = image.size
        return width * height * max(1, len(image.getbands()))


# ---- the table ---------------------------------------------------------------------------------

_PD = "import pandas as pd; {var} = "
_TEXT = "{var} = open({path}, encoding='utf-8').read()"
_IMAGE = "from PIL import Image; {var} = Image.open({path})"


def _table() -> dict[str, FileFormat]:
    rows = [
        FileFormat(
            "csv",
            "CSV",
            "dataframe",
            _PD + "pd.read_csv({path})",
            _pandas("read_csv"),
            mime="text/csv",
            preview="table",
        ),
        FileFormat(
            "tsv",
            "TSV",
            "dataframe",
            _PD + "pd.read_csv({path}, sep='\\t')",
            _pandas("read_csv", sep="\t"),
            preview="table",
        ),
        FileFormat(
            "parquet",
            "Parquet",
            "dataframe",
            _PD + "pd.read_parquet({path})",
            _read_parquet,
            _parquet_size,
            aliases=("pq",),
            preview="table",
        ),
        FileFormat(
            "feather",
            "Feather (Arrow IPC)",
            "dataframe",
            _PD + "pd.read_feather({path})",
            _read_arrow,
            _arrow_size,
            aliases=("arrow",),
            preview="table",
        ),
        FileFormat(
            "xlsx",
            "Excel",
            "dataframe",
            _PD + "pd.read_excel({path}, sheet_name=None)",
            _pandas("read_excel"),
            _zip_size,
            aliases=("excel",),
            preview="table",
        ),
        FileFormat(
            "xlsm",
            "Excel",
            "dataframe",
            _PD + "pd.read_excel({path}, sheet_name=None)",
            _pandas("read_excel"),
            _zip_size,
        ),
        FileFormat(
            "xls", "Excel", "dataframe", _PD + "pd.read_excel({path}, sheet_name=None)", _pandas("read_excel")
        ),
        FileFormat(
            "npy",
            "NumPy .npy (pickles refused)",
            "ndarray",
            "import numpy as np; {var} = np.load({path})",
            _read_npy,
            _npy_size,
        ),
        FileFormat(
            "npz",
            "NumPy .npz (pickles refused)",
            "arrays",
            "import numpy as np; {var} = np.load({path})",
            _read_npz,
            _zip_size,
        ),
        FileFormat(
            "json",
            "JSON",
            "json",
            "import json; {var} = json.load(open({path}, encoding='utf-8'))",
            _read_json,
            mime="application/json",
            preview="json",
        ),
        FileFormat(
            "jsonl",
            "JSON lines",
            "json",
            _PD + "pd.read_json({path}, lines=True)",
            _read_json_lines,
            aliases=("ndjson",),
        ),
        FileFormat("pdf", "PDF", "bytes", "{var} = open({path}, 'rb').read()", mime="application/pdf"),
        FileFormat(
            "pkl",
            "pickle (never loaded on the host)",
            "bytes",
            "import pickle; {var} = pickle.load(open({path}, 'rb'))",
            aliases=("pickle",),
        ),
        FileFormat("bin", "bytes", "bytes", "{var} = open({path}, 'rb').read()"),
    ]
    for ext, mime, preview in (
        ("html", "text/html", "document"),
        ("htm", "text/html", "document"),
        ("svg", "image/svg+xml", "document"),
        ("md", "text/markdown", None),
    ):
        rows.append(FileFormat(ext, "text (UTF-8)", "text", _TEXT, _read_text, mime=mime, preview=preview))
    for ext in (
        "txt",
        "log",
        "py",
        "sql",
        "rst",
        "tex",
        "yaml",
        "yml",
        "toml",
        "ini",
        "cfg",
        "xml",
        "js",
        "css",
        "sh",
        "r",
    ):
        rows.append(
            FileFormat(
                ext,
                "text (UTF-8)",
                "text",
                _TEXT,
                _read_text,
                mime="text/plain",
                aliases=("text",) if ext == "txt" else (),
            )
        )
    for ext, mime, aliases, preview in (  # previewed: the ones every browser shows in an <img>
        ("png", "image/png", (), "image"),
        ("jpg", "image/jpeg", ("jpeg",), "image"),
        ("gif", "image/gif", (), "image"),
        ("webp", "image/webp", (), None),
        ("bmp", "image/bmp", (), None),
        ("tiff", "image/tiff", ("tif",), None),
    ):
        rows.append(
            FileFormat(ext, "an image", "image", _IMAGE, _read_image, _image_size, mime, aliases, preview)
        )
    return {row.ext: row for row in rows}


FORMATS: dict[str, FileFormat] = _table()
_ALIASES = {alias: row.ext for row in FORMATS.values() for alias in row.aliases}


def extension(filename: str) -> str:
    """``'out/Sales.CSV'`` -> ``'csv'``; ``''`` when the last path part has no extension."""
    base = filename.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.strip(".") else ""


def canonical_extension(ext: str) -> str:
    """``'jpeg'`` -> ``'jpg'``, ``'pq'`` -> ``'parquet'``; anything else lower-cased as is."""
    ext = ext.lower().lstrip(".")
    return _ALIASES.get(ext, ext)


def format_of(filename: str) -> FileFormat | None:
    """The row for a file name's extension (aliases included), or None for an unknown one."""
    ext = extension(filename)
    return FORMATS.get(ext) or FORMATS.get(_ALIASES.get(ext, ""))


def extension_for_mime(mime: str, default: str = "bin") -> str:
    """``'image/jpeg'`` -> ``'jpg'``: the canonical extension a file of this type is saved under."""
    return next((row.ext for row in FORMATS.values() if row.mime == mime), default)


# The name a backend gives a file it made itself (OpenAI: ``cfile_<hex>``), not a name anyone chose.
_MACHINE_NAMED = re.compile(r"cfile_[0-9a-z]+")


def machine_named(filename: str) -> bool:
    """``'/mnt/data/cfile_69f0c0b7.png'`` -> True: the backend named it, so it is no one's variable."""
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return _MACHINE_NAMED.fullmatch(stem) is not None


def is_shown_image(filename: str) -> bool:
    """OpenAI stores each plt.show() image as ``cfile_<id>.png``; it is shown from the call's outputs."""
    return machine_named(filename) and format_of(filename) is FORMATS["png"]


def loader_for(filename: str, var: str, container_path: str) -> str:
    """The one line that loads ``filename`` in the container (raw bytes for unknown extensions)."""
    fmt = format_of(filename) or FORMATS["bin"]
    return fmt.loader(var, container_path)
