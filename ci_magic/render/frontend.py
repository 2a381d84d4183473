"""Where rendered output goes: Jupyter display handles, or plain text on a terminal.

The live view opens *slots* (one per status line, call block, image, text segment, file...) and
updates them in place. Each slot has a role that only matters to a terminal, which cannot
redraw what it printed:

- ``status``: a transient line; on a tty it is redrawn in place with ``\\r``, otherwise only its
  final text is printed.
- ``stream``: text that grows (a call's code and logs); complete lines print as they arrive.
- ``text``: the assistant's answer; held until another slot opens or it is final, so file links
  are already local when it prints.
- ``output``: complete content (an image, a table, a notice); printed when opened.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, Literal, Protocol, TextIO

from ci_magic.render.safe_html import outgoing_bundle, strip_ansi

__all__ = [
    "OUTPUT_METADATA",
    "Frontend",
    "JupyterFrontend",
    "MimeBundle",
    "Slot",
    "SlotRole",
    "TerminalFrontend",
    "detect_frontend",
]

MimeBundle = dict[str, Any]
# Not a mime type: a bundle's output metadata (the turn's provenance). Jupyter sends it as the
# display's metadata, so it is saved in the .ipynb; other frontends ignore it.
OUTPUT_METADATA = "ci_magic/output-metadata"
SlotRole = Literal["status", "stream", "text", "output"]


class Slot(Protocol):
    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        """Replace what the slot shows (``final``: nothing will change after this)."""


class Frontend(Protocol):
    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> Slot:
        """Show a new output below the previous ones and return the handle that updates it."""


def detect_frontend() -> Frontend:
    """Jupyter display messages inside a kernel (Lab, Notebook, VS Code, nbclient); text otherwise."""
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python without IPython
        return TerminalFrontend()
    shell = get_ipython()
    if shell is not None and (
        type(shell).__name__ == "ZMQInteractiveShell" or getattr(shell, "kernel", None) is not None
    ):
        return JupyterFrontend()
    return TerminalFrontend()


# -- Jupyter ---------------------------------------------------------------------------------------


class _JupyterSlot:
    def __init__(self, handle: Any, bundle: MimeBundle) -> None:
        self._handle = handle
        self._shown = bundle

    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        if bundle == self._shown:
            return  # an unchanged update is a wasted message to every connected frontend
        self._shown = bundle
        data, metadata = _split_metadata(bundle)
        self._handle.update(outgoing_bundle(data), raw=True, metadata=metadata)


class JupyterFrontend:
    """``display(bundle, raw=True, display_id=True)`` and ``handle.update``: ordinary display data.

    What stays in the cell is plain ``display_data`` (updated in place through
    ``update_display_data``), so saved notebooks, nbconvert and GitHub show the final state.
    Every bundle's HTML gets a last nh3 pass on its way out (``outgoing_bundle``): this is the one
    door to the user's page, so it holds even if a renderer upstream forgot to sanitize.
    """

    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> Slot:
        from IPython.display import display

        data, metadata = _split_metadata(bundle)
        handle = display(outgoing_bundle(data), raw=True, display_id=True, metadata=metadata)
        return _JupyterSlot(handle, bundle)


def _split_metadata(bundle: MimeBundle) -> tuple[MimeBundle, dict[str, Any] | None]:
    if OUTPUT_METADATA not in bundle:
        return bundle, None
    data = {mime: value for mime, value in bundle.items() if mime != OUTPUT_METADATA}
    metadata = bundle[OUTPUT_METADATA]
    return data, dict(metadata) if isinstance(metadata, dict) else None


# -- terminal --------------------------------------------------------------------------------------


class _TerminalSlot:
    def __init__(self, frontend: TerminalFrontend, role: SlotRole) -> None:
        self._frontend = frontend
        self.role = role
        self.text = ""
        self.printed: list[str] = []  # lines already written
        self.final = False
        self.released = role != "text"

    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        self.text = _plain(bundle)
        self.final = self.final or final
        self._frontend._changed(self)

    def pending_lines(self) -> list[str]:
        """Lines to print now: the new tail, or everything from the first line that changed."""
        lines = self.text.rstrip("\n").split("\n") if self.text.strip() else []
        if self.role in ("stream", "text") and not self.final and not self.text.endswith("\n"):
            lines = lines[:-1]  # the line being written; print it once complete
        same = 0
        for old, new in zip(self.printed, lines, strict=False):
            if old != new:
                break
            same += 1
        if same == len(lines) and same <= len(self.printed):
            return []
        self.printed = lines
        return lines[same:]


class TerminalFrontend:
    """Readable plain text: each slot's ``text/plain``, printed once, in order.

    No HTML, no JSON, no colours. On a tty the status line is redrawn in place with a carriage
    return and spaces (no escape sequences); elsewhere (pipes, logs) only its final text prints.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        isatty = getattr(self._stream, "isatty", None)
        self._tty = tty if tty is not None else bool(isatty and isatty())
        self._slots: list[_TerminalSlot] = []
        self._status_width = 0  # characters of the transient status line on screen
        self._status_line = ""  # redrawn below whatever else prints while the turn runs

    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> Slot:
        slot = _TerminalSlot(self, role)
        if role not in ("status", "text"):
            # Something new follows the answer: the answer so far belongs above it.
            for held in self._slots:
                if not held.released:
                    held.released = True
                    self._print(held)
        self._slots.append(slot)
        slot.update(bundle, final=final)
        return slot

    def _changed(self, slot: _TerminalSlot) -> None:
        if slot.role == "status":
            if slot.final:
                self._status_line = ""
                self._write_lines(slot.text.strip().split("\n"))
            elif self._tty:
                self._status_line = slot.text.strip().split("\n")[0]
                self._draw_status()
            return
        if slot.final:
            slot.released = True
        if slot.released:
            self._print(slot)

    def _print(self, slot: _TerminalSlot) -> None:
        lines = slot.pending_lines()
        if lines:
            self._write_lines(lines)

    def _write_lines(self, lines: list[str]) -> None:
        self._clear_status()
        self._stream.write("\n".join(lines) + "\n")
        if self._status_line:
            self._draw_status()
        self._stream.flush()

    def _draw_status(self) -> None:
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        line = self._status_line[:width]
        self._stream.write("\r" + line.ljust(self._status_width))
        self._stream.flush()
        self._status_width = len(line)

    def _clear_status(self) -> None:
        if self._status_width:
            self._stream.write("\r" + " " * self._status_width + "\r")
            self._status_width = 0


def _plain(bundle: MimeBundle) -> str:
    # The last step before the terminal: no escape sequence, C1 or bidi control gets through,
    # whichever upstream path the text took.
    text = bundle.get("text/plain")
    return strip_ansi(text) if isinstance(text, str) else ""
