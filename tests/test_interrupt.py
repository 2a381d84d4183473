"""Ctrl-C (a kernel interrupt) during a streaming %%ci cell stops it within a second; nothing is lost."""

from __future__ import annotations

import queue
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

from tests.notebook_support import kernel_env, openai_env

SLOW_PROMPT = "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"


def execute(client, code: str, *, timeout: float = 60, on_output=None) -> tuple[dict, list[dict]]:
    """Run ``code``; returns the execute_reply content and the iopub messages of that request."""
    msg_id = client.execute(code)
    outputs: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty as error:
            raise AssertionError(f"no idle status for {code!r} within {timeout}s") from error
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        outputs.append(msg)
        if on_output is not None:
            on_output(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    while True:  # the reply to this request (not one left over from an earlier one)
        reply = client.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"], outputs


def test_interrupt_during_stream_keeps_kernel_container_and_conversation(
    openai_server, tmp_path: Path
) -> None:
    with kernel_env(**openai_env(openai_server.url)):
        manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        reply, _ = execute(client, "%load_ext ci_magic")
        assert reply["status"] == "ok"
        reply, _ = execute(client, "%%ci\nWhat is in /mnt/data?")
        assert reply["status"] == "ok"
        _, printed = execute(client, "print(_ci.response_id)")
        first_response_id = "".join(
            m["content"].get("text", "") for m in printed if m["msg_type"] == "stream"
        ).strip()
        assert first_response_id.startswith("resp_")

        openai_server.event_delay = 0.1  # ~230 events: the turn would take over 20 s
        interrupted_at: list[float] = []

        def interrupt_once_streaming(msg: dict) -> None:
            if msg["msg_type"] in ("display_data", "update_display_data") and not interrupted_at:
                time.sleep(0.5)
                interrupted_at.append(time.monotonic())
                manager.interrupt_kernel()

        reply, outputs = execute(client, SLOW_PROMPT, on_output=interrupt_once_streaming)
        stopped_after = time.monotonic() - interrupted_at[0]
        print(f"stopped {stopped_after:.3f} s after the interrupt")
        assert stopped_after < 1.5, f"the cell took {stopped_after:.2f}s to stop after the interrupt"
        assert reply["status"] == "error"
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert len(errors) == 1
        assert len(errors[0]["traceback"]) <= 3, errors[0]["traceback"]  # one paragraph, no traceback
        assert "Interrupted" in " ".join(errors[0]["traceback"])

        openai_server.event_delay = 0.0
        reply, _ = execute(client, "%%ci\nWhat is in /mnt/data now?")
        assert reply["status"] == "ok", "the kernel and the session are usable after the interrupt"
        requests = openai_server.requests_to("/v1/responses", "POST")
        containers = {r.json["tools"][0]["container"] for r in requests}
        assert len(containers) == 1, "the same container serves every cell"
        # The interrupted turn never completed, so the conversation continues from the first cell.
        assert requests[-1].json["previous_response_id"] == first_response_id
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_kernel_shutdown_deletes_the_container(openai_server, tmp_path: Path) -> None:
    with kernel_env(**openai_env(openai_server.url)):
        manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        execute(client, "%load_ext ci_magic")
        reply, _ = execute(client, "%%ci\nWhat is in /mnt/data?")
        assert reply["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)  # a graceful shutdown, as Jupyter's "Shut Down Kernel"
    created = openai_server.requests_to("/v1/containers", "POST")[0]
    container_id = openai_server.requests_to("/v1/responses", "POST")[0].json["tools"][0]["container"]
    assert created.status == 200
    deletes = [r for r in openai_server.requests if r.method == "DELETE"]
    assert [d.path for d in deletes] == [f"/v1/containers/{container_id}"]


def test_ctrl_c_stops_our_coroutine_and_never_lands_in_the_kernels_own_tasks() -> None:
    """Re-entering the kernel's loop runs the kernel's own tasks inside our call: Ctrl-C must stop
    ours, not kill one of theirs (a dead message handler leaves the cell stuck for ever)."""
    import asyncio
    import os
    import signal
    import threading

    from ci_magic.bridge import run_sync

    async def kernel_busy() -> None:  # stands for the kernel's handlers, which run Python code
        while True:
            sum(range(20_000))
            await asyncio.sleep(0)

    async def our_turn() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "interrupted, what arrived is kept"
        return "finished"

    async def cell() -> tuple[str, asyncio.Task]:
        # ipykernel puts Python's own handler in force while a cell executes.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        kernel = asyncio.ensure_future(kernel_busy())
        await asyncio.sleep(0.05)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        outcome = run_sync(our_turn())  # nested in the running loop, as in a kernel
        assert time.monotonic() - started < 5
        return outcome, kernel

    previous = signal.getsignal(signal.SIGINT)
    with asyncio.Runner() as runner:
        try:
            outcome, kernel = runner.run(cell())
            assert outcome == "interrupted, what arrived is kept"
            assert not kernel.done(), "the kernel's own task survived the interrupt"
            kernel.cancel()
        finally:
            signal.signal(signal.SIGINT, previous)
