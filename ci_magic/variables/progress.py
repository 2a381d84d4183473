"""Upload/download progress: a tiny protocol, a text bar and an ipywidgets bar.

``transfer`` reports only for transfers above ``PROGRESS_THRESHOLD`` bytes. The Backend protocol
takes whole ``bytes``/``Path`` sources, so progress advances per finished file while a clock in the
message keeps moving during a long single upload.

Create a progress object in the cell's own thread (the widget is displayed there); its updates
may then come from any thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Protocol, TextIO, runtime_checkable

from ci_magic.variables.schema import format_size

__all__ = [
    "PROGRESS_THRESHOLD",
    "Progress",
    "TextProgress",
    "WidgetProgress",
    "default_progress",
]

PROGRESS_THRESHOLD = 4_000_000  # bytes: below this a transfer is quick enough to go unannounced


@runtime_checkable
class Progress(Protocol):
    def update(self, done: int, total: int, message: str) -> None:
        """``done`` of ``total`` bytes transferred; ``message`` says what is happening."""

    def close(self, message: str, *, ok: bool = True) -> None:
        """The transfer ended (``ok=False``: it failed); leave a final line."""


def _fraction(done: int, total: int) -> float:
    return min(1.0, done / total) if total > 0 else 1.0


class TextProgress:
    """A one-line bar redrawn with ``\\r`` (terminals, and Jupyter stream outputs, collapse it)."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 24, min_interval: float = 0.2) -> None:
        self._stream = stream
        self._width = width
        self._min_interval = min_interval
        self._last = 0.0
        self._shown = False
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def _line(self, done: int, total: int, message: str) -> str:
        filled = int(self._width * _fraction(done, total))
        bar = "#" * filled + "." * (self._width - filled)
        return f"[{bar}] {format_size(done)}/{format_size(total)} {message}"

    def update(self, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._shown and now - self._last < self._min_interval:
                return
            self._last, self._shown = now, True
            self.stream.write("\r" + self._line(done, total, message).ljust(79))
            self.stream.flush()

    def close(self, message: str, *, ok: bool = True) -> None:
        with self._lock:
            if not self._shown:
                return
            self.stream.write("\r" + message.ljust(79) + "\n")
            self.stream.flush()
            self._shown = False


class WidgetProgress:
    """An ipywidgets bar, displayed on the first update in the output of the cell that created it."""

    def __init__(self) -> None:
        import ipywidgets as widgets

        self._bar = widgets.IntProgress(value=0, min=0, max=1000, layout=widgets.Layout(width="240px"))
        self._label = widgets.Label(value="")
        self._box = widgets.HBox([self._bar, self._label])
        self._handle: Any = None  # displayed on the first update only: small pushes show nothing

    def update(self, done: int, total: int, message: str) -> None:
        if self._handle is None:
            from IPython.display import display

            # The event loop runs in the cell's own thread (ci_magic.bridge), so this lands in the cell.
            self._handle = display(self._box, display_id=True)
        self._bar.value = int(1000 * _fraction(done, total))
        self._label.value = f"{format_size(done)}/{format_size(total)} {message}"

    def close(self, message: str, *, ok: bool = True) -> None:
        if self._handle is None:
            return
        # What stays in the cell is plain display data, readable without the widget state.
        self._handle.update({"text/plain": message}, raw=True)
        self._box.close()


def default_progress() -> Progress:
    """The widget bar inside a Jupyter kernel with ipywidgets, a text bar anywhere else."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        try:
            return WidgetProgress()
        except ImportError:
            pass
    return TextProgress()
