"""The scripted code-interpreter model: a test double that really runs its code.

A turn is a list of steps, ``Call(code)`` and ``Text(markdown)``. The server streams each call's
code, runs it through the server's ``Backend`` (a sandbox kernel by default, persistent per container)
and reports logs, shown figures
(image outputs plus zero-length ``cfile_<id>.png`` citations, as OpenAI does for ``plt.show()``)
and new files; each ``sandbox:/mnt/data/<name>`` link in a text gets a citation covering the
link target. Turns come from a list (one per request, in order) or from a function of the
request JSON, e.g. ``quickstart`` below, which scripts by prompt.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Any, Literal

from ci_magic import events
from tests.servers.containers import StoredFile, new_id
from tests.servers.http_base import ApiError
from tests.servers.responses_stream import (
    ResponseEvents,
    SSEEvent,
    TurnContext,
    code_chunks,
    prompt_text,
    text_chunks,
)

__all__ = [
    "Call",
    "Reasoning",
    "Scripted",
    "Step",
    "Text",
    "Turn",
    "fenced_code",
    "forced_code_turn",
    "forces_code_interpreter",
    "quickstart",
]

_LINK = re.compile(r"sandbox:(/mnt/data/[^\s)\]\"'>]+)")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_PARQUET = re.compile(r"/mnt/data/([\w.-]+?)\.parquet\b")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{32}-")


@dataclass(frozen=True)
class Call:
    """One code_interpreter call; ``/mnt/data`` paths in the code work as on OpenAI."""

    code: str


@dataclass(frozen=True)
class Text:
    """The assistant's Markdown answer; ``sandbox:/mnt/data/...`` links become citations."""

    text: str


Step = Call | Text
Turn = Sequence[Step]
Reasoning = Literal["each", "first", "none"]


class Scripted:
    """A responder playing the given turns, or asking ``turns(request_json)`` for each one."""

    def __init__(
        self, turns: Sequence[Turn] | Callable[[dict[str, Any]], Turn], *, reasoning: Reasoning = "each"
    ) -> None:
        """``reasoning``: a reasoning item before every step (as gpt-5-nano did in the vercel
        recording), only before the first (gpt-5 in the pydantic one), or none."""
        if reasoning not in ("each", "first", "none"):
            raise ValueError(f"reasoning must be 'each', 'first' or 'none', not {reasoning!r}")
        self._source = turns if callable(turns) else list(turns)
        self._used = 0
        self._lock = Lock()
        self.reasoning = reasoning

    def next_turn(self, request: dict[str, Any]) -> Turn:
        if callable(self._source):
            return self._source(request)
        with self._lock:
            if self._used >= len(self._source):
                raise ApiError(
                    400,
                    f"The scripted model has no turn left: all {len(self._source)} scripted "
                    "turns were used. Script one more turn for this request.",
                )
            turn = self._source[self._used]
            self._used += 1
            return turn

    # Above events(): below that method, this class body's name `events` is the method, not the module.
    def _turn(self, ctx: TurnContext, turn: Turn) -> Iterator[events.Event]:
        """The turn as our typed events; each call's code really runs through the store's backend."""
        rng = random.Random(ctx.response_id)
        figures: list[StoredFile] = []
        yield events.TurnStarted(ctx.response_id, ctx.request.get("model"))
        for number, step in enumerate(turn):
            if self.reasoning == "each" or (self.reasoning == "first" and number == 0):
                yield events.ThinkingDelta("")
            if isinstance(step, Call):
                yield from _call(ctx, step.code, figures)
            else:
                yield from _text(ctx, step.text, figures, rng)
                figures.clear()
        yield events.Completed(ctx.response_id, container_id=ctx.container.id if ctx.container else None)

    def events(self, ctx: TurnContext) -> Iterator[SSEEvent]:
        turn = self.next_turn(ctx.request)
        if ctx.container is None and any(isinstance(step, Call) for step in turn):
            raise ApiError(
                400,
                "The scripted turn runs code but the request has no code_interpreter tool. "
                "Add tools=[{'type': 'code_interpreter', 'container': ...}].",
                param="tools",
            )
        container_id = ctx.container.id if ctx.container else None
        yield from ResponseEvents(ctx).encode(self._turn(ctx, turn), container_id=container_id)


def _call(ctx: TurnContext, code: str, figures: list[StoredFile]) -> Iterator[events.Event]:
    """One call: its code streamed, then what the backend's run of it produced. Shown figures are
    kept as ``cfile_<id>.png`` files, as OpenAI does for ``plt.show()``."""
    container = ctx.container
    assert container is not None
    call_id = new_id("ci", 50)
    yield events.CallStarted(call_id, container.id)
    for piece in code_chunks(code):
        yield events.CodeDelta(call_id, piece)
    yield events.CodeDone(call_id, code)
    yield events.CallStatus(call_id, "running")
    status: events.CallStatusName = "completed"
    for event in ctx.store.run(container, code, model=str(ctx.request.get("model") or "")):
        if isinstance(event, events.Image):
            file_id = new_id("cfile", 32)
            stored = ctx.store.add_file(
                container, f"{file_id}.png", event.data, source="assistant", file_id=file_id
            )
            figures.append(stored)
        if isinstance(event, (events.Logs, events.Image, events.RichOutput, events.ExecutionError)):
            yield dataclasses.replace(event, call_id=call_id)
        elif isinstance(event, events.CallStatus) and event.status in ("failed", "incomplete"):
            status = event.status
    yield events.CallStatus(call_id, status)


def _text(
    ctx: TurnContext, text: str, figures: list[StoredFile], rng: random.Random
) -> Iterator[events.Event]:
    """The answer in deltas; shown figures cited at zero length, each sandbox link at its target."""
    for piece in text_chunks(text, rng):
        yield events.TextDelta(piece)
    container = ctx.container
    for figure in figures:
        yield events.FileCited(figure.container_id, figure.id, figure.relative, 0, 0, displayed=True)
    if container is not None:
        ctx.store.sync_files(container)
        for match in _LINK.finditer(text):
            stored = container.file_by_path(match.group(1))
            if stored is not None:
                name = stored.relative.rsplit("/", 1)[-1]
                yield events.FileCited(container.id, stored.id, name, match.start(), match.end())
    yield events.TextDone(text)


# -- tool_choice forcing (the %%ci_exec path) ---------------------------------------------------


def forces_code_interpreter(request: dict[str, Any]) -> bool:
    choice = request.get("tool_choice")
    return choice == "required" or (isinstance(choice, dict) and choice.get("type") == "code_interpreter")


def fenced_code(prompt: str) -> str | None:
    """The code between the first pair of ``` fences, if any."""
    match = _FENCE.search(prompt)
    return match.group(1) if match else None


def forced_code_turn(request: dict[str, Any], text: str = "Done.") -> Turn | None:
    """When the request forces the tool and the prompt fences code, run exactly that code."""
    if not forces_code_interpreter(request):
        return None
    code = fenced_code(prompt_text(request))
    return None if code is None else [Call(code), Text(text)]


# -- the quickstart scenario --------------------------------------------------------------------

_SQUARES_TABLE = """\
import pandas as pd

df = pd.DataFrame({"n": range(1, 101)})
df["square"] = df["n"] ** 2
print(df.head())
"""

_SQUARES_PLOT = """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(df["n"], df["square"], color="#1f77b4")
ax.set_xlabel("n")
ax.set_ylabel("n²")
ax.set_title("Squares of 1..100")
ax.grid(True, alpha=0.3)
plt.show()

df.to_csv("/mnt/data/squares.csv", index=False)
print(f"saved {len(df)} rows to /mnt/data/squares.csv")
"""

_SQUARES_ANSWER = (
    "I built a table of the numbers 1..100 and their squares, plotted the squares, and saved the "
    "table.\n\n- Rows: 100 (n from 1 to 100)\n- Largest square: 10,000\n\n"
    "[Download squares.csv](sandbox:/mnt/data/squares.csv)"
)

_LIST_FILES = """\
import os

for name in sorted(os.listdir("/mnt/data")):
    size = os.path.getsize(os.path.join("/mnt/data", name))
    print(f"{name}\\t{size} bytes")
"""


def _dataset_turn(stem: str) -> Turn:
    name = _UPLOAD_PREFIX.sub("", stem)  # df, not the <32 hex>-df OpenAI stores the upload as
    var = re.sub(r"\W", "_", name)
    load = (
        "import pandas as pd\n\n"
        f'{var} = pd.read_parquet("/mnt/data/{stem}.parquet")\n'
        f"print({var}.shape)\n"
        f"print({var}.describe())\n"
    )
    plot = (
        "import matplotlib.pyplot as plt\n\n"
        f'numeric = {var}.select_dtypes("number")\n'
        "if len(numeric.columns):\n"
        "    column = numeric.columns[0]\n"
        "    fig, ax = plt.subplots(figsize=(6, 4))\n"
        "    ax.plot(numeric[column].to_numpy())\n"
        "    ax.set_title(column)\n"
        "    plt.show()\n\n"
        f'{var}.describe(include="all").to_csv("/mnt/data/{name}_summary.csv")\n'
    )
    answer = (
        f"I loaded `{name}`, printed its shape and summary statistics, plotted its first numeric "
        f"column and saved the summary.\n\n"
        f"[Download {name}_summary.csv](sandbox:/mnt/data/{name}_summary.csv)"
    )
    return [Call(load), Call(plot), Text(answer)]


def quickstart(request: dict[str, Any]) -> Turn:
    """The demo model: squares of 1..100, pushed parquet datasets, otherwise a file listing."""
    forced = forced_code_turn(request)
    if forced is not None:
        return forced
    prompt = prompt_text(request)
    dataset = _PARQUET.search(prompt)
    if dataset:
        return _dataset_turn(dataset.group(1))
    if "square" in prompt.lower():
        return [Call(_SQUARES_TABLE), Call(_SQUARES_PLOT), Text(_SQUARES_ANSWER)]
    return [
        Call(_LIST_FILES),
        Text(
            "These are the files currently in `/mnt/data`, with their sizes, as "
            "listed above. Tell me what you would like to do with them."
        ),
    ]
