"""The session's own record of the conversation: one entry per turn, the single source for
carrying a conversation over (expiry, kernel restart), restoring state, replay and export.

Per turn: the prompt, each call's code and whether it succeeded, short outputs, the answer, the
files saved, and durations. Everything is plain data (JSON round trip: ``to_json`` /
``Transcript.from_json``), bounded: outputs and answers are cut, code is kept whole (it is what
gets re-run). The interface only grows: new fields get defaults, readers ignore unknown keys.

    transcript.add(turn_record(result, kind="ci", timer=timer))
    transcript.code_in(container_id)        # the successful code that ran there, in order
    transcript.as_messages()                # the conversation as plain user/assistant messages
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ci_magic.events import CallStatus, Event
from ci_magic.result import Result

__all__ = [
    "OUTPUT_KEEP_CHARS",
    "CallEntry",
    "CallTimer",
    "FileEntry",
    "Transcript",
    "TurnEntry",
    "TurnKind",
    "turn_record",
]

OUTPUT_KEEP_CHARS = 2_000  # of each call's printed output: the first and last half of this
ANSWER_KEEP_CHARS = 20_000
MESSAGES_BUDGET_CHARS = 60_000  # what as_messages() sends at most: the latest turns first

TurnKind = Literal["ci", "exec", "restore", "replay"]
# ci: a prompt to the model; exec: %%ci_exec code; restore: state re-run into a replacement
# container (not part of the conversation); replay: %ci_replay (recorded code run again).


@dataclass
class CallEntry:
    """One code call: its code verbatim, whether it succeeded, a short view of its output."""

    code: str
    ok: bool
    container_id: str | None = None
    output: str = ""  # printed text, cut to OUTPUT_KEEP_CHARS
    error: str | None = None  # "NameError: name 'x' is not defined" when it raised
    seconds: float | None = None  # execution time, when the backend reported the call running
    call_id: str = ""


@dataclass
class FileEntry:
    """A file the turn saved locally (name relative to the output folder)."""

    name: str
    container_path: str = ""
    size: int = 0
    sha256: str | None = None  # filled by whoever hashes the local copy (provenance)


@dataclass
class TurnEntry:
    kind: TurnKind
    prompt: str
    calls: list[CallEntry] = field(default_factory=list)
    answer: str = ""
    files: list[FileEntry] = field(default_factory=list)
    started_at: float = 0.0  # epoch seconds
    seconds: float = 0.0  # wall time of the whole turn
    container_id: str | None = None
    response_id: str | None = None
    model: str | None = None
    ok: bool = True
    error: str | None = None

    @property
    def code_seconds(self) -> float:
        """Execution time of the calls that reported one."""
        return sum(c.seconds or 0.0 for c in self.calls)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TurnEntry:
        calls = [_known(CallEntry, c) for c in data.get("calls") or [] if isinstance(c, Mapping)]
        files = [_known(FileEntry, f) for f in data.get("files") or [] if isinstance(f, Mapping)]
        entry = _known(cls, {k: v for k, v in data.items() if k not in ("calls", "files")})
        entry.calls, entry.files = calls, files
        return entry


def _known(cls: Any, data: Mapping[str, Any]) -> Any:
    """``cls(**data)`` with only the fields ``cls`` has (files written by newer versions load)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


class Transcript:
    """Every turn of the session, in order."""

    def __init__(self, turns: Iterable[TurnEntry] = ()) -> None:
        self.turns: list[TurnEntry] = list(turns)

    def __len__(self) -> int:
        return len(self.turns)

    def __iter__(self) -> Iterator[TurnEntry]:
        return iter(self.turns)

    def add(self, turn: TurnEntry) -> TurnEntry:
        self.turns.append(turn)
        return turn

    def clear(self) -> None:
        self.turns.clear()

    def last(self, *kinds: TurnKind) -> TurnEntry | None:
        """The latest turn (of one of ``kinds``, when given)."""
        for turn in reversed(self.turns):
            if not kinds or turn.kind in kinds:
                return turn
        return None

    def code_in(self, container_id: str) -> list[CallEntry]:
        """The calls that ran successfully in ``container_id``, in order: its in-memory state.

        A restore into that container stands for everything before it (it re-ran that state into a
        fresh kernel there), so counting starts again from it.
        """
        calls: list[CallEntry] = []
        for turn in self.turns:
            if turn.kind == "restore" and turn.container_id == container_id:
                calls.clear()
            calls.extend(
                call
                for call in turn.calls
                if call.ok and call.code.strip() and (call.container_id or turn.container_id) == container_id
            )
        return calls

    def conversation(self) -> list[TurnEntry]:
        """The turns the model took part in or the user ran (restores are housekeeping)."""
        return [t for t in self.turns if t.kind != "restore"]

    def as_messages(self, budget_chars: int = MESSAGES_BUDGET_CHARS) -> list[dict[str, str]]:
        """The conversation so far as plain ``{"role", "content"}`` messages (user, assistant, ...),
        which both the Responses API (input items) and Chat Completions accept. The latest turns are
        kept whole when the budget runs out; older ones are left out."""
        pairs: list[list[dict[str, str]]] = []
        used = 0
        for turn in reversed(self.conversation()):
            pair = [
                {"role": "user", "content": _user_text(turn)},
                {"role": "assistant", "content": _assistant_text(turn)},
            ]
            size = sum(len(m["content"]) for m in pair)
            if pairs and used + size > budget_chars:
                break
            pairs.append(pair)
            used += size
        return [message for pair in reversed(pairs) for message in pair]

    def to_json(self) -> list[dict[str, Any]]:
        return [turn.to_json() for turn in self.turns]

    @classmethod
    def from_json(cls, data: Any) -> Transcript:
        if not isinstance(data, list):
            return cls()
        return cls(TurnEntry.from_json(t) for t in data if isinstance(t, Mapping))


def _user_text(turn: TurnEntry) -> str:
    if turn.kind == "exec":
        return "(I ran this code in the sandbox myself.)"
    if turn.kind == "replay":
        return "(I re-ran earlier code in the sandbox.)"
    return turn.prompt


def _assistant_text(turn: TurnEntry) -> str:
    parts: list[str] = []
    for call in turn.calls:
        status = "ran" if call.ok else "failed"
        parts.append(f"Code that {status} in the sandbox:\n```python\n{call.code.rstrip()}\n```")
        if call.output.strip():
            parts.append(f"Output:\n```\n{call.output.rstrip()}\n```")
        if call.error:
            parts.append(f"Error: {call.error}")
    if turn.answer.strip():
        parts.append(turn.answer.strip())
    if turn.files:
        parts.append("Files saved: " + ", ".join(f.container_path or f.name for f in turn.files))
    if not turn.ok and turn.error:
        parts.append(f"(The turn stopped: {turn.error})")
    return "\n\n".join(parts) or "(no answer)"


def _cut(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    half = keep // 2
    return f"{text[:half]}\n[... {len(text) - keep:,} characters left out ...]\n{text[-half:]}"


_TRACEBACK = "Traceback (most recent call last)"
_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b.*)$", re.MULTILINE
)


def _traceback_in(logs: str) -> str | None:
    """The exception a call's printed output ends on, for backends that report a raised call only as
    text (OpenAI's code_interpreter marks it completed, with the traceback in its logs)."""
    if _TRACEBACK not in logs:
        return None
    found = _EXCEPTION_LINE.findall(logs[logs.rindex(_TRACEBACK) :])
    return found[-1].strip() if found else "an exception (see its output)"


class CallTimer:
    """Measures each call's execution time from the turn's events (running -> completed|failed)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def observe(self, event: Event) -> None:
        if not isinstance(event, CallStatus):
            return
        if event.status in ("running", "interpreting"):
            self._started.setdefault(event.call_id, self._clock())
        elif event.status in ("completed", "failed", "incomplete") and event.call_id in self._started:
            self.seconds[event.call_id] = self._clock() - self._started[event.call_id]


def turn_record(
    result: Result,
    *,
    kind: TurnKind,
    timer: CallTimer | None = None,
    started_at: float | None = None,
) -> TurnEntry:
    """The transcript entry of a finished turn, from its Result (and call timings, when measured)."""
    calls = []
    for call in result.calls:
        if not call.code.strip():
            continue
        error = call.error
        logs = call.logs
        raised = f"{error.name}: {error.value}" if error is not None else _traceback_in(logs)
        calls.append(
            CallEntry(
                code=call.code,
                ok=call.status == "completed" and raised is None,
                container_id=call.container_id or result.container_id,
                output=_cut(logs, OUTPUT_KEEP_CHARS),
                error=raised[:500] if raised is not None else None,
                seconds=(timer.seconds.get(call.call_id) if timer is not None else None),
                call_id=call.call_id,
            )
        )
    return TurnEntry(
        kind=kind,
        prompt=result.prompt,
        calls=calls,
        answer=_cut(result.text, ANSWER_KEEP_CHARS),
        files=[FileEntry(f.name, f.container_path, f.size) for f in result.files if not f.displayed],
        started_at=started_at if started_at is not None else time.time() - result.wall_time,
        seconds=result.wall_time,
        container_id=result.container_id,
        response_id=result.response_id,
        model=result.model,
        ok=result.error is None,
        error=result.error.message if result.error is not None else None,
    )
