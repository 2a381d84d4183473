"""User-facing errors: one paragraph, no traceback from our code.

::

    CIError                      base; IPython prints ``_render_traceback_()`` instead of a traceback
    ├── ConfigurationError       no key / no model server / bad setting
    ├── BackendError             the API or backend refused or failed (its own message kept)
    │   └── StreamError          a stream broke mid-way (what arrived stays on screen)
    ├── SandboxError             the local sandbox could not start, died, or hit a limit
    ├── VariableError            unknown variable, unsupported type, over the size cap
    ├── ContainerFileError       a file missing from the container, unsafe name, undecodable
    │   └── FileTooLarge         a container file over the download cap (nothing was written)
    └── Interrupted              Ctrl-C during a turn or a transfer (nothing was lost)

A turn's error carries what the turn produced before it failed (``error.result``).
Anything else raised from ci_magic is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ci_magic.result import Result

__all__ = [
    "BackendError",
    "CIError",
    "ConfigurationError",
    "ContainerFileError",
    "FileTooLarge",
    "Interrupted",
    "SandboxError",
    "StreamError",
    "VariableError",
    "for_scripts",
]


class CIError(Exception):
    """Base class of ci-magic's user-facing errors."""

    title = "ci-magic"
    result: Result | None = None  # a failed turn: everything it produced before it failed

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of formatting a traceback (see IPython.core.interactiveshell).
        # One line, never hard-wrapped: the notebook or terminal wraps it, and a command in it
        # (%config CodeInterpreter.model_base_url = "http://...") stays copyable in one piece.
        return [f"{self.title}: {self.message}"]

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


class Interrupted(CIError):
    """Ctrl-C (or the kernel's interrupt) during a turn or a transfer."""


# `%config CodeInterpreter.name = value` (value optional): what a notebook user types.
_CONFIG_COMMAND = re.compile(r'%config CodeInterpreter\.(\w+)(?: = ("[^"]*"|[\w.\-]*\w|\.\.\.))?')


def for_scripts(message: str) -> str:
    """``message`` with notebook commands said the plain-Python way (``CodeInterpreter(model=...)``)."""

    def keyword(match: re.Match[str]) -> str:
        return f"CodeInterpreter({match.group(1)}={match.group(2) or '...'})"

    message = _CONFIG_COMMAND.sub(keyword, message)
    return message.replace("%ci_reset", "ci.reset()").replace(
        "%reload_ext ci_magic", "a new CodeInterpreter()"
    )
