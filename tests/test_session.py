"""The Session's turn flow on a scripted in-memory backend: retries, downloads, and errors that keep
their class from where they were raised to the Result the user gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from ci_magic import events
from ci_magic.backends.base import TurnRequest
from ci_magic.errors import BackendError, ConfigurationError, Interrupted, StreamError, VariableError
from ci_magic.result import LOG_KEEP_CHARS, LogText
from ci_magic.session import Session, SilentView, TurnOptions
from ci_magic.session_settings import SessionSettings
from ci_magic.variables.registry import PushRegistry, PushRequest
from tests.fakes import FakeBackend
from tests.render_support import png_bytes

OPTIONS = TurnOptions(model="fake-model", instructions="Be brief.")


def make_session(
    backend: FakeBackend, tmp_path: Path, registry: PushRegistry | None = None, **settings: object
) -> Session:
    """A session on ``backend`` saving into ``tmp_path``; ``settings`` override ``SessionSettings``."""
    chosen = SessionSettings(
        memory_limit="1g",
        expires_after_minutes=20,
        output_dir=tmp_path / "ci_outputs",
        **settings,  # type: ignore[arg-type]
    )
    return Session(backend, chosen, session_id="test", registry=registry)


def turn(session: Session, runner: asyncio.Runner, prompt: str = "go", **kwargs: object):
    return runner.run(session.run_turn(prompt, kwargs.pop("options", OPTIONS), SilentView(), **kwargs))  # type: ignore[arg-type]


def answer(text: str, *before: events.Event):
    """A turn script: optional events, then ``text`` as the answer, then Completed."""

    async def script(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        backend._usable(request.container_id)  # a real backend fails on a container that is gone
        yield events.TurnStarted("resp_1", "fake-model")
        for event in before:
            yield event
        yield events.TextDelta(text)
        yield events.TextDone(text)
        yield events.Completed("resp_1", request.container_id)

    return script


def test_a_container_gone_between_cells_is_replaced_and_the_turn_runs_again(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    backend.turns += [answer("first"), answer("second"), answer("second")]
    first = turn(session, runner)
    backend.expire(first.container_id)
    second = turn(session, runner)
    assert second.ok and second.text == "second"
    assert second.container_id != first.container_id and backend.count("create_container") == 2
    assert [r.container_id for r in backend.requests] == [
        first.container_id,
        first.container_id,
        second.container_id,
    ]
    assert any("previous container expired" in n for n in session.conversation.notes), "the model is told"


def test_a_broken_stream_is_not_retried_and_keeps_its_class_and_what_arrived(tmp_path, runner) -> None:
    async def breaks(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        yield events.TurnStarted()
        yield events.TextDelta("Half an ans")
        raise StreamError("The stream broke mid-way.")

    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    backend.turns.append(breaks)
    result = turn(session, runner)
    assert isinstance(result.error, StreamError) and result.error.result is result
    assert result.text == "Half an ans" and backend.count("stream") == 1


def test_errors_keep_their_class_variable_configuration_and_in_band_failures(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path, upload_size_cap=10)
    backend.turns.append(answer("never"))
    pushed = turn(session, runner, push=[PushRequest("notes", "x" * 100)])
    assert isinstance(pushed.error, VariableError), pushed.error
    assert pushed.error._render_traceback_()[0].startswith("ci-magic variable: ")
    assert backend.count("stream") == 0, "nothing was asked of the model"

    backend.turns.clear()  # no script: the fake raises ConfigurationError like a backend missing a model
    assert isinstance(turn(session, runner).error, ConfigurationError)

    async def refused(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        yield events.TurnStarted()
        yield events.Failed("The response failed: quota exceeded (insufficient_quota).")

    backend.turns.append(refused)
    failed = turn(session, runner)
    assert type(failed.error) is BackendError and "quota exceeded" in failed.error.message


def test_an_interrupt_ends_the_turn_with_interrupted_and_keeps_what_arrived(tmp_path, runner) -> None:
    started = asyncio.Event()

    async def slow(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        yield events.TextDelta("Working on it")
        started.set()
        await asyncio.sleep(60)
        yield events.Completed()

    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    backend.turns.append(slow)

    async def interrupted():
        task = asyncio.ensure_future(session.run_turn("go", OPTIONS, SilentView()))
        await started.wait()
        task.cancel()  # what the bridge does on Ctrl-C
        return await task

    result = runner.run(asyncio.wait_for(interrupted(), 10))
    assert isinstance(result.error, Interrupted) and result.text == "Working on it"
    assert session.container is not None, "the container is kept"


def test_cited_and_new_files_are_downloaded_and_a_displayed_image_is_not(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    chart = png_bytes()
    made: dict[str, str] = {}

    async def writes_files(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        cid = request.container_id
        made["cited"] = backend.add_model_file(cid, "/mnt/data/report.csv", b"a,b\n1,2\n").id
        backend.add_model_file(cid, "/mnt/data/notes.txt", b"uncited but new")
        shown = backend.add_model_file(cid, "/mnt/data/cfile_shown.png", chart).id
        only_copy = backend.add_model_file(cid, "/mnt/data/cfile_only.png", png_bytes(color=(9, 9, 9))).id
        backend.add_model_file(cid, "/mnt/data/chart.png", chart)  # savefig of the shown figure, same bytes
        yield events.TurnStarted()
        yield events.CallStarted("call_1", cid)
        yield events.CodeDone("call_1", "df.to_csv('report.csv')")
        yield events.Image("call_1", chart)
        yield events.CallStatus("call_1", "completed")
        yield events.TextDelta("See report.csv.")
        yield events.FileCited(cid, shown, "cfile_shown.png", displayed=True)
        yield events.FileCited(cid, only_copy, "cfile_only.png")  # zero-length, but no output carried it
        yield events.FileCited(cid, made["cited"], "report.csv", 4, 14)
        yield events.Completed(container_id=cid)

    backend.turns.append(writes_files)
    result = turn(session, runner)
    saved = {f.name: f for f in result.files}
    assert set(saved) == {"report.csv", "notes.txt", "cfile_only.png", "chart.png", "figures/call_1-1.png"}
    assert saved["chart.png"].displayed, "a file identical to the shown image is listed, not shown twice"
    assert saved["report.csv"].cited and not saved["notes.txt"].cited
    assert saved["figures/call_1-1.png"].displayed and not saved["cfile_only.png"].displayed
    assert saved["report.csv"].path.read_bytes() == b"a,b\n1,2\n"
    rows = runner.run(session.file_rows())
    sizes = {row.name: row.size for row in rows}
    assert sizes["report.csv"] == 8, "a model file's size is known once saved (the listing says None)"


def test_long_output_is_saved_whole_and_the_record_keeps_it(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    line = "".join(f"row {i}\n" for i in range(20_000))
    backend.turns.append(
        answer(
            "done",
            events.CallStarted("c1"),
            events.Logs("c1", line, "stdout"),
            events.ExecutionError("c1", "E", "x"),
        )
    )
    result = turn(session, runner)
    [log] = [o for o in result.calls[0].outputs if isinstance(o, LogText)]
    assert log.size > 2 * LOG_KEEP_CHARS and log.saved_as is not None
    assert log.saved_as.read_text() == line == result.calls[0].logs
    assert result.calls[0].status == "failed", "a call whose code raised is not done"
    assert result.failed_calls == result.calls


def test_files_written_by_exec_are_the_users_and_reset_counts_turns_from_zero(tmp_path, runner) -> None:
    async def exec_writes(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        backend.add_model_file(request.container_id, "/mnt/data/mine.txt", b"by %%ci_exec")
        yield events.CallStarted("c1", request.container_id)
        yield events.CodeDone("c1", request.exec_code or "")
        yield events.CallStatus("c1", "completed")
        yield events.Completed(container_id=request.container_id)

    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    backend.turns.append(exec_writes)
    turn(session, runner, options=TurnOptions("m", "", exec_code="open('mine.txt','w')"))
    [row] = runner.run(session.file_rows())
    assert row.source == "notebook"
    assert session.turns == 1
    replacement = FakeBackend()
    runner.run(session.reset(replacement))
    assert session.turns == 0 and session.backend is replacement and session.container is None


def test_a_call_printing_without_end_holds_a_bounded_log_in_host_memory(monkeypatch) -> None:
    # The sandbox decides how much it prints: past the cap the log keeps its head and a rolling tail.
    monkeypatch.setattr(LogText, "memory_cap", 1_000)
    log = LogText("call_1", "stdout")
    for i in range(200):
        log.append(f"{i:04d}" + "x" * 96)  # 100 characters a line, 20,000 in all
    assert log.size == 20_000
    text = log.text
    assert text.startswith("0000") and text.endswith("0199" + "x" * 96)
    assert "characters not kept" in text and log.dropped > 0
    assert len(text) < 1_100 and log._held <= 500
    head, tail = log.head_tail(50)
    assert head.startswith("0000") and tail.endswith("x" * 50)


def test_a_stream_message_of_megabytes_becomes_events_of_at_most_2_mib_with_nothing_lost() -> None:
    from ci_magic.backends.kernel_messages import MAX_TEXT, events_from_message

    text = "a" * (5 * MAX_TEXT // 2)
    message = {"header": {"msg_type": "stream"}, "content": {"name": "stdout", "text": text}}
    collected = events_from_message(message, "call_1")
    assert [len(e.text) for e in collected] == [MAX_TEXT, MAX_TEXT, MAX_TEXT // 2]  # type: ignore[attr-defined]
    assert "".join(e.text for e in collected) == text  # type: ignore[attr-defined]
