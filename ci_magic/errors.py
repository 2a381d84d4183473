"""User-facing errors: one paragraph, no traceback from our code.

::

    CIError                      base; IPython prints ``_render_traceback_()`` instead of a traceback
    ├── ConfigurationError       no key / no model server / bad setting
    ├── BackendError             the API or backend refused or failed (its own message kept)
    │   └── StreamError          a stream broke mid-way (what arrived stays on screen)
    ├── SandboxError             the local sandbox could not start, died, or hit a limit
    ├── VariableError            unknown variable, unsupported type, over the size cap
    └── ContainerFileError       a file missing from the container, unsafe name, undecodable
        └── FileTooLarge         a container file over the download cap (nothing was written)

Anything else raised from ci_magic is a bug and keeps its traceback.
"""

from __future__ import annotations

import textwrap

__all__ = [
    "BackendError",
    "CIError",
    "ConfigurationError",
    "ContainerFileError",
    "FileTooLarge",
    "SandboxError",
    "StreamError",
    "VariableError",
]


class CIError(Exception):
    """Base class of ci-magic's user-facing errors."""

    title = "ci-magic"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of formatting a traceback (see IPython.core.interactiveshell).
        text = f"{self.title}: {self.message}"
        return textwrap.wrap(text, width=100, break_long_words=False, break_on_hyphens=False) or [text]

    def __str__(self) -> str:
        return self.message


class ConfigurationError(CIError):
    title = "ci-magic configuration"


class BackendError(CIError):
    title = "ci-magic backend error"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class StreamError(BackendError):
    title = "ci-magic stream interrupted"


class SandboxError(CIError):
    title = "ci-magic sandbox"


class VariableError(CIError):
    title = "ci-magic variable"


class ContainerFileError(CIError):
    title = "ci-magic file"


class FileTooLarge(ContainerFileError):
    """A container file is over the size a download may take; it was refused before being written.

    ``size`` is what the container reported (apparent or allocated bytes, whichever is larger),
    or None when the stream simply went past ``limit``.
    """

    def __init__(self, message: str, *, size: int | None, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
