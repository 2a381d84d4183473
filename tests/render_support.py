"""Helpers for the renderer's tests and benchmark: a recording frontend, a fake clock, and the
genuine OpenAI recording turned into events by the openai backend's own translator."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ci_magic import events
from ci_magic.backends.openai_backend import ResponsesTranslator
from ci_magic.render.frontend import MimeBundle, SlotRole
from ci_magic.result import Result, ResultBuilder

__all__ = [
    "RECORDING",
    "FakeClock",
    "RecordingFrontend",
    "chart_turn",
    "chunked",
    "openai_recording_events",
    "parsed_payloads",
    "play",
    "png_bytes",
    "recording_events",
]

# The shared fixtures sit beside the repository (../shared); tests using them skip when absent.
SHARED = Path(__file__).resolve().parents[2] / "shared"
RECORDING = SHARED / "fixtures" / "openai" / "vercel__ai__openai-code-interpreter-tool.1.chunks.txt"


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordedSlot:
    frontend: RecordingFrontend
    role: SlotRole
    bundle: MimeBundle
    updates: int = 0
    final: bool = False
    history: list[MimeBundle] = field(default_factory=list)

    def update(self, bundle: MimeBundle, *, final: bool = False) -> None:
        self.history.append(self.bundle)
        self.bundle = bundle
        self.updates += 1
        self.final = self.final or final
        self.frontend.messages.append(("update", self.frontend.clock() if self.frontend.clock else 0.0))


@dataclass
class RecordingFrontend:
    """Records every display and update, like the messages a kernel would send."""

    clock: FakeClock | None = None
    slots: list[RecordedSlot] = field(default_factory=list)
    messages: list[tuple[str, float]] = field(default_factory=list)

    def open(self, bundle: MimeBundle, *, role: SlotRole = "output", final: bool = False) -> RecordedSlot:
        slot = RecordedSlot(self, role, bundle, final=final)
        self.slots.append(slot)
        self.messages.append(("display", self.clock() if self.clock else 0.0))
        return slot

    def bundles(self) -> list[MimeBundle]:
        return [slot.bundle for slot in self.slots]

    def all_text(self, mime: str) -> str:
        return "\n".join(str(b.get(mime, "")) for b in self.bundles())


def openai_recording_events(path: Path = RECORDING) -> list[events.Event]:
    """The recording's SSE payloads as the openai backend's translator turns them into events."""
    return recording_events(path.read_text(encoding="utf-8").splitlines())


def recording_events(lines: list[str]) -> list[events.Event]:
    translator = ResponsesTranslator()
    return [event for payload in parsed_payloads(lines) for event in translator.translate(payload)]


def parsed_payloads(lines: list[str]) -> list[dict]:
    """Each JSON line parsed, as the openai backend does with each SSE event's data."""
    return [json.loads(line) for line in lines if line.strip()]


# -- hand-written turns -------------------------------------------------------------------------------


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


CHART_CODE = """import pandas as pd
import matplotlib.pyplot as plt

sales = pd.read_parquet("/mnt/data/sales.parquet")
monthly = sales.groupby("month")["revenue"].sum()
print("months:", len(monthly))
monthly.plot(kind="bar", title="Revenue by month")
plt.savefig("/mnt/data/chart.png")
plt.show()
monthly.to_frame().head()
"""

DATAFRAME_HTML = """<div>
<style scoped>
    .dataframe tbody tr th:only-of-type { vertical-align: middle; }
</style>
<table border="1" class="dataframe">
  <thead><tr style="text-align: right;"><th></th><th>revenue</th></tr>
    <tr><th>month</th><th></th></tr></thead>
  <tbody>
    <tr><th>2024-01</th><td>1200.5</td></tr>
    <tr><th>2024-02</th><td>1344.0</td></tr>
  </tbody>
</table>
</div>"""

CHART_ANSWER = (
    "Revenue grew **12%** from January to February (1,200.5 → 1,344.0).\n\n"
    "The chart is saved as [chart.png](sandbox:/mnt/data/chart.png)."
)


def chart_turn(
    png: bytes, *, answer: str = CHART_ANSWER, call_id: str = "ci_chart_0001"
) -> list[events.Event]:
    """A typical turn: code streams in small deltas, runs, prints, shows a chart and a table, answers."""
    turn: list[events.Event] = [
        events.TurnStarted("resp_chart", "gpt-5"),
        events.CallStarted(call_id, "cntr_1"),
        events.CallStatus(call_id, "writing"),
    ]
    turn += [events.CodeDelta(call_id, piece) for piece in chunked(CHART_CODE, 3)]
    turn += [
        events.CodeDone(call_id, CHART_CODE),
        events.CallStatus(call_id, "running"),
        events.Logs(call_id, "months: 2\n", "stdout"),
        events.Image(call_id, png),
        events.RichOutput(
            call_id, {"text/html": DATAFRAME_HTML, "text/plain": "revenue\nmonth\n2024-01  1200.5"}
        ),
        events.CallStatus(call_id, "completed"),
    ]
    turn += [events.TextDelta(piece) for piece in chunked(answer, 4)]
    turn += [
        events.TextDone(answer),
        events.FileCited("cntr_1", "cfile_show", "cfile_show.png", 0, 0, displayed=True),
        events.FileCited("cntr_1", "cfile_chart", "chart.png", answer.find("sandbox:"), len(answer) - 1),
        events.Completed("resp_chart", "cntr_1", events.Usage(1200, 300, 1500)),
    ]
    return turn


def play(
    stream: Iterable[events.Event],
    view: object,
    clock: FakeClock,
    *,
    step: float = 0.003,
    prompt: str = "plot revenue by month",
    on_event: Callable[[events.Event], None] | None = None,
) -> Result:
    """Feed events like the session does: one every ``step`` seconds, a tick every 100 ms.

    A view with a ``builder`` folds the events itself (the session's TurnView); others get a builder here.
    """
    own = getattr(view, "builder", None)
    builder = own if own is not None else ResultBuilder(prompt)
    builder.result.prompt = prompt
    start = clock()
    next_tick = start + 0.1
    for event in stream:
        clock.advance(step)
        if own is None:
            builder.feed(event)
        view.handle(event)  # type: ignore[attr-defined]
        while clock() >= next_tick:
            view.tick()  # type: ignore[attr-defined]
            next_tick += 0.1
        if on_event is not None:
            on_event(event)
    builder.result.wall_time = clock() - start
    return builder.result
