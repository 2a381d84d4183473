"""Content fingerprints cheap enough to run on every ``%%ci`` cell.

A fingerprint is a BLAKE2b digest of a value's metadata (type, shape, dtypes, labels) and of a
CRC-32 per 4 MB chunk of its raw buffers, hashed on a small thread pool (zlib releases the GIL).

Why CRC-32 chunks and not a cryptographic hash of the data: measured on a 1,000,000 x 10 mixed
frame (~75 MB of buffers, 2 cores) CRC-32 runs at ~4.6 GB/s on two threads against ~2.5 GB/s for
SHA-1/SHA-256 and ~1.7 GB/s for BLAKE2b, and ``pd.util.hash_pandas_object`` takes ~200 ms. The
question asked here is "did the user's data change since the last push", not "is this data
forged": a random edit escapes a 32-bit chunk check with probability 2**-32, and any edit of at
most 32 consecutive bits is always detected. Buffers are read in place (no serialization).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zlib
from array import array
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["arrow_table_parts", "digest", "frame_parts", "ndarray_parts"]

_CHUNK = 4 << 20
_PARALLEL_ABOVE = 8 << 20
_pool: ThreadPoolExecutor | None = None

Buffer = memoryview


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="ci-fingerprint"
        )
    return _pool


def digest(meta: Iterable[object], buffers: Iterable[Buffer]) -> str:
    """One hex digest over metadata and raw byte buffers (buffer boundaries are part of it)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(list(meta)).encode("utf-8", "surrogatepass"))
    chunks: list[Buffer] = []
    for buf in buffers:
        h.update(len(buf).to_bytes(8, "little"))
        chunks.extend(buf[i : i + _CHUNK] for i in range(0, len(buf), _CHUNK))
    total = sum(len(c) for c in chunks)
    crcs = _executor().map(zlib.crc32, chunks) if total > _PARALLEL_ABOVE else map(zlib.crc32, chunks)
    h.update(array("L", crcs).tobytes())
    return h.hexdigest()


def _bytes_view(arr: np.ndarray) -> Buffer:
    # datetime64 and friends do not export the buffer protocol; a uint8 view of the same memory does.
    flat = np.ascontiguousarray(arr).reshape(-1)
    return memoryview(flat.view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs lack __buffer__


def ndarray_parts(arr: np.ndarray) -> tuple[list[object], list[Buffer]]:
    """Metadata and buffers of a numpy array without object elements."""
    return [arr.dtype.str, arr.shape], [_bytes_view(arr)]


def _arrow_parts(data: Any, meta: list[object], buffers: list[Buffer]) -> None:
    # ChunkedArray or Array; sliced arrays share their parent's buffers, so offsets go in meta.
    for chunk in getattr(data, "chunks", [data]):
        meta.append((str(chunk.type), chunk.offset, len(chunk), chunk.null_count))
        buffers.extend(memoryview(b) for b in chunk.buffers() if b is not None)
        dictionary = getattr(chunk, "dictionary", None)
        if dictionary is not None:
            _arrow_parts(dictionary, meta, buffers)


def _values_parts(values: Any, meta: list[object], buffers: list[Buffer]) -> None:
    """Parts of a pandas array (a column's or an index's values)."""
    import pandas as pd

    dtype = values.dtype
    meta.append(str(dtype))
    if isinstance(values, pd.arrays.NumpyExtensionArray):  # plain numpy columns, wrapped
        values = values.to_numpy()
        dtype = values.dtype
    if isinstance(dtype, np.dtype) and dtype.kind != "O":
        buffers.append(_bytes_view(np.asarray(values)))
    elif isinstance(dtype, pd.CategoricalDtype):
        meta.append(dtype.ordered)
        buffers.append(_bytes_view(np.asarray(values.codes)))
        _values_parts(dtype.categories.array, meta, buffers)
    elif hasattr(values, "asi8"):  # tz-aware datetimes, periods: int64 ticks underneath
        buffers.append(_bytes_view(values.asi8))
    elif hasattr(values, "__arrow_array__"):  # Arrow strings, nullable ints/bools, ArrowDtype
        _arrow_parts(values.__arrow_array__(), meta, buffers)
    else:  # object columns and exotic extension arrays: slower, but exact
        objects = np.asarray(values, dtype=object)
        try:
            buffers.append(_bytes_view(pd.util.hash_array(objects)))
        except TypeError:  # unhashable cells (dicts, lists): fall back to their serialized form
            buffers.append(memoryview(_serialized(objects.tolist())))


def _serialized(cells: list[Any]) -> bytes:
    try:
        return pickle.dumps(cells, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # unpicklable cells: their repr still changes when they do
        return repr(cells).encode("utf-8", "surrogatepass")


def _index_parts(index: Any, meta: list[object], buffers: list[Buffer]) -> None:
    import pandas as pd

    meta.append((type(index).__name__, list(index.names)))
    if isinstance(index, pd.RangeIndex):
        meta.append((index.start, index.stop, index.step))
    elif isinstance(index, pd.MultiIndex):
        for level, codes in zip(index.levels, index.codes, strict=True):
            _values_parts(level.array, meta, buffers)
            buffers.append(_bytes_view(np.asarray(codes)))
    else:
        _values_parts(index.array, meta, buffers)


def frame_parts(frame: Any) -> tuple[list[object], list[Buffer]]:
    """Metadata and buffers of a pandas DataFrame or Series: values, dtypes, labels and index."""
    import pandas as pd

    meta: list[object] = [type(frame).__name__, frame.shape]
    buffers: list[Buffer] = []
    if isinstance(frame, pd.Series):
        meta.append(repr(frame.name))
        _values_parts(frame.array, meta, buffers)
    else:
        _index_parts(frame.columns, meta, buffers)
        for _, column in frame.items():
            _values_parts(column.array, meta, buffers)
    _index_parts(frame.index, meta, buffers)
    return meta, buffers


def arrow_table_parts(table: Any) -> tuple[list[object], list[Buffer]]:
    """Metadata and buffers of a pyarrow Table (how polars frames are fingerprinted)."""
    meta: list[object] = ["arrow.Table", table.num_rows, str(table.schema)]
    buffers: list[Buffer] = []
    for column in table.columns:
        _arrow_parts(column, meta, buffers)
    return meta, buffers
