"""A real Jupyter Kernel Gateway for tests and benchmarks, and a TCP proxy that can cut connections.

::

    with KernelGateway(tmp_path, token="t0ken") as gateway:     # ci-magic's sandbox kernelspec installed
        gateway.url, gateway.kernels(), gateway.delete_kernel(kid), gateway.crash_and_restart()

    with CuttingProxy(gateway.port) as proxy:                   # proxy.url reaches the gateway
        proxy.cut()                                             # drops every open connection
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["CuttingProxy", "KernelGateway", "free_port", "gateway_available"]

REPO = Path(__file__).resolve().parents[1]
SANDBOX_KERNEL = "ci-magic-sandbox"


def gateway_available() -> bool:
    try:
        import kernel_gateway  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class KernelGateway:
    """``jupyter kernelgateway`` on 127.0.0.1 with a token, serving python3 and ci-magic's kernelspec."""

    def __init__(
        self, folder: Path, *, token: str = "gateway-test-token", default_kernel: str = SANDBOX_KERNEL
    ):
        self.folder = folder
        self.token = token
        self.default_kernel = default_kernel
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.data_root = folder / "kernel-data"
        self.log_path = folder / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _install_kernelspec(self) -> Path:
        prefix = self.folder / "prefix"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ci_magic.backends.gateway.kernelspec",
                "install",
                f"--prefix={prefix}",
                f"--env=CI_MAGIC_GATEWAY_DATA_ROOT={self.data_root}",
                f"--env=PYTHONPATH={REPO}",
            ],
            check=True,
            capture_output=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        return prefix / "share" / "jupyter"

    def start(self) -> KernelGateway:
        jupyter_path = self._install_kernelspec()
        runtime = self.folder / "runtime"
        runtime.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JUPYTER_PATH": str(jupyter_path),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "CI_MAGIC_GATEWAY_DATA_ROOT": str(self.data_root),
        }
        argv = [
            sys.executable, "-m", "kernel_gateway",
            "--ip=127.0.0.1", f"--port={self.port}", "--port_retries=0",
            f"--KernelGatewayApp.auth_token={self.token}",
            f"--KernelGatewayApp.default_kernel_name={self.default_kernel}",
            "--JupyterWebsocketPersonality.list_kernels=True",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                self.request("GET", "/api/kernelspecs")
                return self
            time.sleep(0.1)
        raise RuntimeError("the gateway did not answer within 60 s")

    def stop(self) -> None:
        """Stop the gateway as an operator would (SIGTERM): it shuts its kernels down first."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # kernels it could not stop in time

    def crash_and_restart(self) -> None:
        """The gateway and its kernels die at once (a pod or host restart); a new one takes the same port."""
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.start()

    def request(self, method: str, path: str, *, token: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path, method=method)
        request.add_header("Authorization", f"token {self.token if token is None else token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/kernels"))

    def kernel_ids(self) -> set[str]:
        return {kernel["id"] for kernel in self.kernels()}

    def kernel_ids_once_gone(self, kernel_id: str, *, wait: float = 30.0) -> set[str]:
        """The kernels listed once ``kernel_id`` is gone, or after ``wait`` seconds if it stays.

        A DELETE sent as a notebook's kernel exits may still be running when that kernel is gone:
        the gateway lists the kernel until its own shutdown of it (up to its shutdown_wait_time,
        then a kill) has finished, which takes longer on a busy machine."""
        deadline = time.monotonic() + wait
        while kernel_id in (listed := self.kernel_ids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return listed

    def delete_kernel(self, kernel_id: str) -> None:
        self.request("DELETE", f"/api/kernels/{kernel_id}")

    def __enter__(self) -> KernelGateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port``; :meth:`cut` drops every open connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cuts = 0
        self._refuse_until = 0.0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if time.monotonic() < self._refuse_until:
                client.close()  # the network is still down
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        sockets = [client, upstream]
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(sockets, [], [], 0.2)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self, *, down_for: float = 0.0) -> None:
        """Drop every open connection at once, as a flaky network would (RST, no close frame).

        ``down_for``: seconds during which new connections are dropped too.
        """
        self._refuse_until = time.monotonic() + down_for
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self.cuts += 1

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self.cut()
        self.listener.close()
        self._thread.join(timeout=2)
