"""How long state restore (after expiry) and reattach (after a kernel restart) take, per backend.

A session runs five data blocks (pandas, a 100k-row frame, a fit, a csv, a summary) as ``%%ci_exec``
turns: their total is the baseline, measured in the same run. Then:

1. **Restore.** The container expires; the next turn makes a new one and re-runs the five blocks
   (locally: directly, one call each; OpenAI: one forced request for all five). Printed: the
   restore's own time, and as a ratio of the baseline.
2. **Reattach.** The session is closed the way a kernel restart closes it (container kept) and a new
   session resumes from the saved state, as the kernel after the restart does. Printed: its first
   turn (reattach, plus on local the sandbox's new kernel and the re-run) against an ordinary turn.

OpenAI is the repository's OpenAI-compatible test server (scripted model, real HTTP and SDK; the
model's own latency is not part of it). Run: python bench/bench_restore.py [--backend local|openai]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ci_magic.session import Session, SessionSettings, SilentView, TurnOptions
from ci_magic.state_file import capture, resume

BLOCKS = [
    "import pandas as pd\nimport numpy as np",
    "df = pd.DataFrame({'x': np.arange(100_000)})\n"
    "df['y'] = 3 * df.x + np.random.default_rng(0).normal(size=len(df))",
    "coef = np.polyfit(df.x, df.y, 1)\nmodel = {'slope': coef[0], 'intercept': coef[1]}",
    "df.to_csv('/mnt/data/data.csv', index=False)",
    "summary = df.describe()",
]
CHECK = "print(round(model['slope'], 2), len(df))"


def options(code: str) -> TurnOptions:
    return TurnOptions(model="gpt-5-mini", instructions="Run the code.", exec_code=code)


async def turn(session: Session, code: str) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await session.run_turn(code, options(code), SilentView())
    if result.error is not None:
        raise RuntimeError(result.error.message)
    return time.perf_counter() - started, result


async def measure(make_backend: Callable[[], Any], expire: Callable[[Session], None], out: Path) -> None:
    settings = SessionSettings(memory_limit="1g", expires_after_minutes=20, output_dir=out)
    session = Session(make_backend(), settings, session_id="bench")
    cold = (await turn(session, "1"))[0]  # a new container's first cell: the container exists now
    baseline = 0.0
    for block in BLOCKS:
        baseline += (await turn(session, block))[0]
    ordinary = (await turn(session, CHECK))[0]

    expire(session)
    cell, result = await turn(session, CHECK)
    restore = session.transcript.last("restore")
    assert restore is not None and "200000" not in result.text
    print(f"  a new container's first cell     {cold:6.2f} s  (part of every restore: a new container)")
    print(f"  baseline: the {len(BLOCKS)} blocks as turns   {baseline:6.2f} s")
    ratio = restore.seconds / baseline
    print(f"  restore after expiry             {restore.seconds:6.2f} s  ({ratio:.2f}x baseline)")
    print(f"  the whole first cell after it    {cell:6.2f} s  (an ordinary cell: {ordinary:.2f} s)")

    saved = capture(session, "bench")
    await session.close(delete_container=False)  # as at a kernel restart
    after = Session(make_backend(), settings, session_id="bench")
    resume(after, saved)
    first = (await turn(after, CHECK))[0]
    second = (await turn(after, CHECK))[0]
    ratio = first / second
    print(f"  first cell after a restart       {first:6.2f} s  ({ratio:.1f}x the next cell, {second:.2f} s)")
    await after.close(delete_container=True)


def local(folder: Path) -> None:
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.sandbox import SandboxManager

    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    def make() -> LocalBackend:
        sandbox = SandboxManager(folder / "containers", pool_size=0, clock=clock)
        return LocalBackend(sandbox, model_client=None, model="")

    def expire(_: Session) -> None:
        offset[0] += 2 * 3600  # two idle hours

    print("local (sandbox kernels, no model)")
    asyncio.run(measure(make, expire, folder / "out-local"))


def openai_server(folder: Path) -> None:
    import openai

    from ci_magic.backends.openai_backend import OpenAIBackend
    from tests.servers.openai_server import OpenAIServer

    with OpenAIServer() as server:

        def make() -> OpenAIBackend:
            return OpenAIBackend(openai.AsyncOpenAI(base_url=server.url, api_key="bench", max_retries=0))

        def expire(session: Session) -> None:
            assert session.container is not None
            server.expire(session.container.id)

        print("openai (the OpenAI-compatible test server: scripted model, real HTTP)")
        asyncio.run(measure(make, expire, folder / "out-openai"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["local", "openai", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ci-bench-restore-") as tmp:
        folder = Path(tmp)
        if args.backend in ("local", "both"):
            local(folder)
        if args.backend in ("openai", "both"):
            openai_server(folder)


if __name__ == "__main__":
    main()
