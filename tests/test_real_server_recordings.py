"""What real model servers sent, replayed through the local backend over real HTTP and real SSE.

The bodies in ``../shared/fixtures/chat/`` were captured from llama.cpp's ``llama-server`` and from
``llama-cpp-python``'s server driving ci-magic (see that folder's README). The chat server answers
with them byte for byte (``Recorded``); the model loop, the OpenAI SDK and the HTTP stack between
them are the real ones, and ``LocalBackend`` sits on top as a notebook cell would use it. Only the
sandbox is a stand-in that records the code it was asked to run.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from ci_magic import events
from ci_magic.backends.base import Conversation, TurnRequest
from ci_magic.backends.local.backend import LocalBackend
from ci_magic.errors import BackendError
from tests.servers.chat_server import ChatServer, Recorded, Reply

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat"

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "README.md").is_file(),
    reason="../shared/fixtures/chat/ (recordings of llama-server and llama-cpp-python) is absent",
)


def body(name: str) -> str:
    return (FIXTURES / f"{name}.response.txt").read_text()


def recorded(name: str, status: int = 200) -> Recorded:
    return Recorded(body(name), status)


def sent(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((FIXTURES / f"{name}.req.json").read_text())
    return result


def llama_server_listing() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((FIXTURES / "llama-server.models.json").read_text())
    return result


LLAMA_CPP_PYTHON_LISTING = {  # llama_cpp.server's ModelList (no recording of it: its documented shape)
    "object": "list",
    "data": [{"id": "gemma-3-270m", "object": "model", "owned_by": "me", "permissions": []}],
}


class RecordingSandbox:
    """Stands in for the kernel: records the code and prints what the real kernel printed."""

    isolation = None  # what LocalBackend reads to label an unisolated sandbox: not probed here

    def __init__(self, printed: str = "385\n") -> None:
        self.printed = printed
        self.ran: list[str] = []

    def take_notices(self) -> list[events.Notice]:
        return []

    async def execute(self, container_id: str, code: str, *, call_id: str) -> Any:
        self.ran.append(code)
        yield events.Logs(call_id, self.printed, "stdout")


def cells(
    server: ChatServer,
    prompts: list[str],
    sandbox: RecordingSandbox,
    conversation: Conversation,
    **options: Any,
) -> list[tuple[list[events.Event], BaseException | None]]:
    """Run ``prompts`` as consecutive %%ci cells on one LocalBackend (model left to the server)."""

    async def go() -> list[tuple[list[events.Event], BaseException | None]]:
        results: list[tuple[list[events.Event], BaseException | None]] = []
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            backend = LocalBackend(sandbox, model_client=client, model="", loop_options=options)  # type: ignore[arg-type]
            for prompt in prompts:
                collected: list[events.Event] = []
                request = TurnRequest(
                    prompt=prompt,
                    model="",
                    instructions="You are a careful data analyst.",
                    container_id="ctr_1",
                    conversation=conversation,
                )
                try:
                    async for event in backend.stream(request):
                        collected.append(event)
                except BackendError as err:
                    results.append((collected, err))
                else:
                    results.append((collected, None))
        return results

    return asyncio.run(go())


def of_type(collected: list[events.Event], kind: type) -> list[Any]:
    return [e for e in collected if isinstance(e, kind)]


def test_llama_server_native_call_runs_and_the_answer_follows(chat_server: Any) -> None:
    server = chat_server(
        [recorded("ls-smol-qwen25tpl-t0-copy-new-2"), recorded("ls-smol-qwen25tpl-t0-copy-new-3")],
        listing=llama_server_listing(),
    )
    sandbox = RecordingSandbox()
    conversation = Conversation()
    prompt = sent("ls-smol-qwen25tpl-t0-copy-new-2")["messages"][-1]["content"]

    [(collected, error)] = cells(server, [prompt], sandbox, conversation)

    assert error is None and isinstance(collected[-1], events.Completed)
    code = "print(sum(i * i for i in range(1, 11)))"
    assert sandbox.ran == [code]
    call = of_type(collected, events.CallStarted)[0].call_id
    deltas = [e.delta for e in of_type(collected, events.CodeDelta) if e.call_id == call]
    assert len(deltas) > 5 and "".join(deltas) == code  # a token per chunk, streamed as it came
    assert of_type(collected, events.TextDone)[-1].text == "<tool_response>\nstdout:\n385\n</tool_response>"
    # The second request is what llama-server got in the recording, but with "" for null content.
    first, second = (r.body for r in server.chat_requests)
    expected = sent("ls-smol-qwen25tpl-t0-copy-new-3")["messages"][1:]
    expected[1]["content"] = ""
    assert second["messages"][1:] == expected
    assert first["model"] == "models/SmolLM2-135M-Instruct.Q4_1.gguf"  # the server's only model
    assert first["tool_choice"] == "auto" and first["max_tokens"] == 1024  # meta.n_ctx 4096 / 4
    assert [r.path for r in server.requests if r.method == "GET"] == ["/v1/models"]


def test_llama_server_code_written_as_a_fence_runs(chat_server: Any) -> None:
    server = chat_server([recorded("ls-smol-2"), "The sum is 285."], listing=llama_server_listing())
    sandbox = RecordingSandbox("285\n")
    conversation = Conversation()

    [(collected, error)] = cells(
        server, [sent("ls-smol-2")["messages"][-1]["content"]], sandbox, conversation
    )

    assert error is None
    assert len(sandbox.ran) == 1 and sandbox.ran[0].startswith("def sum_of_squares(n):")
    assert sandbox.ran[0].endswith("print(sum_of_squares(10))")
    assert of_type(collected, events.CodeDone)[0].code == sandbox.ran[0]
    assert any("wrote its code as text" in n.text for n in of_type(collected, events.Notice))
    # The model's invented output ("This will output 140...") is not kept as the answer.
    history = json.dumps(conversation.messages)
    assert "This will output 140" not in history and "285" in history
    assert of_type(collected, events.TextDone)[-1].text == "The sum is 285."


def test_llama_server_context_overflow_is_trimmed_and_retried(chat_server: Any) -> None:
    overflow = recorded("ls-gemma-4", status=400)
    server = chat_server([overflow, "Short now."])
    conversation = Conversation()
    earlier = sent("ls-gemma-4")["messages"][1:-1]  # the turn whose rambling answer filled the context
    conversation.messages += earlier

    [(collected, error)] = cells(server, ["And now?"], RecordingSandbox(), conversation)

    assert error is None and isinstance(collected[-1], events.Completed)
    first, retry = server.chat_requests
    assert len(json.dumps(retry.body["messages"])) < len(json.dumps(first.body["messages"])) / 2
    assert retry.body["messages"][-1]["content"] == "And now?"


def test_llama_server_overflow_that_persists_names_the_context_size(chat_server: Any) -> None:
    server = chat_server([recorded("ls-gemma-4", status=400), recorded("ls-gemma-4", status=400)])
    conversation = Conversation()

    [(_, error)] = cells(server, ["Hello"], RecordingSandbox(), conversation)

    assert isinstance(error, BackendError) and error.status_code == 400
    assert "context of 4096 tokens" in error.message
    assert "tool calling" not in error.message  # the old, wrong hint
    assert conversation.messages == []


def test_llama_cpp_python_refusal_does_not_poison_the_next_cell(chat_server: Any) -> None:
    refusal = recorded("lcp-gemma-chatmlfc-namedfirst-2", status=500)
    server = chat_server([refusal, "Hello again."], listing=LLAMA_CPP_PYTHON_LISTING)
    conversation = Conversation()

    (_, first), (_, second) = cells(server, ["Hi", "Hi again"], RecordingSandbox(), conversation)

    assert isinstance(first, BackendError) and first.status_code == 500
    assert "refused the shape of the request" in first.message and "7 validation errors" in first.message
    assert second is None
    assert [m["role"] for m in server.chat_requests[1].body["messages"]] == ["system", "user"]


def test_llama_cpp_python_forced_call_with_repeated_ids_runs_once(chat_server: Any) -> None:
    server = chat_server(
        [recorded("lcp-gemma-chatmlfc-namedfirst-nullfix-3"), Reply(text="Done.")],
        listing=LLAMA_CPP_PYTHON_LISTING,
    )
    sandbox = RecordingSandbox()
    conversation = Conversation()

    [(collected, error)] = cells(server, ["Make a DataFrame"], sandbox, conversation)

    assert error is None
    assert sandbox.ran == ["452073699411.csv"]  # what the tiny model wrote, decoded once, not twice
    assert len(of_type(collected, events.CallStarted)) == 1
    first, second = (r.body for r in server.chat_requests)
    # The named form that made this server call the tool in the recording (the proxy forced it then).
    forced = json.loads((FIXTURES / "lcp-gemma-chatmlfc-namedfirst-nullfix-3.req.sent.json").read_text())
    assert first["tool_choice"] == forced["tool_choice"]
    assert second["tool_choice"] == "none"
    assert conversation.messages[1]["content"] == ""
