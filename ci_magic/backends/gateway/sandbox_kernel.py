"""The kernel a gateway starts from ci-magic's kernelspec: a sandboxed ipykernel behind a relay.

A gateway (Kernel Gateway, Enterprise Gateway's local process proxy, or plain ``jupyter_client``)
launches ``python -m ci_magic.backends.gateway.sandbox_kernel -f {connection_file}`` and then
talks to the ports in that file. The sandbox has no network, so this process:

1. starts the kernel exactly as the local backend does (:class:`~ci_magic.backends.local.kernel.LocalKernel`:
   bubblewrap/unshare namespaces, the launcher as PID 1, rlimits, the memory watchdog), with
   ``/mnt/data`` bound to a folder of this kernel and its own connection key over ipc sockets;
2. relays the five channels between the gateway's TCP ports and the kernel's ipc sockets,
   checking every message's signature with the gateway's key and signing it again with the
   kernel's, so the sandbox never sees the gateway's key (and cannot forge messages with it);
3. turns the gateway's interrupt (SIGINT, ``interrupt_mode: signal``) into the launcher's interrupt,
   and exits when the kernel exits, removing the data folder unless the gateway asked for a restart.

The memory tier comes from ``KERNEL_CI_MAGIC_MEMORY_LIMIT`` (gateways pass ``KERNEL_*`` variables
from the start request); the isolation from ``CI_MAGIC_ISOLATION`` (default ``auto``); the data
folders' root from ``CI_MAGIC_GATEWAY_DATA_ROOT`` (default: ``<tmp>/ci-magic-gateway-<uid>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

__all__ = ["MessageRelay", "data_root", "main"]

DELIMITER = b"<IDS|MSG>"
RELAY_ID = b"ci-magic-gateway-relay"  # shell, control and stdin share it, so stdin replies route back
STALE_SECONDS = 600  # a data folder whose owner is gone this long is removed by the next start
TIERS = ("1g", "4g", "16g", "64g")


def data_root() -> Path:
    configured = os.environ.get("CI_MAGIC_GATEWAY_DATA_ROOT")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"ci-magic-gateway-{os.getuid()}"


class _Signer:
    def __init__(self, key: str | bytes, scheme: str | bytes) -> None:
        scheme = scheme.decode() if isinstance(scheme, bytes) else scheme
        if scheme not in ("hmac-sha256", ""):
            raise ValueError(f"unsupported signature scheme {scheme!r}")
        self.key = key if isinstance(key, bytes) else key.encode()

    def sign(self, parts: Sequence[bytes]) -> bytes:
        if not self.key:
            return b""
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()


class MessageRelay:
    """Relays Jupyter messages between two sets of sockets, re-signing each one.

    ``outer`` is the gateway's connection info (TCP, bound here), ``inner`` the kernel's (ipc,
    connected here). Runs in one thread with one poller; :meth:`stop` ends it.
    """

    def __init__(self, outer: dict[str, Any], inner: dict[str, Any]) -> None:
        self.outer_signer = _Signer(outer.get("key", ""), outer.get("signature_scheme", "hmac-sha256"))
        self.inner_signer = _Signer(inner.get("key", ""), inner.get("signature_scheme", "hmac-sha256"))
        self.context = zmq.Context()
        self.shutdown_requested = False
        self.restart_requested = False
        self._stop = threading.Event()
        self._pairs: dict[zmq.Socket[bytes], tuple[zmq.Socket[bytes], bool, str]] = {}
        self._inward: set[zmq.Socket[bytes]] = set()  # the gateway's side: messages towards the kernel
        for channel, kinds in {
            "shell": (zmq.ROUTER, zmq.DEALER),
            "control": (zmq.ROUTER, zmq.DEALER),
            "stdin": (zmq.ROUTER, zmq.DEALER),
            "iopub": (zmq.XPUB, zmq.XSUB),
            "hb": (zmq.ROUTER, zmq.DEALER),
        }.items():
            front = self.context.socket(kinds[0])
            front.linger = 0
            front.bind(_address(outer, channel))
            back = self.context.socket(kinds[1])
            back.linger = 0
            if kinds[1] == zmq.DEALER:
                back.setsockopt(zmq.ROUTING_ID, RELAY_ID)
            back.connect(_address(inner, channel))
            signed = channel != "hb"
            self._pairs[front] = (back, signed, channel)
            self._pairs[back] = (front, signed, channel)
            self._inward.add(front)
        self._thread = threading.Thread(target=self._run, name="ci-magic-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.context.destroy(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        for socket in self._pairs:
            poller.register(socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(200))
            except zmq.ZMQError:
                return
            for socket in ready:
                frames = socket.recv_multipart()
                target, signed, channel = self._pairs[socket]
                inward = socket in self._inward
                if signed and not (channel == "iopub" and inward):  # iopub inward: subscriptions
                    frames = self._resign(frames, inward=inward, channel=channel)
                    if frames is None:
                        continue
                with contextlib.suppress(zmq.Again):
                    target.send_multipart(frames, zmq.NOBLOCK)

    def _resign(self, frames: list[bytes], *, inward: bool, channel: str) -> list[bytes] | None:
        try:
            at = frames.index(DELIMITER)
        except ValueError:
            return None
        parts = frames[at + 2 : at + 6]
        if len(parts) < 4:
            return None
        check, sign = (
            (self.outer_signer, self.inner_signer) if inward else (self.inner_signer, self.outer_signer)
        )
        if not hmac.compare_digest(check.sign(parts), frames[at + 1]):
            return None  # not signed with the key of the side it came from: dropped
        if inward and channel == "control" and b'"shutdown_request"' in parts[0]:
            self.shutdown_requested = True
            with contextlib.suppress(ValueError, AttributeError):
                self.restart_requested = bool(json.loads(parts[3]).get("restart"))
        return [*frames[: at + 1], sign.sign(parts), *frames[at + 2 :]]


def _address(info: dict[str, Any], channel: str) -> str:
    port = info[f"{channel}_port"]
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"


def _sweep(root: Path) -> None:
    """Remove data folders of kernels whose relay died long ago without cleaning up (SIGKILL)."""
    for folder in root.glob("*"):
        owner = folder / "owner"
        try:
            pid = int(owner.read_text())
            age = time.time() - owner.stat().st_mtime
        except (OSError, ValueError):
            continue
        if age < STALE_SECONDS:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


async def serve(connection_file: Path) -> int:
    """Start the sandboxed kernel, relay until it exits; the data folder goes unless it may come back.

    The folder is kept when the gateway asked for a restart or the kernel died on its own (the
    gateway's restarter starts a new one for the same kernel id, with the same files).
    """
    from ci_magic.backends.local.isolation import detect_isolation, limits_for_tier, probe_python
    from ci_magic.backends.local.kernel import KernelSetup, LocalKernel, new_context

    outer = json.loads(connection_file.read_text())
    found = re.search(r"kernel-([0-9A-Za-z-]+)\.json$", connection_file.name)
    kernel_id = found.group(1) if found else os.urandom(8).hex()
    tier = os.environ.get("KERNEL_CI_MAGIC_MEMORY_LIMIT", "1g").lower()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    kernel: LocalKernel | None = None
    loop.add_signal_handler(signal.SIGINT, lambda: kernel and asyncio.ensure_future(kernel.interrupt()))
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    python = probe_python(sys.executable)
    isolation = detect_isolation(os.environ.get("CI_MAGIC_ISOLATION", "auto"), python)
    root = data_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep(root)
    folder = root / kernel_id
    context = new_context()
    relay: MessageRelay | None = None
    keep = False
    try:
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data, 0o755)
        (folder / "owner").write_text(str(os.getpid()))
        user = isolation.sandbox_user("cntr_" + "".join(c for c in kernel_id if c in "0123456789abcdef"))
        if user:
            os.chown(data, *user)
        setup = KernelSetup(
            isolation=isolation,
            python=python,
            data_dir=data,
            limits=limits_for_tier(tier if tier in TIERS else "1g"),
            user=user,
        )
        kernel = LocalKernel(setup, context=context)
        await kernel.start()
        relay = MessageRelay(outer, dict(kernel.client.get_connection_info()))
        relay.start()
        while kernel.is_alive() and not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
        shut_down = stopping.is_set() or relay.shutdown_requested
        keep = relay.restart_requested or not shut_down
        return 0
    finally:
        if relay is not None:
            relay.stop()
        if kernel is not None:
            await kernel.kill()
        context.destroy(linger=0)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ci_magic.backends.gateway.sandbox_kernel",
        description="Run a ci-magic sandbox kernel for a gateway (started by ci-magic's kernelspec).",
    )
    parser.add_argument("-f", "--connection-file", required=True, type=Path)
    args = parser.parse_args(argv)
    _stop_with_parent()
    return asyncio.run(serve(args.connection_file))


def _stop_with_parent() -> None:
    """SIGTERM when whoever started us (the gateway) dies, so a crashed gateway leaves no kernel.

    Without it a gateway killed outright orphans its kernels, each still holding a sandbox.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
