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
    Interrupted,
    SandboxError,
    StreamError,
    VariableError,
)
from ci_magic.interpreter import CodeInterpreter, Status
from ci_magic.result import CallRecord, Result, SavedFile

__all__ = [
    "BackendError",
    "CIError",
    "CallRecord",
    "CodeInterpreter",
    "ConfigurationError",
    "ContainerFileError",
    "Interrupted",
    "Result",
    "SandboxError",
    "SavedFile",
    "Status",
    "StreamError",
    "VariableError",
    "load_ipython_extension",
    "unload_ipython_extension",
]

__version__ = "0.1.0"


def load_ipython_extension(shell: Any) -> None:
    from ci_magic.magics import CIMagics, line_prompts_keep_question_marks

    magics = CIMagics(shell)
    shell.register_magics(magics)
    if line_prompts_keep_question_marks not in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.append(line_prompts_keep_question_marks)
    # Kernel shutdown runs atexit handlers: the container goes with the kernel (configurable).
    atexit.register(magics.interpreter.close)


def unload_ipython_extension(shell: Any) -> None:
    from ci_magic.magics import line_prompts_keep_question_marks

    if line_prompts_keep_question_marks in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(line_prompts_keep_question_marks)
    magics = shell.magics_manager.registry.pop("CIMagics", None)
    if magics is not None:
        atexit.unregister(magics.interpreter.close)
        magics.interpreter.close()
