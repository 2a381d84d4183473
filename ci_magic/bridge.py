"""The one place where synchronous callers (magics, the plain Python API) run our coroutines.

Why nest-asyncio2: ipykernel runs its own asyncio loop in the main thread while a cell executes,
and our async clients (openai's, jupyter_client's) must keep living on one loop across cells.
Re-entering the kernel's loop keeps everything in the main thread, so IPython's ``display`` and
Ctrl-C (SIGINT -> KeyboardInterrupt in the main thread) behave as in any other cell. ipykernel 7
itself depends on nest-asyncio2, the maintained fork of nest-asyncio (archived in 2024, broken on
Python 3.12+ loop internals), so this adds no new package to a kernel. Where no loop runs
(terminal IPython, scripts) we keep one private loop for the life of the process rather than
calling ``asyncio.run`` per cell, which would close the loop our clients are bound to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import nest_asyncio2

__all__ = ["current_loop", "run_sync"]

T = TypeVar("T")

_private_loop: asyncio.AbstractEventLoop | None = None


def current_loop() -> asyncio.AbstractEventLoop:
    """The loop ``run_sync`` will use from this thread now."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        global _private_loop
        if _private_loop is None or _private_loop.is_closed():
            _private_loop = asyncio.new_event_loop()
        return _private_loop
    if not getattr(loop, "_nest_patched", False):
        nest_asyncio2.apply(loop)
    return loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code.

    On KeyboardInterrupt the task is cancelled and given the chance to unwind (close its HTTP
    stream, record what arrived) before the interrupt propagates.
    """
    loop = current_loop()
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        raise
