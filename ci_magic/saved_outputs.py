"""What a turn showed, kept as files in ``output_dir``: its figures, and logs too long to show whole.

The model's own files arrive by download (:mod:`~ci_magic.downloads`); these came in the stream
itself. A displayed figure becomes ``figures/<call>-<n>.<ext>`` so every frontend (a terminal, a
saved notebook without outputs) can point at it; a log past twice what the view keeps becomes
``logs/<call>-<stream>.txt``, which the view links instead of cutting it silently. A figure or log
that cannot be written is only not linked: saving never fails a turn.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ci_magic.errors import ContainerFileError
from ci_magic.events import Image
from ci_magic.filenames import save_into
from ci_magic.result import LOG_KEEP_CHARS, LogText, Result, SavedFile
from ci_magic.variables.formats import extension_for_mime

__all__ = ["save_figures", "save_long_logs"]


def save_figures(result: Result, folder: Path) -> list[SavedFile]:
    """Every image the turn's code displayed, saved into ``folder``, as displayed files."""
    saved: list[SavedFile] = []
    for call in result.calls:
        images = [o for o in call.outputs if isinstance(o, Image)]
        for number, image in enumerate(images, start=1):
            ext = extension_for_mime(image.mime, default="png")
            name = f"figures/{_short(call.call_id)}-{number}.{ext}"
            try:
                path = save_into(folder, name, image.data)
            except (ContainerFileError, OSError):
                continue
            saved.append(SavedFile(name, path, "", "", len(image.data), False, displayed=True))
    return saved


def save_long_logs(result: Result, folder: Path) -> None:
    """Output too long to show whole is kept whole in ``folder``; its ``saved_as`` says where."""
    for call in result.calls:
        for output in call.outputs:
            if isinstance(output, LogText) and output.size > 2 * LOG_KEEP_CHARS:
                name = f"logs/{_short(call.call_id)}-{output.stream}.txt"
                with contextlib.suppress(ContainerFileError, OSError):
                    output.saved_as = save_into(folder, name, output.text.encode("utf-8", "replace"))


def _short(call_id: str) -> str:
    return call_id[-8:] if len(call_id) > 8 else call_id
