"""Class 2 of issue 9: host root, or any privilege, from inside the sandbox.

Each test is an attack written as hostile sandbox code would write it, run through the sandbox
manager (what the model's tool calls and ``%%ci_exec`` use), as root and as ``nobody``. What the
host then sees is checked from the host, through /proc, not taken from ci-magic's own word.
"""

from __future__ import annotations

import os
import shutil
import socket
import textwrap
from pathlib import Path

import pytest

from tests.security.sandbox_support import (
    Attacker,
    errors,
    notices,
    processes_in,
    recording_connections,
    sandbox_namespace,
    stdout,
)

CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def status_fields(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def crash_and_come_back(attacker: Attacker) -> list[dict[str, object]]:
    """End the kernel; the next run starts a new sandbox (a new PID 1) on the same /mnt/data."""
    attacker.execute("import os\nos._exit(0)")
    return attacker.execute("print('back')")


# Modules PID 1 or the launcher could import at start, by their stdlib names, and the files
# `site` would run: each, if imported, records which process ran it and with what privileges.
PLANTED_MODULES = (
    "json", "os", "signal", "select", "ctypes", "contextlib", "resource", "runpy", "site",
    "encodings", "sitecustomize", "usercustomize", "io", "abc", "codecs",
)  # fmt: skip
PAYLOAD = """
import os as _os
_status = open("/proc/self/status").read()
_caps = [l for l in _status.splitlines() if l.startswith(("Uid", "CapEff"))]
with open("/mnt/data/ran-%d-%s" % (_os.getpid(), __name__), "w") as _f:
    _f.write("\\n".join(_caps))
"""


def test_modules_planted_in_mnt_data_never_run_in_pid_1_or_with_privileges(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    plant = [f"open('/mnt/data/{name}.py', 'w').write({PAYLOAD!r})" for name in PLANTED_MODULES]
    pth = f"import os; exec({PAYLOAD!r})\n"  # a .pth line starting with "import" is run by `site`
    plant.append(f"open('/mnt/data/evil.pth', 'w').write({pth!r})")
    plant.append("print('planted')")
    assert stdout(attacker.execute("\n".join(plant))) == "planted\n"
    back = crash_and_come_back(attacker)
    assert stdout(back) == "back\n", back
    assert attacker.data is not None
    ran = sorted(path.name for path in attacker.data.glob("ran-*"))
    # The kernel itself may import the container's own files (it is the sandbox); PID 1, which
    # holds the pipes to the host and reaps the sandbox, and anything privileged must not.
    assert not [name for name in ran if name.startswith("ran-1-")], ran
    for name in ran:
        record = (attacker.data / name).read_text()
        assert "CapEff:\t0000000000000000" in record, (name, record)


def test_no_sandbox_process_has_host_root_or_any_capability(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    events = attacker.execute(
        """
        import subprocess
        helper = subprocess.Popen(["sleep", "60"])  # a child of the kernel, as code would start
        for pid in ("self", "1"):
            fields = dict(l.split(":\\t", 1) for l in open(f"/proc/{pid}/status").read().splitlines())
            print(pid, fields["Uid"].split()[0], fields["NoNewPrivs"],
                  *(fields[c] for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")))
        """
    )
    zero = " ".join(["0000000000000000"] * 5)
    assert stdout(events) == f"self 1000 1 {zero}\n1 1000 1 {zero}\n", events
    # From the host: every process of the sandbox's PID namespace, PID 1 included.
    namespace = sandbox_namespace(attacker.pid or 0)
    assert namespace is not None
    members = processes_in(namespace)
    assert len(members) >= 3  # PID 1, the kernel, sleep
    for pid in members:
        fields = status_fields(pid)
        host_uids = {int(uid) for uid in fields["Uid"].split()}
        assert 0 not in host_uids, (pid, fields["Name"], fields["Uid"])
        if attacker.user == "nobody":
            assert host_uids == {65534}, (pid, fields["Uid"])
        for capability_set in CAPABILITY_SETS:
            assert int(fields[capability_set], 16) == 0, (pid, fields["Name"], capability_set)


def test_sandbox_code_cannot_touch_pid_1s_memory_or_files(attacker: Attacker) -> None:
    """PID 1 reads the host's control bytes: its memory is the way to lie to the host."""
    attacker.start()
    attacker.create()
    events = attacker.execute(
        """
        import ctypes, os
        attempts = {
            "write /proc/1/mem": lambda: open("/proc/1/mem", "r+b"),
            "read /proc/1/environ": lambda: open("/proc/1/environ", "rb").read(),
            "list /proc/1/fd": lambda: os.listdir("/proc/1/fd"),
            "open /proc/1/fd/0": lambda: open("/proc/1/fd/0", "rb"),
        }
        for what, attempt in attempts.items():
            try:
                attempt()
                print(what, "worked")
            except OSError as err:
                print(what, "refused")
        libc = ctypes.CDLL(None, use_errno=True)
        PTRACE_ATTACH = 16
        print("ptrace", libc.ptrace(PTRACE_ATTACH, 1, 0, 0), ctypes.get_errno())
        """
    )
    out = stdout(events)
    assert "worked" not in out, out
    assert out.count("refused") == 4, out
    assert "ptrace -1 1\n" in out, out  # EPERM


def test_links_planted_in_the_runtime_folder_do_not_redirect_or_stall_the_host(
    attacker: Attacker, request: pytest.FixtureRequest
) -> None:
    """A new kernel start runs the container's own code first (it may import from /mnt/data).

    That code replaces the kernel's sockets with symlinks to a socket of the host's and leaves
    links to /dev/zero and a FIFO where the old host read the exit status and the log: the host
    must neither connect to its own socket for the sandbox nor read through those links.
    """
    host_socket_dir = Path(os.path.dirname(attacker.home)) / f"{attacker.home.name}-host"
    host_socket_dir.mkdir()
    request.addfinalizer(lambda: shutil.rmtree(host_socket_dir, ignore_errors=True))
    if attacker.user == "nobody":
        os.chown(host_socket_dir, 65534, 65534)
    target = host_socket_dir / "service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(target))
    os.chmod(target, 0o777)
    server.listen(8)
    with recording_connections(server) as accepted:
        attacker.start(execution_timeout=30)
        attacker.create()
        hijack = textwrap.dedent(
            f"""
            import os, time
            folder = "/run/ci-magic"
            for port in range(1, 6):
                os.symlink({str(target)!r}, f"{{folder}}/k-{{port}}")
            os.symlink("/dev/zero", f"{{folder}}/exit-status")
            os.mkfifo(f"{{folder}}/kernel.log.fifo")
            os.symlink(f"{{folder}}/kernel.log.fifo", f"{{folder}}/kernel.log")
            time.sleep(3600)
            """
        )
        plant = f"open('/mnt/data/ipykernel_launcher.py', 'w').write({hijack!r})\nprint('ok')"
        planted = attacker.execute(plant)
        assert stdout(planted) == "ok\n"
        try:  # the kernel dies, and the sandbox manager starts a new one at once
            attacker.execute("import os\nos._exit(3)")
            refused = ""
        except AssertionError as err:  # the driver reports the manager's error
            refused = str(err)
    assert accepted == [], "the host connected to its own socket on the sandbox's say"
    assert "other than its kernel's socket" in refused, refused


def test_a_crash_is_reported_through_the_status_pipe_whatever_was_left_behind(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    events = attacker.execute(
        """
        import os
        folder = "/run/ci-magic"
        os.mkfifo(f"{folder}/exit-status")  # where the host once read the status: a read never ends
        for name in ("kernel.log", "status"):
            os.symlink("/dev/zero", f"{folder}/{name}")  # ... or never stops filling memory
        os._exit(3)
        """
    )
    (error,) = errors(events)
    assert "exited with status 3" in str(error["value"]), error
    again = attacker.execute("print('fine')")
    assert stdout(again) == "fine\n" and not notices(again)
