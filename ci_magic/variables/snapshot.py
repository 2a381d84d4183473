"""Proof, checked in O(columns), that a pandas object has not changed since it was fingerprinted.

Hashing a frame's buffers costs ~20 ms per 75 MB: a tenth of encoding it, and more than a re-push
should cost when the file goes to a local sandbox in a few milliseconds. Under Copy-on-Write
(always on from pandas 3) there is a cheaper proof. A snapshot keeps a shallow copy of the user's
frame, so every buffer of the frame is shared; pandas then copies a buffer before any write to it,
and the frame ends up with new buffer addresses. Raw numpy views of a frame are read-only under
CoW, so writes that bypass pandas fail instead of going unnoticed. Same object, same index and
column labels, same buffer addresses: same content.

The price: when the user edits the frame in place after a push, pandas copies the edited blocks
rather than writing in place, and the snapshot keeps the old ones until the next push of that
variable (or until the frame itself is garbage). That is why only frames up to
``SNAPSHOT_MAX_BYTES`` get one, and why columns whose buffers cannot be compared this way (Python
objects, nullable masks) make a frame fall back to hashing.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

__all__ = ["SNAPSHOT_MAX_BYTES", "FrameSnapshot", "copy_on_write"]

SNAPSHOT_MAX_BYTES = 256 * 2**20

Addresses = tuple[object, ...]


def copy_on_write() -> bool:
    """Whether pandas copies shared buffers before writing (the premise of a snapshot)."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) >= 3:
        return True
    try:
        return pd.get_option("mode.copy_on_write") is True
    except (KeyError, pd.errors.OptionError):
        return False


def _column_addresses(values: Any) -> object | None:
    """Where a column's data lives, or None when that cannot prove it unchanged."""
    import pandas as pd

    dtype = values.dtype
    if isinstance(values, pd.arrays.NumpyExtensionArray) or isinstance(dtype, np.dtype):
        arr = np.asarray(values)
        if arr.dtype.kind == "O":  # the cells are mutable Python objects
            return None
        return (arr.__array_interface__["data"][0], arr.strides, arr.shape, arr.dtype.str)
    if isinstance(dtype, pd.CategoricalDtype):
        codes = np.asarray(values.codes)
        return (codes.__array_interface__["data"][0], codes.shape, dtype)
    if isinstance(values, (pd.arrays.IntegerArray, pd.arrays.FloatingArray, pd.arrays.BooleanArray)):
        # pandas keeps no public view of these two arrays; if they move, hashing takes over.
        data, mask = getattr(values, "_data", None), getattr(values, "_mask", None)
        if not (isinstance(data, np.ndarray) and isinstance(mask, np.ndarray)):
            return None
        return tuple((p.__array_interface__["data"][0], p.shape, p.dtype.str) for p in (data, mask))
    if hasattr(values, "asi8"):  # tz-aware datetimes, periods
        ticks = values.asi8
        return (ticks.__array_interface__["data"][0], ticks.shape, str(dtype))
    if isinstance(dtype, pd.ArrowDtype) or (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
        # Arrow buffers are immutable: a write makes a new array, with new buffers.
        chunks = values.__arrow_array__().chunks
        return tuple((c.offset, len(c), *(b.address for b in c.buffers() if b is not None)) for c in chunks)
    return None


def _addresses(frame: Any) -> Addresses | None:
    import pandas as pd

    columns = [frame.array] if isinstance(frame, pd.Series) else [c.array for _, c in frame.items()]
    found = []
    for values in columns:
        where = _column_addresses(values)
        if where is None:
            return None
        found.append(where)
    return tuple(found)


class FrameSnapshot:
    """Remembers a DataFrame/Series and its digest; ``matches`` says whether it is still the same."""

    def __init__(self, frame: Any, digest: str, addresses: Addresses) -> None:
        import pandas as pd

        self.digest = digest
        self._frame = weakref.ref(frame)
        self._index = frame.index
        self._labels = frame.name if isinstance(frame, pd.Series) else frame.columns
        self._addresses = addresses
        # The shallow copy is what makes pandas copy before writing; dropped with the user's frame.
        self._held = [frame.copy(deep=False)]
        self._finalizer = weakref.finalize(frame, self._held.clear)

    @classmethod
    def take(cls, frame: Any, digest: str) -> FrameSnapshot | None:
        """A snapshot of ``frame``, or None when it cannot prove anything (no CoW, too big, objects)."""
        if not copy_on_write():
            return None
        if int(np.sum(frame.memory_usage(index=True, deep=False))) > SNAPSHOT_MAX_BYTES:
            return None
        addresses = _addresses(frame)
        return cls(frame, digest, addresses) if addresses is not None else None

    def matches(self, frame: Any) -> bool:
        import pandas as pd

        if not self._held or frame.index is not self._index:
            return False
        labels = frame.name if isinstance(frame, pd.Series) else frame.columns
        same_object = self._frame() is frame  # last: it narrows ``frame`` for the type checker
        return labels is self._labels and _addresses(frame) == self._addresses and same_object

    def release(self) -> None:
        """Let go of the shallow copy now (the registry replaced or dropped this snapshot)."""
        self._finalizer.detach()
        self._held.clear()
