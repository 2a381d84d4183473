"""A sandbox kernel that dies closes its sockets a moment before its outer process can be waited for.

The host sees the connection drop first, as it does for a message over the size limit. Seen for
real: the watchdog killed a 1g container's kernel over its memory budget and the user was told the
sandbox had sent a message larger than 64 MiB. These tests replay that order of events with a
kernel double (the real order depends on the machine's load) and check what the user is told.
"""

from __future__ import annotations

import asyncio
import time
from queue import Empty
from typing import Any

from ci_magic.backends.local.budget import Breach
from ci_magic.backends.local.kernel import DEATH_GRACE, execute
from ci_magic.events import CallStatus, Event, ExecutionError, Notice

KILLED = "was killed because the container held 1.7 GiB, over its memory budget"


class SilentClient:
    """A kernel client whose code prints nothing: every wait for output times out, unless the code
    ``finishes`` (then the request's idle status and reply come)."""

    def __init__(self) -> None:
        self.finishes = False

    def execute(self, code: str, **options: Any) -> str:
        return "msg-1"

    async def get_iopub_msg(self, timeout: float) -> dict[str, Any]:
        if self.finishes:
            return {
                "header": {"msg_type": "status"},
                "parent_header": {"msg_id": "msg-1"},
                "content": {"execution_state": "idle"},
            }
        await asyncio.sleep(min(timeout, 0.05))
        raise Empty

    async def get_shell_msg(self, timeout: float) -> dict[str, Any]:
        return {"parent_header": {"msg_id": "msg-1"}, "content": {"status": "ok"}}


class DyingKernel:
    """A kernel whose connection drops at ``drops_at`` and whose process is gone ``exits_after`` later."""

    def __init__(self, *, drops_at: float, exits_after: float | None) -> None:
        self.client = SilentClient()
        self.drops_at = time.monotonic() + drops_at
        self.exits_at = None if exits_after is None else self.drops_at + exits_after
        self.restarts = 0

    def is_alive(self) -> bool:
        return self.exits_at is None or time.monotonic() < self.exits_at

    def connection_dropped(self) -> bool:
        if time.monotonic() < self.drops_at:
            return False
        self.drops_at = float("inf")  # the monitor's event is read once
        return True

    def death_reason(self) -> str:
        return KILLED

    async def restart(self) -> None:
        """A new kernel, which runs code to its end."""
        self.restarts += 1
        self.drops_at, self.exits_at = float("inf"), None
        self.client.finishes = True

    async def interrupt(self) -> None: ...

    async def stop_strays(self) -> None: ...

    async def measure_disk(self) -> None: ...

    def take_breaches(self) -> list[Breach]:
        return []

    def begin_execution(self) -> None: ...

    def end_execution(self) -> None: ...


def run(kernel: DyingKernel) -> list[Event]:
    async def collect() -> list[Event]:
        return [e async for e in execute(kernel, "hoard()", call_id="c", timeout=30)]  # type: ignore[arg-type]

    return asyncio.run(collect())


def test_a_kernel_killed_mid_run_is_reported_as_killed_not_as_an_oversized_message() -> None:
    events = run(DyingKernel(drops_at=0.3, exits_after=0.5))
    (error,) = [e for e in events if isinstance(e, ExecutionError)]
    assert error.name == "SandboxRestarted" and KILLED in error.value, error
    assert "larger than" not in error.value
    assert events[-1] == CallStatus("c", "failed")


def test_a_kernel_killed_between_runs_is_reported_as_killed_at_the_next_run() -> None:
    kernel = DyingKernel(drops_at=0.0, exits_after=0.5)
    events = run(kernel)
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and KILLED in notices[0] and "larger than" not in notices[0], notices
    assert kernel.restarts == 1 and events[-1] == CallStatus("c", "completed"), events


def test_a_dropped_connection_from_a_kernel_that_lives_on_is_an_oversized_message() -> None:
    started = time.monotonic()
    events = run(DyingKernel(drops_at=0.3, exits_after=None))
    (error,) = [e for e in events if isinstance(e, ExecutionError)]
    assert error.name == "MessageTooLarge" and "larger than 64 MiB" in error.value, error
    assert time.monotonic() - started >= 0.3 + DEATH_GRACE, "it waited for the kernel to show it was dying"
