"""Many sessions at once through one Jupyter Kernel Gateway, against the local backend in the same run.

For each session count in ``--sessions`` (default 1, 8, 32), all sessions at once, on both backends:

1. create -> first result: a new container, then ``print(1)`` through ``%%ci_exec``'s path
   (``backend.stream`` with ``exec_code``), p50 and p99 over sessions;
2. exec round trip: ``--rounds`` trivial executions per session, all sessions concurrently, p50/p99;
3. push and pull: one ``--megabytes`` file per session up, then down, aggregate MB/s.

The gateway runs ci-magic's sandbox kernelspec (the same sandbox as local, plus the relay, REST and
WebSocket); local runs SandboxManager without a warm pool, so both start cold. Ratios are
gateway / local (times) and local / gateway (throughput); "growth" is each figure at N sessions
over the same figure at the smallest N.

Run: .venv/bin/python bench/bench_gateway.py [--sessions 1,8,32] [--rounds 10] [--megabytes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci_magic.backends.base import Backend, Conversation, TurnRequest
from ci_magic.backends.gateway.backend import GatewayBackend
from ci_magic.backends.gateway.client import GatewayClient
from ci_magic.backends.local.backend import LocalBackend
from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.events import CallStatus
from tests.gateway_support import KernelGateway

MB = 1 << 20
TOKEN = "bench-token"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figures:
    create_first: list[float] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    push_mbps: float = 0.0
    pull_mbps: float = 0.0
    failures: int = 0


async def exec_once(backend: Backend, container_id: str, code: str) -> bool:
    request = TurnRequest(
        prompt=code, container_id=container_id, model="", instructions="", conversation=Conversation(),
        exec_code=code,
    )  # fmt: skip
    completed = False
    async for event in backend.stream(request):
        if isinstance(event, CallStatus) and event.status == "completed":
            completed = True
    return completed


async def create_and_answer(backend: Backend) -> tuple[str, float]:
    began = time.perf_counter()
    info = await backend.create_container(name="bench", memory_limit="1g", expires_after_minutes=20)
    if not await exec_once(backend, info.id, "print(1)"):
        raise RuntimeError("print(1) did not complete")
    return info.id, time.perf_counter() - began


async def round_trips(backend: Backend, container_id: str, rounds: int) -> list[float]:
    trips = []
    for _ in range(rounds):
        began = time.perf_counter()
        await exec_once(backend, container_id, "1")
        trips.append(time.perf_counter() - began)
    return trips


async def measure(make: Callable[[], Backend], sessions: int, rounds: int, megabytes: float) -> Figures:
    """All ``sessions`` at once, phase by phase: create, round trips, push, pull."""
    figures = Figures()
    payload = os.urandom(int(megabytes * MB))
    backends = [make() for _ in range(sessions)]
    try:
        created = await asyncio.gather(*(create_and_answer(b) for b in backends), return_exceptions=True)
        live = [(b, c) for b, c in zip(backends, created, strict=True) if not isinstance(c, BaseException)]
        figures.failures = sessions - len(live)
        for problem in {f"{type(c).__name__}: {c}" for c in created if isinstance(c, BaseException)}:
            print(f"  a session failed: {problem[:300]}")
        figures.create_first = [c[1] for c in created if not isinstance(c, BaseException)]
        pairs = [(b, c[0]) for b, c in live]  # type: ignore[index]
        trips = await asyncio.gather(*(round_trips(b, cid, rounds) for b, cid in pairs))
        figures.round_trips = [t for session in trips for t in session]

        began = time.perf_counter()
        sent = await asyncio.gather(*(b.upload_file(cid, "payload.bin", payload) for b, cid in pairs))
        figures.push_mbps = len(pairs) * len(payload) / MB / (time.perf_counter() - began)
        with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
            began = time.perf_counter()
            sizes = await asyncio.gather(
                *(
                    b.download_file(cid, file.id, Path(tmp) / f"{i}.bin", max_bytes=2 * len(payload))
                    for i, ((b, cid), file) in enumerate(zip(pairs, sent, strict=True))
                )
            )
            figures.pull_mbps = sum(sizes) / MB / (time.perf_counter() - began)
        if any(size != len(payload) for size in sizes):
            raise RuntimeError("a pulled file differs in size")
        for backend, cid in pairs:
            with contextlib.suppress(Exception):
                await backend.delete_container(cid)
    finally:
        for backend in backends:
            await backend.aclose()
    return figures


def row(name: str, gateway: float, local: float, unit: str, *, throughput: bool = False) -> str:
    ratio = (local / gateway if throughput else gateway / local) if local and gateway else float("nan")
    return f"  {name:<28} {gateway:9.1f} {unit:<5} {local:9.1f} {unit:<5} {ratio:6.2f}x"


def report(count: int, seconds: float, gateway: Figures, local: Figures) -> None:
    failed = (
        f", FAILED: gateway {gateway.failures}, local {local.failures}"
        if gateway.failures or local.failures
        else ""
    )
    print(f"\n{count} session(s) at once ({seconds:.0f} s){failed}")
    print(f"  {'':<28} {'gateway':>15} {'local':>15} {'ratio':>7}")
    for label, share in (("p50", 0.5), ("p99", 0.99)):
        first = [1000 * percentile(f.create_first, share) for f in (gateway, local)]
        print(row(f"create -> first result {label}", *first, "ms"))
    for label, share in (("p50", 0.5), ("p99", 0.99)):
        trip = [1000 * percentile(f.round_trips, share) for f in (gateway, local)]
        print(row(f"exec round trip {label}", *trip, "ms"))
    print(row("push (all sessions)", gateway.push_mbps, local.push_mbps, "MB/s", throughput=True))
    print(row("pull (all sessions)", gateway.pull_mbps, local.pull_mbps, "MB/s", throughput=True))


def report_growth(results: dict[int, tuple[Figures, Figures]]) -> None:
    base = min(results)
    print(f"\nGrowth: figure at N sessions / figure at {base} (push and pull per session)")
    print(f"  {'N':>4} {'create p50':>19} {'exec p50':>19} {'push/session':>19} {'pull/session':>19}")
    print(f"  {'':>4}" + f" {'gateway':>9} {'local':>9}" * 4)
    g0, l0 = results[base]

    def grow(values: list[float], start: list[float]) -> float:
        return statistics.median(values) / statistics.median(start)

    for count, (g, loc) in sorted(results.items()):
        cells = [
            grow(g.create_first, g0.create_first), grow(loc.create_first, l0.create_first),
            grow(g.round_trips, g0.round_trips), grow(loc.round_trips, l0.round_trips),
            (g.push_mbps / count) / (g0.push_mbps / base), (loc.push_mbps / count) / (l0.push_mbps / base),
            (g.pull_mbps / count) / (g0.pull_mbps / base), (loc.pull_mbps / count) / (l0.pull_mbps / base),
        ]  # fmt: skip
        print(f"  {count:>4}" + "".join(f" {cell:9.2f}" for cell in cells))


async def main_async(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.sessions.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp) / "gateway"
        folder.mkdir()
        roots = Path(tmp) / "local"
        with KernelGateway(folder, token=TOKEN) as gateway:

            def make_gateway() -> Backend:
                return GatewayBackend(GatewayClient(gateway.url, token=TOKEN), execution_timeout=300)

            def make_local() -> Backend:
                sandbox = SandboxManager(roots / os.urandom(4).hex(), pool_size=0, execution_timeout=300)
                return LocalBackend(sandbox, model_client=None, model="")

            results: dict[int, tuple[Figures, Figures]] = {}
            for count in counts:
                started = time.perf_counter()
                on_gateway = await measure(make_gateway, count, args.rounds, args.megabytes)
                on_local = await measure(make_local, count, args.rounds, args.megabytes)
                results[count] = (on_gateway, on_local)
                report(count, time.perf_counter() - started, on_gateway, on_local)
            report_growth(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sessions", default="1,8,32", help="session counts, comma separated")
    parser.add_argument("--rounds", type=int, default=10, help="exec round trips per session")
    parser.add_argument(
        "--megabytes", type=float, default=2.0, help="file size pushed and pulled per session"
    )
    args = parser.parse_args()
    print(
        f"bench_gateway: sessions {args.sessions}; {args.rounds} round trips and {args.megabytes:g} MB each"
    )
    print("ratios: gateway/local for times, local/gateway for MB/s (above 1: the gateway is slower)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
