"""Background processes for the browser test: the scripted model server and JupyterLab.

Each runs in its own process group so teardown can stop it and everything it started (JupyterLab's
kernels, the server's container workers) by process id, never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["BackgroundProcess", "JupyterLab", "ModelServer", "free_port"]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nobody listens on right now (JupyterLab cannot report the one it picked for 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BackgroundProcess:
    """A child process whose combined output goes to ``log`` and is scanned for expected lines."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.argv = list(argv)
        self._lines: list[str] = []
        self._seen = threading.Condition()
        self._log = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"output of {log.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            with self._seen:
                self._lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def output(self) -> str:
        with self._seen:
            return "\n".join(self._lines)

    def exited(self) -> bool:
        return self.process.poll() is not None

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern``; raises with the output so far if none comes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        with self._seen:
            while True:
                for line in self._lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.exited() and not self._reader.is_alive()):
                    raise RuntimeError(
                        f"{' '.join(self.argv[:4])}... did not print {pattern!r} within {timeout:.0f} s "
                        f"(exit code {self.process.poll()}); its output:\n{self.output()[-4000:]}"
                    )
                self._seen.wait(min(left, 0.5))

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        # Children (kernels, sandbox workers) share the group and may outlive their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._reader.join(5)
        self._log.close()


class ModelServer:
    """``tests.browser.scenario_server`` as a subprocess: the scripted model, slowed by ``event_delay``."""

    def __init__(self, logs: Path, *, event_delay: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self._process = BackgroundProcess(
            [sys.executable, "-m", "tests.browser.scenario_server", "--event-delay", str(event_delay)],
            env=env,
            cwd=REPO,
            log=logs / "model-server.log",
        )
        try:
            self.url = self._process.wait_for_line(r"^READY (\S+)", timeout=30).group(1)
        except BaseException:
            self._process.stop()
            raise

    def stop(self) -> None:
        self._process.stop()


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 with a token, serving ``root``; its output goes to ``logs``.

    Kernels inherit ``kernel_env`` (a None value removes the machine's variable). Settings and
    workspaces live under ``state`` so the machine's own JupyterLab setup (themes, open tabs, news
    pop-ups) cannot change what the test sees.
    """

    def __init__(
        self,
        root: Path,
        state: Path,
        *,
        kernel_env: Mapping[str, str | None],
        logs: Path,
        start_timeout: float = 90,
    ) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = state / "user-settings"
        _write_quiet_settings(settings)
        env = {
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
            "JUPYTER_CONFIG_DIR": str(state / "config"),
            "PYTHONUNBUFFERED": "1",
        }
        for name, value in kernel_env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={state / 'workspaces'}",
            # Galata's switch: window.jupyterapp lets the test ask the app when the kernel is idle.
            "--LabApp.expose_app_in_browser=True",
            "--ServerApp.terminals_enabled=False",
        ]
        if os.geteuid() == 0:  # CI containers run as root; JupyterLab refuses that without the flag
            argv.append("--allow-root")
        self._process = BackgroundProcess(argv, env=env, cwd=root, log=logs / "jupyterlab.log")
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self._process.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"token {self.token}"}
        status = urllib.request.Request(f"{self.url}/api/status", headers=headers)
        while time.monotonic() < deadline and not self._process.exited():
            try:
                with urllib.request.urlopen(status, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        code = self._process.process.poll()
        why = f"exited with code {code}" if code is not None else f"did not answer within {timeout:.0f} s"
        raise RuntimeError(f"JupyterLab on {self.url} {why}; its output:\n{self._process.output()[-4000:]}")

    def notebook_url(self, relative: str) -> str:
        """The notebook's page; ``reset`` ignores any saved workspace layout."""
        return f"{self.url}/lab/tree/{relative}?token={self.token}&reset"

    def stop(self) -> None:
        self._process.stop()


def _write_quiet_settings(folder: Path) -> None:
    """No news or update toasts, the light theme the README screenshot uses, every cell rendered."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": (
            '{"fetchNews": "false", "checkForUpdates": false}'
        ),
        "@jupyterlab/apputils-extension/themes.jupyterlab-settings": '{"theme": "JupyterLab Light"}',
        # Every cell and every output in the DOM: windowed notebooks detach cells outside the
        # viewport and only 50 outputs show by default, and the tests read all the hostile ones.
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": (
            '{"windowingMode": "none", "maxNumberOutputs": 10000}'
        ),
    }
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
