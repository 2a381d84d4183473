"""ci-magic: a code interpreter in every notebook.

``%load_ext ci_magic`` registers ``%%ci``/``%ci``, ``%%ci_exec``, ``%ci_push``, ``%ci_pull``,
``%ci_files``, ``%ci_status`` and ``%ci_reset``. Outside IPython, use ``CodeInterpreter`` directly.
"""

from __future__ import annotations

import atexit
from typing import Any

from ci_magic.errors import (
    BackendError,
    CIError,
    ConfigurationError,
    ContainerFileError,
    SandboxError,
    StreamError,
    VariableError,
)
from ci_magic.interpreter import CodeInterpreter
from ci_magic.result import CallRecord, Result, SavedFile

__all__ = [
    "BackendError",
    "CIError",
    "CallRecord",
    "CodeInterpreter",
    "ConfigurationError",
    "ContainerFileError",
    "Result",
    "SandboxError",
    "SavedFile",
    "StreamError",
    "VariableError",
    "load_ipython_extension",
    "unload_ipython_extension",
]

__version__ = "0.1.0"


def load_ipython_extension(shell: Any) -> None:
    from ci_magic.magics import CIMagics

    magics = CIMagics(shell)
    shell.register_magics(magics)
    # Kernel shutdown runs atexit handlers: the container goes with the kernel (configurable).
    atexit.register(magics.interpreter.close)


def unload_ipython_extension(shell: Any) -> None:
    magics = shell.magics_manager.registry.pop("CIMagics", None)
    if magics is not None:
        atexit.unregister(magics.interpreter.close)
        magics.interpreter.close()
