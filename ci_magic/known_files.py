"""KnownFiles: what a session has learnt about its container's files, beyond what a listing says.

- **seen**: ids of files already known, so a turn downloads only what is new (cleared with each
  new container; a reattached or restored container's files are learnt without downloading);
- **sizes**: bytes of each file saved locally, since some listings leave the size out (OpenAI's
  for files the model wrote), and a displayed image's size, as it is not downloaded;
- **written by %%ci_exec**: those files are the user's own code's, listed as "notebook", not "model".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ci_magic.backends.base import ContainerFile
from ci_magic.result import Result
from ci_magic.variables.transfer import FileRow

__all__ = ["KnownFiles"]


class KnownFiles:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._written_by_exec: set[str] = set()

    def learn(self, listing: Iterable[ContainerFile]) -> None:
        """These files exist already: no later turn treats them as new."""
        self.seen.update(f.id for f in listing)

    def is_new(self, file: ContainerFile) -> bool:
        """A file the model (or its code) wrote since the container was last listed."""
        return file.id not in self.seen and file.source != "user"

    def new_container(self) -> None:
        self.seen.clear()

    def record_turn(self, result: Result, *, by_exec: bool) -> None:
        """The sizes of the files ``result`` saved and displayed; ``by_exec``: ``%%ci_exec`` wrote them."""
        for saved in result.files:
            if saved.file_id:
                self._sizes[saved.file_id] = saved.size
                if by_exec:
                    self._written_by_exec.add(saved.file_id)
        # Images cited as displayed are not downloaded: their size is the displayed image's (in order).
        shown = [c.file_id for c in result.citations if c.displayed]
        images = (data for call in result.calls for data in call.images)
        for file_id, data in zip(shown, images, strict=False):
            self._sizes[file_id] = len(data)

    def describe(self, row: FileRow) -> FileRow:
        """A listing row with what the session knows: its size once saved, and who wrote it."""
        size = row.size if row.size is not None else self._sizes.get(row.file_id)
        source = "notebook" if row.file_id in self._written_by_exec else row.source
        return dataclasses.replace(row, size=size, source=source)
