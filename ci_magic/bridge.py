"""The one place where synchronous callers (magics, the plain Python API) run our coroutines.

Why nest-asyncio2: ipykernel runs its own asyncio loop in the main thread while a cell executes,
and our async clients (openai's, jupyter_client's) must keep living on one loop across cells.
Re-entering the kernel's loop keeps everything in the main thread, so IPython's ``display`` and
Ctrl-C (SIGINT -> KeyboardInterrupt in the main thread) behave as in any other cell. ipykernel 7
itself depends on nest-asyncio2, the maintained fork of nest-asyncio (archived in 2024, broken on
Python 3.12+ loop internals), so this adds no new package to a kernel. Where no loop runs
(terminal IPython, scripts) we keep one private loop for the life of the process rather than
calling ``asyncio.run`` per cell, which would close the loop our clients are bound to.

Ctrl-C: re-entering the kernel's loop also runs the kernel's own tasks (its message handlers, its
output flushing) inside our call. A KeyboardInterrupt raised wherever the main thread happens to
be would as likely land in one of those and kill it, leaving the kernel unable to answer: the cell
never ends. So while our coroutine runs, SIGINT cancels *our* task, as ``asyncio.Runner`` does;
the KeyboardInterrupt is raised once it has unwound. A second Ctrl-C raises at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from types import FrameType
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

    On Ctrl-C the task is cancelled and given the chance to unwind (close its HTTP stream, record
    what arrived). If it handles the cancellation and returns (a turn returns its Result, marked
    interrupted) that is returned; otherwise KeyboardInterrupt is raised.
    """
    loop = current_loop()
    task = loop.create_task(coro)
    with _sigint_cancels(task, loop) as interrupts:
        try:
            return loop.run_until_complete(task)
        except KeyboardInterrupt:  # raised elsewhere (no handler of ours could be installed)
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
            if task.done() and not task.cancelled() and task.exception() is None:
                return task.result()
            raise
        except asyncio.CancelledError:
            if interrupts:
                raise KeyboardInterrupt from None
            raise


@contextlib.contextmanager
def _sigint_cancels(task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> Iterator[list[int]]:
    """While inside, the first SIGINT cancels ``task`` instead of raising wherever Python is; the
    yielded list records each interrupt. Only where Python's own handler is in force (a kernel
    executing a cell, a script) and only from the main thread, which signal handlers require."""
    interrupts: list[int] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupts
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupts.append(signum)
        if len(interrupts) == 1 and not task.done():
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake a loop blocked in select()
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)
