"""Host-side tools for the sandbox attack tests: run an attacker as root or as ``nobody``, then
look at what is left on the host through /proc, independently of ci-magic's own bookkeeping."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ci_magic
from ci_magic.backends.local.isolation import detect_isolation, probe_python
from ci_magic.errors import SandboxError

DRIVER = (Path(__file__).with_name("sandbox_driver.py")).read_text(encoding="utf-8")
REPOSITORY = str(Path(ci_magic.__file__).resolve().parent.parent)
PREFIX = "@@driver@@ "
NOBODY = 65534
USERS = ["root", "nobody"]


class Attacker:
    """One attacker session: a sandbox manager in a driver process running as ``user``."""

    def __init__(self, user: str, home: Path, python: str, prefix: list[str]) -> None:
        self.user = user
        self.home = home
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home)}
        if user == "root":
            env["PYTHONPATH"] = REPOSITORY  # the code under test, whatever the venv points at
        self.process = subprocess.Popen(
            [*prefix, python, "-c", DRIVER, str(home)],
            env=env, cwd=home, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.pid: int | None = None  # host pid of the container's outermost sandbox process
        self.data: Path | None = None

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                raise AssertionError(f"the driver stopped during {op}: {stderr[-3000:]}")
            if line.startswith(PREFIX):
                answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
                if "error" in answer:
                    raise AssertionError(f"{op} failed in the driver: {answer['trace']}")
                if answer.get("pid"):
                    self.pid = answer["pid"]
                return answer

    def start(self, **options: Any) -> None:
        self.call("start", **options)

    def create(self, memory_limit: str = "1g") -> str:
        answer = self.call("create", memory_limit=memory_limit)
        self.data = Path(answer["data"])
        return str(answer["id"])

    def execute(self, code: str, *, timeout: float | None = None) -> list[dict[str, Any]]:
        return list(self.call("execute", code=code, timeout=timeout)["events"])

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError, ValueError):
            self.call("close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def stdout(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "Logs" and e["stream"] == "stdout")


def errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "ExecutionError"]


def notices(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "Notice"]


def final_status(events: list[dict[str, Any]]) -> str:
    assert events and events[-1]["type"] == "CallStatus", events
    return str(events[-1]["status"])


@contextlib.contextmanager
def attacker_as(user: str) -> Iterator[Attacker]:
    """An attacker session as ``user``; skips (saying why) where that user cannot be had."""
    is_root = os.geteuid() == 0
    try:
        detect_isolation("auto", probe_python(sys.executable))
    except SandboxError as err:
        pytest.skip(f"no namespace isolation on this machine: {err}")
    python, prefix = sys.executable, []
    if user == "root" and not is_root:
        pytest.skip("not root: the 'nobody' variant runs these attacks as this unprivileged user")
    if user == "nobody" and is_root:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to switch to nobody")
        python = os.environ.get("CI_MAGIC_UNPRIVILEGED_PYTHON", sys.executable)
        # Through sh: setpriv execs while it still holds root's capabilities (see test_local_sandbox).
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/bin/sh", "-c"]
        prefix += ['exec "$0" "$@"']
        probe = subprocess.run(
            [*prefix, python, "-c", "import ci_magic.backends.local.sandbox"],
            env={"PATH": "/usr/bin:/bin", "HOME": "/"}, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(
                f"nobody cannot run {python} with ci_magic importable; set CI_MAGIC_UNPRIVILEGED_PYTHON "
                "(scripts/unprivileged_python.sh prints one)"
            )
    home = Path(tempfile.mkdtemp(prefix="ci-magic-attack-"))
    if user == "nobody" and is_root:
        os.chown(home, NOBODY, NOBODY)
    attacker = Attacker(user, home, python, prefix)
    try:
        yield attacker
    finally:
        attacker.close()
        shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------ the host's own view via /proc


@contextlib.contextmanager
def recording_connections(server: socket.socket) -> Iterator[list[socket.socket]]:
    """Accept every connection to the listening ``server`` while the block runs; yields the list.

    On leaving, the connections and the server are closed (the list keeps them, to be counted).
    """
    accepted: list[socket.socket] = []
    stop = threading.Event()
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:  # the timeout that lets it see ``stop``, or a peer gone before accept
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield accepted
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in accepted:
            conn.close()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def host_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def processes_with(token: str) -> list[int]:
    """Host pids whose command line contains ``token`` (the attack marks its processes so)."""
    mark = token.encode()
    return [pid for pid in host_pids() if mark in _read(f"/proc/{pid}/cmdline") and pid != os.getpid()]


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def sandbox_namespace(outer_pid: int) -> str | None:
    """The PID namespace of the sandbox whose outermost host process is ``outer_pid``."""
    host = pid_namespace(os.getpid())
    pending = [outer_pid]
    while pending:
        pid = pending.pop()
        space = pid_namespace(pid)
        if space is not None and space != host:
            return space
        pending += [int(c) for c in _read(f"/proc/{pid}/task/{pid}/children").split()]
    return None


def processes_in(namespace: str) -> list[int]:
    return [pid for pid in host_pids() if pid_namespace(pid) == namespace]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        text = _read(f"/proc/{pid}/stat").decode()
        if text:
            fields = text[text.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def allocated_bytes(folder: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class MemorySampler:
    """Samples, from the host, what every process of a sandbox's PID namespace holds.

    Private and shared-memory pages (``Pss_Anon + Pss_Shmem``, so a page mapped by four
    processes counts once) plus what the sandbox's tmpfs folders hold, every 20 ms.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        members = processes_in(self.namespace)
        total = 0
        for pid in members:
            for line in _read(f"/proc/{pid}/smaps_rollup").decode().splitlines():
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) * 1024
        for pid in members:
            roots = [f"/proc/{pid}/root/{inside}" for inside in ("tmp", "dev/shm", "home/sandbox")]
            try:
                sizes = [os.statvfs(root) for root in roots]
            except OSError:
                continue
            total += sum((s.f_blocks - s.f_bfree) * s.f_frsize for s in sizes)
            break
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(0.02)
