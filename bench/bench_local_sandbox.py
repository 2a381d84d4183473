"""Local sandbox speed and footprint against baselines measured in the same run.

Prints, from one run (medians of ``--repeat`` measurements unless said otherwise):
1. cold create -> first result of ``print(1)`` (no pool) vs spawning ``python -c pass`` and vs
   a bare jupyter_client kernel start -> first ``print(1)`` (target <= 300 ms);
2. the same from the warm pool (target <= 30 ms);
3. a trivial execution round trip (``1``) vs the same on the bare kernel (target <= 1.0x);
4. ``--containers`` (16) containers alive at once: all answer, and each one's idle memory: RSS of
   the kernel process and of the sandbox's whole process tree, plus PSS, which shares the
   interpreter's pages fairly between processes (target RSS <= 80 MB each);
5. what each protection costs, as ratios: cold create with and without the seccomp filter, and
   a bubblewrap start of ``true`` with the user namespace (and, as root, the host-written uid map
   and setpriv) against one without (as root only: an ordinary user cannot do without it).

Every protection is on for 1-4 (user, PID, mount, network, IPC and UTS namespaces, seccomp,
no capabilities, non-dumpable PID 1, only the interpreter's own folders visible).

Run: .venv/bin/python bench/bench_local_sandbox.py [--repeat 7] [--containers 16] [--isolation auto]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from ci_magic.backends.local.isolation import Isolation, detect_isolation, probe_python
from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.events import Logs

MB = 1 << 20


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def timed(action: Callable[[], Awaitable[object]], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await action()
        times.append(time.perf_counter() - started)
    return times


# ----------------------------------------------------------------------------- baselines


def python_spawn(python: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([python, "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    return times


async def bare_kernel(repeat: int, round_trips: int) -> tuple[list[float], list[float]]:
    """A plain jupyter_client kernel (this interpreter's python3 kernelspec, ipc transport)."""
    starts, trips = [], []
    for index in range(repeat):
        started = time.perf_counter()
        manager = AsyncKernelManager(kernel_name="python3", transport="ipc")
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        await run_bare(client, "print(1)")
        starts.append(time.perf_counter() - started)
        if index == 0:
            await run_bare(client, "pass")
            for _ in range(round_trips):
                began = time.perf_counter()
                await run_bare(client, "1")
                trips.append(time.perf_counter() - began)
        client.stop_channels()
        await manager.shutdown_kernel(now=True)
    return starts, trips


async def run_bare(client: object, code: str) -> None:
    msg_id = client.execute(code)  # type: ignore[attr-defined]
    while True:
        msg = await client.get_iopub_msg(timeout=30)  # type: ignore[attr-defined]
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    while (await client.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:  # type: ignore[attr-defined]
        pass


# --------------------------------------------------------------------------- ci-magic


async def first_print(manager: SandboxManager) -> str:
    info = await manager.create(name="bench")
    out = [e.text async for e in manager.execute(info.id, "print(1)", call_id="b") if isinstance(e, Logs)]
    assert out == ["1\n"], out
    return info.id


async def wait_for_pool(manager: SandboxManager) -> None:
    deadline = time.monotonic() + 60
    while manager.pool_ready() < manager.pool_size and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # let the freshly warmed kernel settle, as between two cells


async def cold_and_warm(root: Path, repeat: int, isolation: str) -> tuple[list[float], list[float], str]:
    cold = SandboxManager(root / "cold", pool_size=0, isolation=isolation)
    warm = SandboxManager(root / "warm", pool_size=1, isolation=isolation)
    try:
        await first_print(cold)  # probes the interpreter and the isolation: a once-per-session cost
        cold_times = await timed(lambda: first_print(cold), repeat)
        await warm.warm()
        warm_times = []
        for _ in range(repeat):
            await wait_for_pool(warm)
            warm_times.extend(await timed(lambda: first_print(warm), 1))
        mode = cold.isolation.mode if cold.isolation else "?"
    finally:
        await cold.aclose()
        await warm.aclose()
    return cold_times, warm_times, mode


async def round_trip(root: Path, count: int, isolation: str) -> list[float]:
    manager = SandboxManager(root / "trip", pool_size=0, isolation=isolation)
    try:
        cid = await first_print(manager)

        async def trivial() -> None:
            async for _ in manager.execute(cid, "1", call_id="b"):
                pass

        await timed(trivial, 5)
        return await timed(trivial, count)
    finally:
        await manager.aclose()


def tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(child) for child in children)
    return found


def memory(pid: int, field: str) -> int:
    source = "smaps_rollup" if field == "Pss" else "status"
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def many(root: Path, count: int, isolation: str) -> tuple[float, list[tuple[int, int, int]]]:
    manager = SandboxManager(root / "many", pool_size=0, isolation=isolation)
    try:
        infos = [await manager.create(name=f"c{i}") for i in range(count)]

        async def ask(index: int) -> str:
            events = manager.execute(infos[index].id, f"print({index})", call_id="b")
            return "".join([e.text async for e in events if isinstance(e, Logs)])

        started = time.perf_counter()
        answers = await asyncio.gather(*(ask(i) for i in range(count)))
        all_answered = time.perf_counter() - started
        assert answers == [f"{i}\n" for i in range(count)], answers
        await asyncio.sleep(2)  # idle
        answers = await asyncio.gather(*(ask(i) for i in range(count)))  # still alive after idling
        assert answers == [f"{i}\n" for i in range(count)], answers
        sizes = []
        for info in infos:
            kernel = manager._containers[info.id].kernel  # the bench may look inside
            assert kernel is not None and kernel.pid is not None
            pids = tree(kernel.pid)
            kernel_pid = pids[-1]  # the deepest process is the kernel
            sizes.append(
                (
                    memory(kernel_pid, "VmRSS"),
                    sum(memory(p, "VmRSS") for p in pids),
                    sum(memory(p, "Pss") for p in pids),
                )
            )
        return all_answered, sizes
    finally:
        await manager.aclose()


async def without_seccomp(root: Path, repeat: int, isolation: str) -> list[float]:
    """Cold create -> print(1) with the filter left out (the only change)."""
    original = Isolation.launch
    Isolation.launch = functools.partialmethod(original, seccomp=False)  # type: ignore[method-assign,assignment]
    manager = SandboxManager(root / "no-seccomp", pool_size=0, isolation=isolation)
    try:
        await first_print(manager)
        return await timed(lambda: first_print(manager), repeat)
    finally:
        Isolation.launch = original  # type: ignore[method-assign]
        await manager.aclose()


def bwrap_true(repeat: int) -> tuple[list[float], list[float]]:
    """bwrap running `true`: with our user namespace setup, and (as root) without one."""
    bwrap = shutil.which("bwrap") or "bwrap"
    base = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"]
    base += ["--symlink", "usr/bin", "/bin", "--unshare-pid", "--unshare-net", "--proc", "/proc", "--"]
    root = os.geteuid() == 0
    with_userns, without = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        if root:
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            process = subprocess.Popen(
                [bwrap, "--unshare-user", "--uid", "1000", "--gid", "1000", "--userns-block-fd", str(block_r),
                 "--info-fd", str(info_w), "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add",
                 "CAP_SETGID", "--cap-add", "CAP_SETPCAP", *base, "setpriv", "--reuid=1000", "--regid=1000",
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "true"],
                pass_fds=(info_r, info_w, block_r), extra_groups=[],
            )  # fmt: skip
            os.close(info_w)
            os.close(block_r)
            pid = int(os.read(info_r, 4096).split(b'"child-pid":')[1].split(b",")[0])
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{pid}/{name}").write_text("0 0 1\n1000 2000000999 1\n")
            os.write(block_w, b"1")
            process.wait()
            os.close(info_r)
            os.close(block_w)
        else:
            subprocess.run([bwrap, "--unshare-user", "--disable-userns", *base, "true"], check=True)
        with_userns.append(time.perf_counter() - started)
        if root:
            started = time.perf_counter()
            subprocess.run([bwrap, *base, "true"], check=True)
            without.append(time.perf_counter() - started)
    return with_userns, without


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--containers", type=int, default=16)
    parser.add_argument("--isolation", default="auto")
    args = parser.parse_args()

    python = probe_python(sys.executable).executable
    spawn = python_spawn(python, max(args.repeat, 10))
    bare_starts, bare_trips = await bare_kernel(args.repeat, args.round_trips)
    with tempfile.TemporaryDirectory(prefix="ci-magic-bench-") as tmp:
        root = Path(tmp)
        cold, warm, mode = await cold_and_warm(root, args.repeat, args.isolation)
        trips = await round_trip(root, args.round_trips, args.isolation)
        all_answered, sizes = await many(root, args.containers, args.isolation)
        bare_filter = await without_seccomp(root, args.repeat, args.isolation)
    userns, no_userns = bwrap_true(max(args.repeat, 10))
    protections = detect_isolation(args.isolation, probe_python(sys.executable))

    print(f"local sandbox ({mode} isolation), {python}")
    print(f"baseline  python -c pass spawn           p50 {ms(p50(spawn))}")
    print(f"baseline  bare kernel start -> print(1)  p50 {ms(p50(bare_starts))}")
    print(f"baseline  bare kernel round trip         p50 {ms(p50(bare_trips))}")
    print(
        f"1. cold create -> print(1)               p50 {ms(p50(cold))}   "
        f"x{p50(cold) / p50(spawn):.1f} python spawn, x{p50(cold) / p50(bare_starts):.2f} bare kernel   "
        f"(target <= 300 ms)"
    )
    print(
        f"2. warm-pool create -> print(1)          p50 {ms(p50(warm))}   "
        f"x{p50(warm) / p50(spawn):.2f} python spawn, x{p50(warm) / p50(bare_starts):.3f} bare kernel   "
        f"(target <= 30 ms)"
    )
    print(
        f"3. round trip of `1`                     p50 {ms(p50(trips))}   "
        f"x{p50(trips) / p50(bare_trips):.2f} bare kernel   (target <= 1.0x)"
    )
    kernel_rss = [k for k, _, _ in sizes]
    tree_rss = [t for _, t, _ in sizes]
    tree_pss = [p for _, _, p in sizes]
    print(
        f"4. {len(sizes)} containers alive: all answered in {ms(all_answered).strip()}; idle memory each: "
        f"kernel RSS p50 {p50(kernel_rss) / MB:.0f} MB (max {max(kernel_rss) / MB:.0f}), "
        f"sandbox tree RSS p50 {p50(tree_rss) / MB:.0f} MB (max {max(tree_rss) / MB:.0f}), "
        f"tree PSS p50 {p50(tree_pss) / MB:.0f} MB   (target RSS <= 80 MB)"
    )

    print(f"5. cost of each protection ({'root' if protections.as_root else 'unprivileged'} host):")
    print(
        f"   seccomp filter: cold create p50 {ms(p50(cold))} with, {ms(p50(bare_filter))} without   "
        f"x{p50(cold) / p50(bare_filter):.2f}"
    )
    if no_userns:
        print(
            f"   user namespace + uid map + setpriv: bwrap `true` p50 {ms(p50(userns))} with, "
            f"{ms(p50(no_userns))} without   x{p50(userns) / p50(no_userns):.2f}"
        )
    else:
        print(f"   user namespace: bwrap `true` p50 {ms(p50(userns))} (an ordinary user has no other way)")


if __name__ == "__main__":
    asyncio.run(main())
