"""Red-team payload for class 3 of issue 9 (the host trusting sandbox bytes), not in the review.

The sandbox *is* the Jupyter kernel the host talks to, so it can write any message it likes on
its own iopub socket, signed with the key it was given. Nothing bounds a message before the host
receives and decodes it: one 100 MiB ``stream`` message costs the user's process (the notebook
kernel; here the attack driver) several times that in memory, and arrives as one event with the
whole text. ``xfail(strict=True)`` until the hole is closed.
"""

from __future__ import annotations

import time

from tests.security.sandbox_support import Attacker, errors, final_status, notices, stdout

MIB = 1 << 20
MESSAGE_MIB = 100


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_one_huge_message_on_the_kernels_own_socket_costs_the_host_little(attacker: Attacker) -> None:
    attacker.start(execution_timeout=120)
    attacker.create("1g")
    before = peak_rss(attacker.process.pid)
    forge = (
        "kernel = get_ipython().kernel\n"
        f"text = 'Z' * ({MESSAGE_MIB} * 2**20)\n"
        "kernel.session.send(kernel.iopub_socket, 'stream', {'name': 'stdout', 'text': text},\n"
        "                    parent=kernel.get_parent('shell'))\n"
        "del text\n"
    )
    events = attacker.execute(forge, timeout=120)
    grown = peak_rss(attacker.process.pid) - before
    longest = max((len(e.get("text") or "") for e in events), default=0)
    assert grown < 100 * MIB and longest < 16 * MIB, (
        f"one {MESSAGE_MIB} MiB message from the sandbox grew the host process by {grown // MIB} MiB "
        f"and arrived as an event of {longest // MIB} MiB of text"
    )


def test_an_oversized_message_is_dropped_and_the_user_told_in_one_line(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    attacker.execute("open('keep.txt', 'w').write('kept')")
    forge = (
        "kernel = get_ipython().kernel\n"
        "kernel.session.send(kernel.iopub_socket, 'display_data',\n"
        "                    {'data': {'text/plain': 'Z' * (80 * 2**20)}, 'metadata': {}},\n"
        "                    parent=kernel.get_parent('shell'))\n"
    )
    events = attacker.execute(forge, timeout=60)
    (error,) = errors(events)
    assert error["name"] == "MessageTooLarge", error
    assert "64 MiB" in error["value"] and "\n" not in error["value"], error
    assert final_status(events) == "failed"
    assert stdout(attacker.execute("print(open('keep.txt').read())")) == "kept\n"


def test_a_long_stream_message_under_the_size_limit_arrives_whole_in_events_of_a_few_mib(
    attacker: Attacker,
) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    forge = (
        "kernel = get_ipython().kernel\n"
        "text = 'head' + 'Z' * (40 * 2**20) + 'tail'\n"
        "kernel.session.send(kernel.iopub_socket, 'stream', {'name': 'stdout', 'text': text},\n"
        "                    parent=kernel.get_parent('shell'))\n"
    )
    events = attacker.execute(forge, timeout=60)
    shown = stdout(events)
    # Nothing printed is lost (the whole log is saved); no single event is bigger than 2 MiB, and
    # what a call's log holds in host memory is bounded by LogText (tests/test_session.py).
    assert shown.startswith("head") and shown.endswith("tail") and len(shown) == 40 * MIB + 8
    assert max(len(e["text"]) for e in events if e["type"] == "Logs") <= 2 * MIB
    assert final_status(events) == "completed"


def test_an_oversized_message_sent_between_runs_is_reported_at_the_next_one(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    later = (
        "import threading, time\n"
        "kernel = get_ipython().kernel\n"
        "def send():\n"
        "    time.sleep(1)\n"
        "    content = {'name': 'stdout', 'text': 'Z' * (80 * 2**20)}\n"
        "    kernel.session.send(kernel.iopub_socket, 'stream', content)\n"
        "    open('/mnt/data/sent', 'w').close()\n"
        "threading.Thread(target=send).start()\n"
    )
    assert final_status(attacker.execute(later)) == "completed"
    # Between the runs: wait until the message has left the kernel (slower on a busy machine),
    # then give the host's socket monitor a moment to see the connection it dropped.
    assert attacker.data is not None
    deadline = time.monotonic() + 60
    while not (attacker.data / "sent").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    events = attacker.execute("print('next')")
    assert any("larger than 64 MiB" in text for text in notices(events)), events
    assert stdout(events) == "next\n"
