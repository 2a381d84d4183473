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
    _warm_in_background(magics.interpreter)


# -- first cell fast (issue 11) ------------------------------------------------------------------
_warming: set[Any] = set()  # references to the background tasks, so they are not collected


def _warm_in_background(interpreter: CodeInterpreter) -> None:
    """With a backend that has a warm pool (local), start filling it now, while the user reads.

    Only where the kernel's event loop runs between cells (Jupyter): the task proceeds while the
    kernel is idle. Any problem is left for the first cell to report, in its own words.
    """
    import asyncio

    from ci_magic.bridge import current_loop

    try:
        if interpreter.backend != "local":
            return
    except CIError:  # a bad CI_MAGIC_BACKEND: the first cell says so, in one paragraph
        return
    loop = current_loop()
    if not loop.is_running():
        return  # terminal IPython, scripts: the first cell fills the pool

    async def warm() -> None:
        await asyncio.sleep(0.05)  # let %load_ext's cell finish first
        try:
            backend = interpreter._get_session().backend
            warm_pool = getattr(backend, "warm", None)
            if warm_pool is not None:
                await warm_pool()
        except Exception:  # the first %%ci cell reports it properly
            return

    task = loop.create_task(warm())
    _warming.add(task)
    task.add_done_callback(_warming.discard)


# -- end of first cell fast ------------------------------------------------------------------------


def unload_ipython_extension(shell: Any) -> None:
    from ci_magic.magics import line_prompts_keep_question_marks

    if line_prompts_keep_question_marks in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(line_prompts_keep_question_marks)
    magics = shell.magics_manager.registry.pop("CIMagics", None)
    if magics is not None:
        atexit.unregister(magics.interpreter.close)
        magics.interpreter.close()
