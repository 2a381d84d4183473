"""A user's work carries on when the container does not, told on a scripted in-memory backend.

The container is lost mid-session (the pushed file comes back at its new path and the code that
read it runs again there), the server refuses the conversation chained to the lost container (the
session's own record goes instead), and a kernel restart leaves a container to reattach to. The
same stories run end to end on real servers and kernels in test_session_expiry.py,
test_session_restore.py and test_session_reattach.py; here each step is checked where it happens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ci_magic import events
from ci_magic.backends.base import TurnRequest
from ci_magic.errors import BackendError
from ci_magic.session import TurnOptions
from ci_magic.transcript import Transcript
from ci_magic.variables.registry import PushRequest
from tests.fakes import FakeBackend
from tests.test_session import make_session, turn


def answer(text: str, *, response_id: str = "resp_1", chained_to: list[str | None] | None = None):
    """The model answers ``text``; like OpenAI, the conversation is chained to ``response_id``.
    ``chained_to`` records the ``previous_response_id`` the request was sent with."""

    async def script(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        backend._usable(request.container_id)  # a real backend fails on a container that is gone
        if chained_to is not None:
            chained_to.append(request.conversation.previous_response_id)
        yield events.TurnStarted(response_id, "fake-model")
        yield events.TextDelta(text)
        yield events.TextDone(text)
        request.conversation.previous_response_id = response_id
        yield events.Completed(response_id, request.container_id)

    return script


def runs_code(ran: list[TurnRequest]):
    """The sandbox runs the request's code (a %%ci_exec cell, or a restore's block) and it succeeds."""

    async def script(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        backend._usable(request.container_id)
        ran.append(request)
        yield events.CallStarted("call_1", request.container_id)
        yield events.CodeDone("call_1", request.exec_code or "")
        yield events.CallStatus("call_1", "completed")
        yield events.Completed(container_id=request.container_id)

    return script


def refused(message: str):
    async def script(request: TurnRequest, backend: FakeBackend) -> AsyncIterator[events.Event]:
        raise BackendError(message, status_code=400)
        yield  # an async generator that fails before its first event, as the SDK's request does

    return script


def test_a_lost_container_gets_the_pushed_file_at_its_new_path_and_the_code_that_read_it(
    tmp_path, runner
) -> None:
    backend = FakeBackend(hash_prefix=True)  # as OpenAI: each upload lands under a new random prefix
    session = make_session(backend, tmp_path)
    ran: list[TurnRequest] = []
    runner.run(session.push([PushRequest("notes", "sales went up")]))
    old_path = session.registry.get("notes").path  # type: ignore[union-attr]
    backend.turns.append(runs_code(ran))
    first = turn(
        session, runner, "load", options=TurnOptions("m", "", exec_code=f"text = open({old_path!r}).read()")
    )
    assert first.ok

    backend.expire(first.container_id)  # a long lunch
    backend.turns += [answer("never streamed"), runs_code(ran), answer("It went up.")]
    second = turn(session, runner, "What does the note say?")

    new_path = session.registry.get("notes").path  # type: ignore[union-attr]
    assert second.ok and second.text == "It went up." and second.container_id != first.container_id
    assert new_path != old_path and backend.content(second.container_id, "notes.txt") == b"sales went up"
    restore = ran[-1]
    assert restore.container_id == second.container_id
    assert restore.exec_code == f"text = open({new_path!r}).read()", "the recorded code reads the new path"
    assert any("re-ran 1 code block" in n.text and "text is back" in n.text for n in second.notices)
    assert any("(so text exist again)" in note for note in session.conversation.notes), "the model is told"
    assert session.transcript.last("restore") is not None, "the restore is in the session's record"


def test_with_restore_off_the_model_is_told_the_state_is_gone(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path, restore_on_expiry="off")
    ran: list[TurnRequest] = []
    backend.turns.append(runs_code(ran))
    first = turn(session, runner, "load", options=TurnOptions("m", "", exec_code="text = 'kept?'"))
    backend.expire(first.container_id)
    backend.turns += [answer("never streamed"), answer("Gone.")]
    assert turn(session, runner, "Is text still there?").ok
    assert len(ran) == 1, "nothing was re-run"
    assert any(
        "variables and other in-memory state from earlier code are gone" in n
        for n in session.conversation.notes
    )


def test_a_refused_conversation_chain_is_carried_over_from_the_sessions_record(tmp_path, runner) -> None:
    backend = FakeBackend()
    session = make_session(backend, tmp_path)
    backend.turns.append(answer("Hello, I remember this.", response_id="resp_old"))
    first = turn(session, runner, "Remember the number 42.")
    assert session.conversation.previous_response_id == "resp_old"

    # OpenAI's answer to a previous_response_id whose container expired; the container itself is fine.
    chained_to: list[str | None] = []
    backend.turns += [
        refused("Container is expired."),
        answer("42.", response_id="resp_new", chained_to=chained_to),
    ]
    second = turn(session, runner, "Which number?")
    assert second.ok and second.text == "42." and second.container_id == first.container_id
    assert chained_to == [None], "sent again without the refused chain"
    assert session.conversation.previous_response_id == "resp_new", "and chained from the new answer on"
    assert [m["content"] for m in session.conversation.messages][:2] == [
        "Remember the number 42.",
        "Hello, I remember this.",
    ]
    assert any("conversation was carried over" in n.text for n in second.notices)

    backend.turns.append(refused("Invalid value for 'model'."))  # another 400 is the user's to see
    third = turn(session, runner, "And now?")
    assert isinstance(third.error, BackendError) and "Invalid value" in third.error.message
    assert backend.count("stream") == 4, "not retried"


def test_after_a_kernel_restart_the_next_cell_reattaches_and_relinks_pushed_files(tmp_path, runner) -> None:
    backend = FakeBackend()
    before = make_session(backend, tmp_path)
    runner.run(before.push([PushRequest("notes", "sales went up"), PushRequest("gone", "deleted meanwhile")]))
    backend.turns.append(answer("Noted."))
    first = turn(before, runner, "Read the notes.")
    container = before.container
    assert container is not None
    backend.remove_path(container.id, before.registry.get("gone").path)  # type: ignore[union-attr]

    # The new kernel's session takes over what the old one saved (state_file.py does this).
    after = make_session(backend, tmp_path, registry=before.registry)
    saved = Transcript.from_json(before.transcript.to_json())
    after.resume(container, previous_response_id="resp_1", transcript=saved, turns=1, model="fake-model")
    backend.turns.append(answer("Still here."))
    second = turn(after, runner, "Still there?")

    assert second.ok and second.container_id == first.container_id and backend.count("create_container") == 1
    assert [n.text for n in second.notices] == [
        f"Reattached to container {container.id} after the kernel restart; the conversation continues."
    ]
    assert backend.requests[-1].conversation.previous_response_id == "resp_1"
    assert after.registry.get("notes").in_container(container.id)  # type: ignore[union-attr]
    assert not after.registry.get("gone").in_container(container.id), "a file gone meanwhile is re-sent later"  # type: ignore[union-attr]


def test_a_local_container_reattached_after_a_restart_gets_its_state_re_run(tmp_path, runner) -> None:
    backend = FakeBackend()
    backend.name = "local"  # the local sandbox's memory dies with the kernel that started it
    before = make_session(backend, tmp_path)
    ran: list[TurnRequest] = []
    backend.turns.append(runs_code(ran))
    first = turn(before, runner, "load", options=TurnOptions("m", "", exec_code="total = 42"))

    after = make_session(backend, tmp_path)
    after.resume(before.container, previous_response_id=None, transcript=before.transcript, turns=1, model="")
    backend.turns += [runs_code(ran), answer("42")]
    second = turn(after, runner, "What is total?")

    assert second.ok and second.container_id == first.container_id
    assert [r.exec_code for r in ran] == ["total = 42", "total = 42"], "re-run in the same container"
    assert "its in-memory state is re-run below" in second.notices[0].text
    assert "total is back" in second.notices[1].text
