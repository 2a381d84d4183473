"""Local sandbox speed and footprint against baselines measured in the same run.

Prints, from one run (medians of ``--repeat`` measurements unless said otherwise):
1. cold create -> first result of ``print(1)`` (no pool) vs spawning ``python -c pass`` and vs
   a bare jupyter_client kernel start -> first ``print(1)`` (target <= 300 ms);
2. the same from the warm pool (target <= 30 ms);
3. a trivial execution round trip (``1``) vs the same on the bare kernel (target <= 1.0x);
4. ``--containers`` (16) containers alive at once: all answer, and each one's idle memory: RSS of
   the kernel process and of the sandbox's whole process tree, plus PSS, which shares the
   interpreter's pages fairly between processes (target RSS <= 80 MB each);
5. what each protection costs, measured interleaved (one start of each variant in turn, so a
   change of the machine's load hits them alike): cold create with everything on, without the
   seccomp filter, without the namespace helper (System V IPC caps and the socket-memory probe),
   and with ``isolation="none"`` (no namespaces, filter, uid switch or helper: only the
   launcher's rlimits and non-dumpable PID 1, a system call each); wall time and CPU time (the
   host process plus every sandbox process: what a loaded machine cannot hide). The round trip
   with the budget watchdog watching and not, and with ``isolation="none"``; a bubblewrap start
   of ``true`` with the user namespace (and, as root, the host-written uid map and setpriv)
   against one without (as root only: an ordinary user cannot do without it).

The machine's 1-minute load average is printed with each section: on a shared 2-core machine it
moves the absolute figures a lot; the ratios within one section much less.

Every protection is on for 1-4 (user, PID, mount, network, IPC and UTS namespaces, seccomp,
no capabilities, non-dumpable PID 1, only the interpreter's own folders visible).

Run: .venv/bin/python bench/bench_local_sandbox.py [--repeat 7] [--containers 16] [--isolation auto]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from ci_magic.backends.local import kernel as kernel_module
from ci_magic.backends.local.budget import watchdog
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


async def many(root: Path, count: int, isolation: str) -> tuple[float, float, list[tuple[int, int, int]]]:
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
        watchdog_before = watchdog().cpu_seconds
        await asyncio.sleep(2)  # idle
        watchdog_share = (watchdog().cpu_seconds - watchdog_before) / 2  # CPU seconds per second
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
        return all_answered, watchdog_share, sizes
    finally:
        await manager.aclose()


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def cpu_seconds_of_tree(pid: int) -> float:
    """CPU time of every live thread of the tree below ``pid`` (itself included).

    From schedstat (nanoseconds), not /proc/<pid>/stat's clock ticks: 10 ms steps per process
    would blur differences of a few tens of milliseconds.
    """
    total = 0
    for member in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            for task in os.listdir(f"/proc/{member}/task"):
                total += int(Path(f"/proc/{member}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """One protection left out (the only change) while the block runs; "all on" changes nothing."""
    restore: list[Callable[[], None]] = []
    if name == "no seccomp":
        original = Isolation.launch
        Isolation.launch = functools.partialmethod(original, seccomp=False)  # type: ignore[method-assign,assignment]
        restore.append(lambda: setattr(Isolation, "launch", original))
    elif name == "no namespace helper":
        helper = kernel_module._enter_namespaces

        async def skipped(*_: object) -> None:
            return None

        kernel_module._enter_namespaces = skipped  # type: ignore[assignment]
        restore.append(lambda: setattr(kernel_module, "_enter_namespaces", helper))
    try:
        yield
    finally:
        for undo in restore:
            undo()


VARIANTS = ("all on", "no seccomp", "no namespace helper", "isolation none")


async def protection_costs(
    root: Path, repeat: int, isolation: str
) -> dict[str, tuple[list[float], list[float]]]:
    """Cold create -> print(1) per variant, interleaved: {variant: (wall seconds, CPU seconds)}."""
    managers = {
        name: SandboxManager(
            root / f"cost-{index}", pool_size=0, isolation="none" if name == "isolation none" else isolation
        )
        for index, name in enumerate(VARIANTS)
    }
    found: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    try:
        for name, manager in managers.items():
            with variant(name):
                await manager.delete(await first_print(manager))  # probes: once per session
        for _ in range(repeat):
            for name, manager in managers.items():
                with variant(name):
                    host_before = resource.getrusage(resource.RUSAGE_SELF)
                    helpers_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    started = time.perf_counter()
                    cid = await first_print(manager)
                    wall = time.perf_counter() - started
                    host_after = resource.getrusage(resource.RUSAGE_SELF)
                    helpers_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    kernel = manager._containers[cid].kernel  # the bench may look inside
                    assert kernel is not None and kernel.pid is not None
                    cpu = cpu_seconds_of_tree(kernel.pid)
                    for before, after in ((host_before, host_after), (helpers_before, helpers_after)):
                        cpu += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                    found[name][0].append(wall)
                    found[name][1].append(cpu)
                    await manager.delete(cid)
    finally:
        for manager in managers.values():
            await manager.aclose()
    return found


async def round_trip_costs(root: Path, count: int, isolation: str) -> dict[str, list[float]]:
    """Round trip of `1` with every protection, without the watchdog watching, and unisolated."""
    full = SandboxManager(root / "trip-full", pool_size=0, isolation=isolation)
    bare = SandboxManager(root / "trip-none", pool_size=0, isolation="none")
    found: dict[str, list[float]] = {"all on": [], "watchdog not watching": [], "isolation none": []}
    try:
        full_id, bare_id = await first_print(full), await first_print(bare)
        watched = full._containers[full_id].kernel._watched  # type: ignore[union-attr]
        assert watched is not None

        def trivial(manager: SandboxManager, cid: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                async for _ in manager.execute(cid, "1", call_id="b"):
                    pass

            return run

        await timed(trivial(full, full_id), 5)
        await timed(trivial(bare, bare_id), 5)
        block = 10
        for _ in range(max(count // block, 1)):
            found["all on"] += await timed(trivial(full, full_id), block)
            watchdog().forget(watched)
            try:
                found["watchdog not watching"] += await timed(trivial(full, full_id), block)
            finally:
                watchdog().watch(watched)
            found["isolation none"] += await timed(trivial(bare, bare_id), block)
    finally:
        await full.aclose()
        await bare.aclose()
    return found


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
    loads = {"baselines": load()}
    with tempfile.TemporaryDirectory(prefix="ci-magic-bench-") as tmp:
        root = Path(tmp)
        cold, warm, mode = await cold_and_warm(root, args.repeat, args.isolation)
        loads["1-2"] = load()
        trips = await round_trip(root, args.round_trips, args.isolation)
        loads["3"] = load()
        all_answered, watchdog_share, sizes = await many(root, args.containers, args.isolation)
        loads["4"] = load()
        costs = await protection_costs(root, args.repeat, args.isolation)
        trip_costs = await round_trip_costs(root, args.round_trips, args.isolation)
        loads["5"] = load()
    userns, no_userns = bwrap_true(max(args.repeat, 10))
    protections = detect_isolation(args.isolation, probe_python(sys.executable))

    print(f"local sandbox ({mode} isolation), {python}; {', '.join(f'{k}: {v}' for k, v in loads.items())}")
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

    host = "root" if protections.as_root else "unprivileged"
    print(f"5. cost of each protection ({host} host), interleaved:")
    print(
        f"   budget watchdog, {len(sizes)} idle sandboxes: {watchdog_share * 1000:.1f} ms host CPU a second "
        f"({watchdog_share * 100 / len(sizes):.2f}% of a core each)"
    )
    wall_on, cpu_on = (p50(values) for values in costs["all on"])
    for name in VARIANTS:
        wall, cpu = (p50(values) for values in costs[name])
        print(
            f"   cold create, {name:<20} wall p50 {ms(wall)} (all on x{wall_on / wall:.2f})   "
            f"CPU p50 {ms(cpu)} (all on x{cpu_on / cpu:.2f})"
        )
    trip_on = p50(trip_costs["all on"])
    for name, values in trip_costs.items():
        print(f"   round trip, {name:<22} p50 {ms(p50(values))} (all on x{trip_on / p50(values):.2f})")
    if no_userns:
        print(
            f"   user namespace + uid map + setpriv: bwrap `true` p50 {ms(p50(userns))} with, "
            f"{ms(p50(no_userns))} without   x{p50(userns) / p50(no_userns):.2f}"
        )
    else:
        print(f"   user namespace: bwrap `true` p50 {ms(p50(userns))} (an ordinary user has no other way)")


if __name__ == "__main__":
    asyncio.run(main())
