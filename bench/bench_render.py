"""Renderer cost on the genuine OpenAI recording (~390 SSE events: code deltas, text deltas, outputs).

Prints, from one run:
1. CPU per event of a bare loop over the recorded stream as the SDK's ``Stream`` parses it (json +
   openai's ``construct_type``), of the loop the openai backend runs instead (json only), and of
   that loop when it also translates, folds the Result and feeds a ``TurnView`` whose frontend
   JSON-encodes every bundle (what a kernel pays to send it). The ratio against the SDK loop is
   the renderer's share of the magic's wall time at full speed (target <= 1.15).
2. Display messages per second when the same events arrive at 300 events/s (fake clock), with
   the default budget and without one (target <= 20/s; unthrottled shows what the budget saves).

Run: .venv/bin/python bench/bench_render.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's tests/ helpers

from openai._models import construct_type  # the SDK's own per-event parsing
from openai.types.responses import ResponseStreamEvent

from ci_magic.backends.openai_backend import ResponsesTranslator
from ci_magic.render.frontend import MimeBundle, SlotRole
from ci_magic.render.live import TurnView
from ci_magic.result import ResultBuilder
from tests.render_support import RECORDING, FakeClock, recording_events


class CountingFrontend:
    """Counts messages and pays their JSON encoding, like a kernel sending display data."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.encoded_bytes = 0

    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> CountingFrontend:
        self.update(bundle)
        return self

    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        self.encoded_bytes += len(json.dumps(bundle))
        self.times.append(self.clock() if self.clock is not None else time.perf_counter())


def bare_loop(lines: list[str]) -> int:
    count = 0
    for line in lines:
        construct_type(type_=ResponseStreamEvent, value=json.loads(line))
        count += 1
    return count


def json_loop(lines: list[str]) -> int:
    return sum(1 for line in lines if json.loads(line))


def rendered_loop(lines: list[str]) -> tuple[int, CountingFrontend]:
    frontend = CountingFrontend()
    view = TurnView(frontend)
    builder = ResultBuilder("roll two dice")
    count = 0
    translator = ResponsesTranslator()
    for line in lines:
        for event in translator.translate(json.loads(line)):
            builder.feed(event)
            view.handle(event)
            count += 1
    view.finish(builder.result)
    return count, frontend


def view_costs(lines: list[str]) -> tuple[float, float]:
    """Seconds spent in TurnView.handle for all events, and in finish, on already-parsed events."""
    events = recording_events(lines)
    builder = ResultBuilder("roll two dice")
    for event in events:
        builder.feed(event)
    view = TurnView(CountingFrontend())
    started = time.perf_counter()
    for event in events:
        view.handle(event)
    handled = time.perf_counter()
    view.finish(builder.result)
    return handled - started, time.perf_counter() - handled


def paced(lines: list[str], events_per_second: float, rate: float) -> tuple[int, float, int]:
    """Messages sent while streaming (before finish), the stream's length, and the peak in any 1 s."""
    clock = FakeClock()
    frontend = CountingFrontend(clock)
    view = TurnView(frontend, max_updates_per_second=rate, clock=clock)
    start, next_tick = clock(), clock() + 0.1
    for event in recording_events(lines):
        clock.advance(1 / events_per_second)
        view.handle(event)
        if clock() >= next_tick:
            view.tick()
            next_tick += 0.1
    elapsed = clock() - start
    times = frontend.times
    peak = max(sum(1 for t in times if s <= t < s + 1) for s in times)
    return len(times), elapsed, peak


def timed(loop: Callable[[list[str]], object], lines: list[str]) -> float:
    started = time.perf_counter()
    loop(lines)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if not RECORDING.exists():
        sys.exit(f"the recording is missing: {RECORDING}")
    lines = [line for line in RECORDING.read_text(encoding="utf-8").splitlines() if line.strip()]

    bare_loop(lines), rendered_loop(lines)  # warm imports and caches
    # Interleaved, best of N: other processes on the machine slow single runs, never speed them up.
    bare_times, json_times, rendered_times = [], [], []
    for _ in range(args.repeat):
        bare_times.append(timed(bare_loop, lines))
        json_times.append(timed(json_loop, lines))
        rendered_times.append(timed(rendered_loop, lines))
    bare, json_only, rendered = min(bare_times), min(json_times), min(rendered_times)
    events, frontend = rendered_loop(lines)
    costs = [view_costs(lines) for _ in range(args.repeat)]
    handle, finish = min(c[0] for c in costs), min(c[1] for c in costs)
    per_line = 1e6 / len(lines)
    print(f"recording: {len(lines)} SSE events -> {events} ci-magic events")
    print(f"bare SDK loop (json + construct_type):          {bare * per_line:7.1f} us/event")
    print(f"json only (what the openai backend decodes):    {json_only * per_line:7.1f} us/event")
    print(f"json + translate + Result + TurnView + encode:  {rendered * per_line:7.1f} us/event")
    print(f"ratio rendered/bare SDK loop: {rendered / bare:.3f}  (target <= 1.15)")
    print(f"ratio rendered/json only:     {rendered / json_only:.3f}  (the renderer's own cost)")
    print(
        f"  of which TurnView.handle: {handle * 1e6 / events:.2f} us/event; "
        f"TurnView.finish (3 calls + answer, once): {finish * 1e3:.2f} ms"
    )
    print(
        f"messages at full speed (real clock, {rendered * 1e3:.1f} ms): {len(frontend.times)}, "
        f"{frontend.encoded_bytes / 1e3:.0f} kB encoded"
    )

    for rate in (12.0, 0.0):
        sent, elapsed, peak = paced(lines, 300.0, rate)
        label = f"budget {rate:g}/s" if rate else "no budget"
        print(
            f"300 events/s for {elapsed:.2f} s, {label:>13}: {sent:4d} messages, "
            f"{sent / elapsed:6.1f}/s on average, peak {peak} in any 1 s"
        )


if __name__ == "__main__":
    main()
