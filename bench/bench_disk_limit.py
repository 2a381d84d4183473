"""How far past ``disk_limit`` a flood of writes gets, with inotify against the timer alone.

The local sandbox has no disk quota: the watchdog measures /mnt/data from the host and stops the
code when it is over the limit (:mod:`ci_magic.backends.local.budget`). This bench writes 2 GiB
in 32 MiB files (1 MiB writes) into a container limited to ``--limit`` (200 MiB) and reports
what the data folder holds once the code has been stopped, median of ``--repeat`` runs:

* ``timer``: the watchdog measures every ``DISK_TICK`` only (the baseline, inotify switched off);
* ``inotify``: writes wake the watchdog at once (:mod:`ci_magic.backends.local.disk_events`).

Both run in the same process, alternately, so machine noise hits them alike. The overshoot ratio
``inotify / timer`` (of the bytes past the limit) is the figure to compare between runs.

Run: .venv/bin/python bench/bench_disk_limit.py [--repeat 5] [--limit 200m]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from ci_magic.backends.local import budget
from ci_magic.backends.local.budget import parse_size
from ci_magic.backends.local.disk_events import DiskEvents
from ci_magic.backends.local.sandbox import SandboxManager

MIB = 1 << 20
FLOOD = textwrap.dedent(
    """
    import os
    os.makedirs("flood", exist_ok=True)
    for n in range(64):
        with open(f"flood/part-{n}.bin", "wb") as f:
            for _ in range(32):
                f.write(b"d" * 2**20)
    """
)


def allocated(folder: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


async def flood_once(root: Path, limit: str, *, inotify: bool) -> tuple[int, float]:
    """Bytes held by the data folder after the flood was stopped, and the seconds it ran."""
    budget._WATCHDOG = None  # a fresh watchdog, with or without inotify
    opened = DiskEvents.open
    DiskEvents.open = classmethod(lambda cls: opened() if inotify else None)  # type: ignore[method-assign,assignment]
    manager = SandboxManager(root, pool_size=0, disk_limit=limit)
    try:
        info = await manager.create(name="flood")
        started = time.perf_counter()
        async for _ in manager.execute(info.id, FLOOD, call_id="flood", timeout=120):
            pass
        took = time.perf_counter() - started
        return allocated(manager._data_dir(info.id)), took
    finally:
        DiskEvents.open = opened  # type: ignore[method-assign]
        await manager.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--limit", default="200m")
    args = parser.parse_args()
    limit = parse_size(args.limit, what="--limit")
    held: dict[str, list[int]] = {"timer": [], "inotify": []}
    took: dict[str, list[float]] = {"timer": [], "inotify": []}
    with tempfile.TemporaryDirectory(prefix="ci-magic-bench-disk-") as tmp:
        for index in range(args.repeat):
            for mode in ("timer", "inotify"):
                root = Path(tmp) / f"{mode}-{index}"
                size, seconds = await flood_once(root, args.limit, inotify=mode == "inotify")
                held[mode].append(size)
                took[mode].append(seconds)
    print(f"disk_limit {args.limit}; 2 GiB flood in 1 MiB writes; {args.repeat} runs each; "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    over: dict[str, float] = {}
    for mode in ("timer", "inotify"):
        median = statistics.median(held[mode])
        over[mode] = max(median - limit, 0)
        print(
            f"  {mode:8} held p50 {median / MIB:7.1f} MiB (max {max(held[mode]) / MIB:7.1f}), "
            f"past the limit {over[mode] / MIB:7.1f} MiB, stopped after "
            f"{statistics.median(took[mode]) * 1000:6.0f} ms"
        )
    if over["timer"]:
        print(f"  overshoot inotify/timer: {over['inotify'] / over['timer']:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
