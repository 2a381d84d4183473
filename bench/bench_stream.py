"""%%ci on a genuine ~400-event OpenAI recording, against a bare loop over the SDK stream.

Both sides talk to the same loopback test server, in its own process as a real API would be,
replaying ``vercel__ai__openai-code-interpreter-tool.1.chunks.txt`` (393 events, 3 code calls, a
csv citation) with no delay. Prints, from one run:

1. wall time of a whole ``CodeInterpreter.run`` turn (container check, file listing, stream,
   Result, TurnView with a frontend that JSON-encodes every message like a kernel, csv download)
   over the wall time of a bare ``for event in client.responses.create(stream=True)`` loop
   (target <= 1.15), and over a loop that only decodes the stream the way the backend does
   (the SDK's raw streaming response + ``ci_magic.backends.sse`` + ``json.loads``): the turn's
   own cost beyond reading the events;
2. display messages per second when the same recording is paced at ~300 events/s on the server
   (target <= 20 whatever the delta rate), and how many messages an unthrottled view would send.

Run: python bench/bench_stream.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai

from ci_magic import CodeInterpreter
from ci_magic.backends.sse import aiter_events
from ci_magic.bridge import run_sync
from ci_magic.render.frontend import MimeBundle, SlotRole
from tests.browser.processes import BackgroundProcess
from tests.servers.recordings import VERCEL_CHUNKS, fixtures_available


class CountingFrontend:
    """Pays each message's JSON encoding (what a kernel does) and timestamps it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> CountingFrontend:
        self.update(bundle)
        return self

    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        json.dumps(bundle)
        self.times.append(time.perf_counter())


def bare_loop(client: openai.OpenAI, container_id: str) -> float:
    started = time.perf_counter()
    stream = client.responses.create(
        model="gpt-5-mini",
        input="replay",
        tools=[{"type": "code_interpreter", "container": container_id}],
        include=["code_interpreter_call.outputs"],
        stream=True,
    )
    count = sum(1 for _ in stream)
    assert count == 393, count
    return time.perf_counter() - started


def bare_async_loop(client: openai.AsyncOpenAI, container_id: str) -> float:
    """The same bare loop on the async client (what the magic uses under the hood)."""

    async def loop() -> int:
        stream = await client.responses.create(
            model="gpt-5-mini",
            input="replay",
            tools=[{"type": "code_interpreter", "container": container_id}],
            include=["code_interpreter_call.outputs"],
            stream=True,
        )
        return sum([1 async for _ in stream])

    started = time.perf_counter()
    count = run_sync(loop())
    assert count == 393, count
    return time.perf_counter() - started


def decoded_loop(client: openai.AsyncOpenAI, container_id: str) -> float:
    """The openai backend's way of reading the stream, and nothing else."""

    async def loop() -> int:
        async with client.responses.with_streaming_response.create(
            model="gpt-5-mini",
            input="replay",
            tools=[{"type": "code_interpreter", "container": container_id}],
            include=["code_interpreter_call.outputs"],
            stream=True,
        ) as response:
            return sum([1 async for event in aiter_events(response.iter_bytes()) if json.loads(event.data)])

    started = time.perf_counter()
    count = run_sync(loop())
    assert count == 393, count
    return time.perf_counter() - started


def magic_turn(interpreter: CodeInterpreter, frontend: CountingFrontend) -> float:
    frontend.times.clear()
    started = time.perf_counter()
    result = interpreter.run("replay", new=True)
    elapsed = time.perf_counter() - started
    assert result.ok and len(result.calls) == 3 and result.files, result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if not fixtures_available():
        sys.exit(
            "../shared/fixtures/openai/ is absent: this benchmark replays a genuine recording from there."
        )

    with tempfile.TemporaryDirectory() as out:
        fast = _server(Path(out), event_delay=0.0)
        paced_server = _server(Path(out), event_delay=1 / 300)
        os.environ.update(OPENAI_API_KEY="bench", OPENAI_BASE_URL=fast.url, CI_MAGIC_BACKEND="openai")
        client = openai.OpenAI(base_url=fast.url, api_key="bench")
        container = client.containers.create(name="bench-bare")
        frontend = CountingFrontend()
        interpreter = CodeInterpreter(frontend=frontend, output_dir=out)

        async_client = openai.AsyncOpenAI(base_url=fast.url, api_key="bench")
        bare_loop(client, container.id)  # warm every path (imports, connections, container)
        bare_async_loop(async_client, container.id)
        decoded_loop(async_client, container.id)
        magic_turn(interpreter, frontend)
        bare, bare_async, decoded, magic = [], [], [], []
        for _ in range(args.repeat):  # interleaved, so machine noise hits all alike
            bare.append(bare_loop(client, container.id))
            bare_async.append(bare_async_loop(async_client, container.id))
            decoded.append(decoded_loop(async_client, container.id))
            magic.append(magic_turn(interpreter, frontend))
        bare_ms, async_ms, decoded_ms, magic_ms = (
            1000 * statistics.median(x) for x in (bare, bare_async, decoded, magic)
        )
        print(f"bare SDK stream loop, sync client:  median {bare_ms:.1f} ms over {args.repeat} runs")
        print(f"bare SDK stream loop, async client: median {async_ms:.1f} ms")
        print(f"raw stream + our SSE decoding only: median {decoded_ms:.1f} ms")
        print(f"%%ci turn, same recording:          median {magic_ms:.1f} ms")
        print(f"ratio magic / bare sync loop:       {magic_ms / bare_ms:.3f}  (target <= 1.15)")
        print(f"ratio magic / bare async loop:      {magic_ms / async_ms:.3f}")
        print(f"ratio magic / decoding only:        {magic_ms / decoded_ms:.3f}  (the turn's own work)")

        interpreter.close()
        os.environ["OPENAI_BASE_URL"] = paced_server.url
        interpreter = CodeInterpreter(frontend=frontend, output_dir=out)
        started = time.perf_counter()
        magic_turn(interpreter, frontend)
        paced = time.perf_counter() - started
        per_second = _peak_per_second(frontend.times)
        print(
            f"paced at ~300 events/s: {len(frontend.times)} display messages in {paced:.2f} s = "
            f"{len(frontend.times) / paced:.1f}/s on average, peak {per_second} in any 1 s window "
            "(target <= 20; unthrottled: one per delta, ~360)"
        )
        interpreter.close()
        fast.stop()
        paced_server.stop()


class _ServerProcess:
    def __init__(self, process: BackgroundProcess, url: str) -> None:
        self.process, self.url = process, url

    def stop(self) -> None:
        self.process.stop()


def _server(logs: Path, *, event_delay: float) -> _ServerProcess:
    process = BackgroundProcess(
        [
            sys.executable,
            "-m",
            "tests.servers.openai_server",
            "--scenario",
            f"replay:{VERCEL_CHUNKS}",
            "--event-delay",
            str(event_delay),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        log=logs / f"server-{event_delay}.log",
    )
    return _ServerProcess(process, process.wait_for_line(r"^READY (\S+)", timeout=30).group(1))


def _peak_per_second(times: list[float]) -> int:
    peak, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] > 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


if __name__ == "__main__":
    main()
