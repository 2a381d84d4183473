"""A local model writes code, the sandbox runs it, the model reads the output and answers.

Everything here goes through real HTTP: the scripted chat server streams OpenAI-shaped SSE chunks
and ``openai.AsyncOpenAI`` reads them. Only the sandbox is a stand-in (``FakeSandbox``) that records
the code it was given and answers with canned events, so each story controls what the code "printed".
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from ci_magic import events
from ci_magic.backends.base import Conversation, TurnRequest
from ci_magic.backends.local.model_loop import TOOL_INSTRUCTIONS, ChatModelLoop
from ci_magic.errors import BackendError, ConfigurationError, SandboxError, StreamError
from tests.servers.chat_server import (
    QUICKSTART_PROMPT,
    CallStyle,
    ChatServer,
    Cut,
    Fault,
    Reply,
    ToolCall,
    quickstart,
)

REPO = Path(__file__).resolve().parents[1]
Answer = Callable[[str, str], Sequence[events.Event | Exception]]
StartServer = Callable[..., ChatServer]  # the chat_server fixture


class FakeSandbox:
    """Stands in for the kernel: records each code it runs and answers with ``answer(code, call_id)``."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer or (lambda code, call_id: [events.Logs(call_id, "ok\n", "stdout")])
        self.ran: list[str] = []

    async def execute(self, code: str, call_id: str) -> AsyncIterator[events.Event]:
        self.ran.append(code)
        yield events.CallStatus(call_id, "running")
        failed = False
        for item in self.answer(code, call_id):
            if isinstance(item, Exception):
                raise item
            failed = failed or isinstance(item, events.ExecutionError)
            yield item
        yield events.CallStatus(call_id, "failed" if failed else "completed")


def quickstart_sandbox(code: str, call_id: str) -> list[events.Event]:
    """What the quickstart's three steps print in a real kernel."""
    if "step: plot" in code:
        return [events.Image(call_id, b"\x89PNG fake")]
    if "step: save" in code:
        saved = events.FileCited("ctr_1", "f_1", "squares.csv")
        return [events.Logs(call_id, "saved 100 rows to squares.csv\n", "stdout"), saved]
    return [events.Logs(call_id, "      n  square\n99  100   10000\n", "stdout")]


def make_request(prompt: str, conversation: Conversation | None = None, **fields: Any) -> TurnRequest:
    options: dict[str, Any] = {"model": "scripted-model", "instructions": "You are a careful data analyst."}
    options.update(fields)
    return TurnRequest(
        prompt=prompt, container_id="ctr_1", conversation=conversation or Conversation(), **options
    )


def run_turn(
    server: ChatServer | str,
    request: TurnRequest,
    sandbox: FakeSandbox,
    *,
    max_retries: int = 0,
    api_key: str = "sk-test",
    stop_when: Callable[[events.Event], bool] | None = None,
    **loop_options: Any,
) -> tuple[list[events.Event], BaseException | None]:
    """Run one turn through a real AsyncOpenAI client; return its events and the error it raised."""
    base_url = server if isinstance(server, str) else server.base_url

    async def go() -> tuple[list[events.Event], BaseException | None]:
        collected: list[events.Event] = []
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries) as client:
            options = {"model": "scripted-model", **loop_options}
            turn = ChatModelLoop(client, **options).run(request, sandbox.execute)
            try:
                async for event in turn:
                    collected.append(event)
                    if stop_when is not None and stop_when(event):
                        await turn.aclose()  # type: ignore[attr-defined]  # what the bridge does on an interrupt
                        break
            except Exception as err:
                return collected, err
        return collected, None

    return asyncio.run(go())


def of_type(collected: list[events.Event], kind: type) -> list[Any]:
    return [e for e in collected if isinstance(e, kind)]


def roles(messages: list[dict[str, Any]]) -> list[str]:
    return [m["role"] for m in messages]


# -- the quickstart story ---------------------------------------------------------------------------


def test_quickstart_turn_streams_code_runs_it_and_links_the_csv(chat_server: StartServer) -> None:
    server = chat_server(quickstart)
    sandbox = FakeSandbox(quickstart_sandbox)
    conversation = Conversation()
    request = make_request(QUICKSTART_PROMPT, conversation, extra_headers={"X-Team": "analytics"})

    collected, error = run_turn(server, request, sandbox)

    assert error is None
    assert isinstance(collected[0], events.TurnStarted) and collected[0].model == "scripted-model"
    assert isinstance(collected[-1], events.Completed) and collected[-1].response_id is None
    assert collected[-1].container_id == "ctr_1"
    # Usage is summed over the four model steps, exactly as the server reported it.
    reported = [
        events.Usage(u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) for u in server.usage_sent
    ]
    assert len(reported) == 4
    assert collected[-1].usage == sum(reported, events.Usage())

    # Each call's code streams in many small deltas that add up to the code that ran.
    done = of_type(collected, events.CodeDone)
    assert [d.code for d in done] == sandbox.ran
    assert [code.splitlines()[0] for code in sandbox.ran] == ["# step: table", "# step: plot", "# step: save"]
    for call in done:
        deltas = [e.delta for e in collected if isinstance(e, events.CodeDelta) and e.call_id == call.call_id]
        assert len(deltas) > 5
        assert "".join(deltas) == call.code
        started = collected.index(
            next(e for e in of_type(collected, events.CallStarted) if e.call_id == call.call_id)
        )
        assert started < collected.index(call)
    assert of_type(collected, events.TextDone)[-1].text.endswith("(sandbox:/mnt/data/squares.csv)")

    # The model was told what each step printed before choosing the next one.
    chat = server.chat_requests
    assert [r.messages[-1]["content"] for r in chat[1:]] == [
        "stdout:\n      n  square\n99  100   10000",
        "1 image(s) displayed to the user.",
        "stdout:\nsaved 100 rows to squares.csv\nNew files: sandbox:/mnt/data/squares.csv",
    ]
    first = chat[0].body
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert [t["function"]["name"] for t in first["tools"]] == ["python"]
    assert chat[0].headers["x-team"] == "analytics"
    assert first["messages"][0] == {
        "role": "system",
        "content": f"You are a careful data analyst.\n\n{TOOL_INSTRUCTIONS}",
    }
    assert "persistent Jupyter kernel" in TOOL_INSTRUCTIONS
    assert "The working directory is /mnt/data" in TOOL_INSTRUCTIONS
    assert "sandbox:/mnt/data/<name>" in TOOL_INSTRUCTIONS

    # The whole turn is now history, ready for the next cell.
    assert roles(conversation.messages) == ["user", *["assistant", "tool"] * 3, "assistant"]
    assert conversation.messages[0]["content"] == QUICKSTART_PROMPT


def test_a_kernel_that_lost_the_table_makes_the_model_rebuild_it(chat_server: StartServer) -> None:
    server = chat_server(quickstart)
    plots: list[str] = []

    def answer(code: str, call_id: str) -> list[events.Event]:
        if "step: plot" in code and not plots:
            plots.append(code)
            lost = "name 'df' is not defined"
            return [events.ExecutionError(call_id, "NameError", lost, "\x1b[0;31mNameError\x1b[0m")]
        return quickstart_sandbox(code, call_id)

    sandbox = FakeSandbox(answer)
    collected, error = run_turn(server, make_request(QUICKSTART_PROMPT), sandbox)

    assert error is None and isinstance(collected[-1], events.Completed)
    steps = [code.splitlines()[0] for code in sandbox.ran]
    assert steps == ["# step: table", "# step: plot", "# step: table", "# step: plot", "# step: save"]
    # The model saw the error without terminal colour codes.
    error_reply = server.chat_requests[2].messages[-1]["content"]
    assert error_reply == "error: NameError: name 'df' is not defined\nNameError"


# -- the model fixes its own code -------------------------------------------------------------------


def test_the_model_reads_its_traceback_and_fixes_the_code(chat_server: StartServer) -> None:
    def model(messages: list[dict[str, Any]]) -> Reply:
        tools = [m for m in messages if m["role"] == "tool"]
        if not tools:
            return Reply.calls("print(totl)")
        if "NameError" in tools[-1]["content"]:
            return Reply.calls("total = 3\nprint(total)", text="Typo, fixing it.")
        return Reply(text=f"The total is {tools[-1]['content'].split()[-1]}.")

    server = chat_server(model)

    def answer(code: str, call_id: str) -> list[events.Event]:
        if "totl" in code:
            traceback = "Traceback (most recent call last):\n  Cell In[1], line 1\n\x1b[1;31mNameError\x1b[0m"
            return [events.ExecutionError(call_id, "NameError", "name 'totl' is not defined", traceback)]
        return [events.Logs(call_id, "3\n", "stdout")]

    sandbox = FakeSandbox(answer)
    collected, error = run_turn(server, make_request("What is the total?"), sandbox)

    assert error is None
    assert sandbox.ran == ["print(totl)", "total = 3\nprint(total)"]
    assert of_type(collected, events.TextDone)[-1].text == "The total is 3."
    told = server.chat_requests[1].messages[-1]["content"]
    assert told.startswith("error: NameError: name 'totl' is not defined\nTraceback (most recent call last):")
    assert "\x1b" not in told
    assert of_type(collected, events.CallStatus)[1] == events.CallStatus(
        of_type(collected, events.CodeDone)[0].call_id, "failed"
    )


def test_a_sandbox_failure_goes_to_the_model_once_and_ends_the_turn_the_second_time(
    chat_server: StartServer,
) -> None:
    server = chat_server(lambda messages: Reply.calls("import time; time.sleep(999)"))
    timeout = SandboxError("the code ran longer than 120 s and was stopped")
    sandbox = FakeSandbox(lambda code, call_id: [timeout])
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Wait forever", conversation), sandbox)

    assert isinstance(error, SandboxError)
    assert len(sandbox.ran) == 2
    assert "ran longer than 120 s" in server.chat_requests[1].messages[-1]["content"]
    assert any(isinstance(e, events.Notice) and "sandbox failed" in e.text for e in collected)
    # Only the step that was answered is history: no tool call is left without its reply.
    assert roles(conversation.messages) == ["user", "assistant", "tool"]


# -- shapes of tool calls ---------------------------------------------------------------------------


def test_escapes_and_emoji_in_code_stream_exactly(chat_server: StartServer) -> None:
    code = 'label = "naïve 🐍\\tdone"\nprint(label, "\\u00e9", {"k": [1, 2]})\n# 中文 \U0001d518\n'
    server = chat_server([Reply.calls(code), "Done."], ensure_ascii=True, seed=7)
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Print a label"), sandbox)

    assert error is None
    assert sandbox.ran == [code]
    assert "".join(e.delta for e in of_type(collected, events.CodeDelta)) == code
    assert len(of_type(collected, events.CodeDelta)) > 10


def test_two_tool_calls_in_one_message_run_in_order(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("a = 1", "print(a + 1)", text="Two steps."), "a + 1 is 2."])
    sandbox = FakeSandbox()
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Add one", conversation), sandbox)

    assert error is None
    assert sandbox.ran == ["a = 1", "print(a + 1)"]
    first, second = of_type(collected, events.CallStarted)
    assert first.call_id != second.call_id
    assistant = conversation.messages[1]
    assert assistant["content"] == "Two steps."
    assert [c["id"] for c in assistant["tool_calls"]] == [first.call_id, second.call_id]
    assert [m.get("tool_call_id") for m in conversation.messages[2:4]] == [first.call_id, second.call_id]
    # The intro text closes before the code starts, so text and code alternate on screen.
    assert collected.index(of_type(collected, events.TextDone)[0]) < collected.index(first)


def test_plain_code_as_arguments_runs_and_is_stored_as_json(chat_server: StartServer) -> None:
    server = chat_server([Reply(tool_calls=(ToolCall(arguments="print('hi')"),)), "It printed hi.", "Sure."])
    sandbox = FakeSandbox()
    conversation = Conversation()

    _, error = run_turn(server, make_request("Say hi", conversation), sandbox)

    assert error is None
    assert sandbox.ran == ["print('hi')"]
    stored = conversation.messages[1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(stored) == {"code": "print('hi')"}
    # Servers re-parse history arguments; the next turn is accepted.
    _, error = run_turn(server, make_request("Again?", conversation), sandbox)
    assert error is None


def test_malformed_arguments_are_explained_to_the_model_not_run(chat_server: StartServer) -> None:
    broken = ToolCall(arguments='{"code": "print(1)')
    server = chat_server([Reply(tool_calls=(broken,)), Reply.calls("print(1)"), "It printed 1."])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Print one"), sandbox)

    assert error is None
    assert sandbox.ran == ["print(1)"]
    assert "not valid JSON" in server.chat_requests[1].messages[-1]["content"]
    first_call = of_type(collected, events.CallStarted)[0].call_id
    assert events.CallStatus(first_call, "failed") in collected


def test_a_call_to_an_unknown_tool_is_refused(chat_server: StartServer) -> None:
    server = chat_server([Reply(tool_calls=(ToolCall("ls -la", name="bash"),)), "Sorry, no shell."])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("List files"), sandbox)

    assert error is None and sandbox.ran == []
    assert of_type(collected, events.CallStarted) == []
    assert "no tool named 'bash'" in server.chat_requests[1].messages[-1]["content"]
    assert any("unknown tool 'bash'" in n.text for n in of_type(collected, events.Notice))


def test_long_output_is_cut_to_the_budget_keeping_head_and_tail(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("for i in range(10**4): print(i)"), "Lots of numbers."])
    printed = "".join(f"{i}\n" for i in range(10**4))
    sandbox = FakeSandbox(lambda code, call_id: [events.Logs(call_id, printed, "stdout")])

    _, error = run_turn(server, make_request("Count"), sandbox, output_budget=1000)

    assert error is None
    told = server.chat_requests[1].messages[-1]["content"]
    assert len(told) <= 1000
    assert told.startswith("stdout:\n0\n1\n2\n")
    assert told.endswith("9998\n9999")
    assert "characters cut to fit the output budget" in told


# -- where a turn ends ------------------------------------------------------------------------------


def test_the_step_cap_stops_a_model_that_never_answers(chat_server: StartServer) -> None:
    server = chat_server(lambda messages: Reply.calls("print('again')"))
    sandbox = FakeSandbox()
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Loop", conversation), sandbox, max_steps=3)

    assert error is None
    assert len(server.chat_requests) == 3 and len(sandbox.ran) == 3
    failed = collected[-1]
    assert isinstance(failed, events.Failed) and failed.kind == "limit"
    assert "3 model steps" in failed.message
    assert "%config CodeInterpreter.max_steps = 20" in failed.message
    assert roles(conversation.messages) == ["user", *["assistant", "tool"] * 3]


def test_a_conversation_continues_in_the_next_cell(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("x = 41"), "Set x.", Reply.calls("print(x + 1)"), "x + 1 is 42."])
    conversation = Conversation()
    sandbox = FakeSandbox()

    run_turn(server, make_request("Set x to 41", conversation), sandbox)
    conversation.notes.append("The container was recreated; in-memory state is lost.")
    request = make_request("Now add one", conversation, context="## df.parquet\n2 columns")
    _, error = run_turn(server, request, sandbox)

    assert error is None
    second_cell = server.chat_requests[2].messages
    assert roles(second_cell) == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert second_cell[1]["content"] == "Set x to 41"
    assert second_cell[-1]["content"] == (
        "Note: The container was recreated; in-memory state is lost.\n\n"
        "## df.parquet\n2 columns\n\n"
        "Now add one"
    )
    assert conversation.notes == []
    assert len(conversation.messages) == 8


def test_a_new_conversation_starts_fresh(chat_server: StartServer) -> None:
    server = chat_server(["Hello.", "Hello again."])
    conversation = Conversation()
    run_turn(server, make_request("Hi", conversation), FakeSandbox())

    conversation.reset()  # what %%ci --new does
    run_turn(server, make_request("Hi again", conversation), FakeSandbox())

    assert roles(server.chat_requests[1].messages) == ["system", "user"]
    assert roles(conversation.messages) == ["user", "assistant"]


def test_an_interrupted_turn_keeps_only_whole_steps(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("a = 1"), Reply.calls("b = 2"), "Done.", "Next."])
    conversation = Conversation()
    sandbox = FakeSandbox()

    def second_call_running(event: events.Event) -> bool:
        return isinstance(event, events.CallStatus) and event.status == "running" and len(sandbox.ran) == 2

    request = make_request("Two cells", conversation)
    collected, error = run_turn(server, request, sandbox, stop_when=second_call_running)

    assert error is None and not isinstance(collected[-1], events.Completed)
    assert roles(conversation.messages) == ["user", "assistant", "tool"]
    # The server accepts that history: the next cell works.
    _, error = run_turn(server, make_request("Go on", conversation), sandbox)
    assert error is None


# -- errors from the model server -------------------------------------------------------------------


def test_a_wrong_api_key_is_reported_in_the_servers_words(chat_server: StartServer) -> None:
    server = chat_server(["never sent"], api_key="sk-right-key")
    conversation = Conversation()

    collected, error = run_turn(
        server, make_request("Hi", conversation), FakeSandbox(), api_key="sk-wrong-key"
    )

    assert isinstance(error, BackendError) and error.status_code == 401
    assert "Incorrect API key provided: sk-***ey." in error.message
    assert "CodeInterpreter.model_api_key" in error.message
    assert server.base_url in error.message
    assert collected == [] and conversation.messages == []


def test_an_unknown_model_is_reported_with_what_to_check(chat_server: StartServer) -> None:
    server = chat_server(["never sent"], models=["qwen2.5-coder"])

    _, error = run_turn(server, make_request("Hi", model="llama-9000"), FakeSandbox())

    assert isinstance(error, BackendError) and error.status_code == 404
    assert "The model `llama-9000` does not exist" in error.message
    assert "'llama-9000'" in error.message and "/models" in error.message


def test_a_server_error_is_retried_by_the_sdk(chat_server: StartServer) -> None:
    server = chat_server([Fault(500), "Recovered."])

    collected, error = run_turn(server, make_request("Hi"), FakeSandbox(), max_retries=2)

    assert error is None
    assert len(server.chat_requests) == 2
    assert of_type(collected, events.TextDone)[-1].text == "Recovered."


def test_a_server_error_that_persists_names_the_status_and_message(chat_server: StartServer) -> None:
    server = chat_server([Fault(503, "The engine is currently overloaded.")])

    _, error = run_turn(server, make_request("Hi"), FakeSandbox())

    assert isinstance(error, BackendError) and error.status_code == 503
    assert "HTTP 503: The engine is currently overloaded." in error.message


def test_an_unreachable_server_says_where_and_how_to_configure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again at once: nothing listens there

    _, error = run_turn(f"http://127.0.0.1:{port}/v1", make_request("Hi"), FakeSandbox())

    assert isinstance(error, BackendError) and not isinstance(error, StreamError)
    assert f"Could not reach the model server at http://127.0.0.1:{port}/v1" in error.message
    assert "CodeInterpreter.model_base_url" in error.message


@pytest.mark.parametrize("clean", [False, True], ids=["connection-dropped", "body-ended-early"])
def test_a_stream_cut_midway_keeps_what_arrived(chat_server: StartServer, clean: bool) -> None:
    reply = Reply(text="The first words arrive, then the line goes quiet and never finishes the answer")
    server = chat_server([Cut(reply, after_chunks=4, clean=clean)])
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Talk", conversation), FakeSandbox())

    assert isinstance(error, StreamError)
    assert "".join(e.delta for e in of_type(collected, events.TextDelta)) == "The first words "
    assert conversation.messages == []


def test_code_cut_off_midway_is_marked_incomplete_and_never_runs(chat_server: StartServer) -> None:
    code = "import pandas as pd\nframe = pd.DataFrame({'a': range(10)})\nprint(frame)"
    server = chat_server([Cut(Reply.calls(code), after_chunks=8)])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Make a frame"), sandbox)

    assert isinstance(error, StreamError)
    call = of_type(collected, events.CallStarted)[0].call_id
    shown = "".join(e.delta for e in of_type(collected, events.CodeDelta))
    assert shown and code.startswith(shown) and shown != code
    assert collected[-1] == events.CallStatus(call, "incomplete")
    assert sandbox.ran == [] and of_type(collected, events.CodeDone) == []


# -- choosing the model -----------------------------------------------------------------------------


def test_with_no_model_configured_the_servers_only_model_is_used(chat_server: StartServer) -> None:
    server = chat_server(["Hi from qwen."], models=["qwen2.5-coder"])

    collected, error = run_turn(server, make_request("Hi", model=""), FakeSandbox(), model="")

    assert error is None
    assert server.chat_requests[0].body["model"] == "qwen2.5-coder"
    assert isinstance(collected[0], events.TurnStarted) and collected[0].model == "qwen2.5-coder"


def test_with_no_model_configured_and_several_served_the_user_must_choose(
    chat_server: StartServer,
) -> None:
    server = chat_server(["never sent"], models=["qwen2.5-coder", "llama3.1"])

    _, error = run_turn(server, make_request("Hi", model=""), FakeSandbox(), model="")

    assert isinstance(error, ConfigurationError)
    assert "qwen2.5-coder, llama3.1" in error.message and "CodeInterpreter.model" in error.message


def test_a_step_cap_below_one_is_a_configuration_error() -> None:
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x")
    with pytest.raises(ConfigurationError, match="max_steps must be at least 1"):
        ChatModelLoop(client, model="m", max_steps=0)


# -- the scripted server itself ---------------------------------------------------------------------


def test_the_server_answers_non_streaming_requests_and_lists_models(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("print(1)", text="Running it.")])
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}])
        models = [m.id for m in client.models.list()]
    message = completion.choices[0].message
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert message.content == "Running it."
    assert message.tool_calls is not None
    assert json.loads(message.tool_calls[0].function.arguments) == {"code": "print(1)"}  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert models == ["scripted-model"]


def test_the_server_rejects_an_unanswered_tool_call_like_openai(chat_server: StartServer) -> None:
    server = chat_server(["never sent"])
    dangling = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "python", "arguments": "{}"}}
        ],
    }
    with (
        openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client,
        pytest.raises(openai.BadRequestError, match="did not have response messages: call_1"),
    ):
        messages = [{"role": "user", "content": "go"}, dangling, {"role": "user", "content": "?"}]
        client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]


def test_the_cli_serves_the_quickstart_scenario() -> None:
    command = [sys.executable, "-m", "tests.servers.chat_server", "--port", "0", "--scenario", "quickstart"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("READY http://127.0.0.1:")
            with openai.OpenAI(base_url=line.removeprefix("READY "), api_key="x", max_retries=0) as client:
                first = client.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": QUICKSTART_PROMPT}]
                )
            calls = first.choices[0].message.tool_calls or []
            code = json.loads(calls[0].function.arguments)["code"]  # type: ignore[union-attr]
            assert code.startswith("# step: table") and "pd.DataFrame" in code
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0


# -- real servers' ways (issue 11) ------------------------------------------------------------------

LLAMA_SERVER_LISTING = {  # the shape llama-server answers GET /v1/models with (fixtures/chat/)
    "object": "list",
    "data": [{"id": "smol.gguf", "object": "model", "owned_by": "llamacpp", "meta": {"n_ctx": 4096}}],
}
LLAMA_CPP_PYTHON_LISTING = {  # llama_cpp.server's documented ModelList
    "object": "list",
    "data": [{"id": "gemma-3-270m", "object": "model", "owned_by": "me", "permissions": []}],
}
OLLAMA_LISTING = {
    "object": "list",
    "data": [{"id": "qwen2.5-coder:7b", "object": "model", "created": 1, "owned_by": "library"}],
}


def test_an_assistant_tool_call_is_sent_with_empty_content_not_null(chat_server: StartServer) -> None:
    # llama-cpp-python answers HTTP 500 to "content": null on the assistant message with tool_calls.
    server = chat_server(
        [Reply.calls("x = 41"), "Set x.", Reply.calls("print(x + 1)"), "42."], refuse_null_content=True
    )
    conversation = Conversation()

    _, first = run_turn(server, make_request("Set x to 41", conversation), FakeSandbox())
    _, second = run_turn(server, make_request("Add one", conversation), FakeSandbox())

    assert first is None and second is None
    sent = server.chat_requests[1].messages[2]
    assert sent["role"] == "assistant" and sent["content"] == "" and sent["tool_calls"]


def test_a_refused_request_leaves_the_conversation_as_it_was(chat_server: StartServer) -> None:
    refusal = Fault(400, "messages[3]: this server cannot read that message", "invalid_request_error")
    server = chat_server(["Hello.", Reply.calls("frame = 1"), refusal, "Fine again."])
    conversation = Conversation()
    sandbox = FakeSandbox()
    run_turn(server, make_request("Hi", conversation), sandbox)
    before = list(conversation.messages)

    _, error = run_turn(server, make_request("Make a frame", conversation), sandbox)

    assert isinstance(error, BackendError) and error.status_code == 400
    assert "tool calling" not in error.message  # the old, wrong hint
    assert conversation.messages == before
    # The code did run, so the model hears about it in the next cell, not through a poisoned history.
    assert len(conversation.notes) == 1 and "frame = 1" in conversation.notes[0]
    _, error = run_turn(server, make_request("Again", conversation), sandbox)
    assert error is None
    assert roles(server.chat_requests[-1].messages) == ["system", "user", "assistant", "user"]
    assert "frame = 1" in server.chat_requests[-1].messages[-1]["content"]


def test_tool_choice_and_max_tokens_go_on_every_request(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("print(1)"), "One."])

    run_turn(server, make_request("Print one"), FakeSandbox())

    bodies = [r.body for r in server.chat_requests]
    assert [b["tool_choice"] for b in bodies] == ["auto", "auto"]
    assert [b["max_tokens"] for b in bodies] == [2048, 2048]  # a quarter of context_tokens (8192)


def test_llama_server_is_recognised_and_its_context_size_used(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("print(1)"), "One."], listing=LLAMA_SERVER_LISTING)

    _, error = run_turn(
        server, make_request("Print one", model=""), FakeSandbox(), model="", tool_choice="named"
    )

    assert error is None
    first, second = (r.body for r in server.chat_requests)
    assert first["model"] == "smol.gguf"
    assert first["max_tokens"] == 1024  # n_ctx 4096 / 4
    # llama-server ignores the named form: "required" is what forces a call there; later steps are free.
    assert first["tool_choice"] == "required" and second["tool_choice"] == "auto"


def test_llama_cpp_python_gets_the_named_tool_choice_on_the_first_step_only(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("print(1)"), "One."], listing=LLAMA_CPP_PYTHON_LISTING)

    _, error = run_turn(server, make_request("Print one"), FakeSandbox())

    assert error is None
    first, second = (r.body for r in server.chat_requests)
    assert first["tool_choice"] == {"type": "function", "function": {"name": "python"}}
    assert second["tool_choice"] == "none"  # "auto" while streaming fails inside that server


def test_ollama_gets_no_tool_choice_it_would_ignore(chat_server: StartServer) -> None:
    server = chat_server(["Hi."], listing=OLLAMA_LISTING)

    run_turn(server, make_request("Hi"), FakeSandbox())

    assert "tool_choice" not in server.chat_requests[0].body
    assert server.chat_requests[0].body["max_tokens"] == 2048


def test_the_server_is_listed_once_per_backend_not_every_cell(chat_server: StartServer) -> None:
    from ci_magic.backends.local.backend import LocalBackend

    server = chat_server(["One.", "Two.", "Three."], listing=LLAMA_SERVER_LISTING)
    sandbox = FakeSandbox()
    sandbox.take_notices = list  # type: ignore[attr-defined]  # what LocalBackend asks the sandbox for
    sandbox.isolation = None  # type: ignore[attr-defined]
    conversation = Conversation()

    async def three_cells() -> None:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            backend = LocalBackend(sandbox, model_client=client, model="")  # type: ignore[arg-type]
            for prompt in ("a", "b", "c"):
                async for _ in backend.stream(make_request(prompt, conversation, model="")):
                    pass

    asyncio.run(three_cells())

    assert [r.path for r in server.requests if r.method == "GET"] == ["/v1/models"]
    assert len(server.chat_requests) == 3


def test_code_written_in_a_python_fence_runs_as_a_call(chat_server: StartServer) -> None:
    fenced = "Here is the code:\n```python\nprint(sum(i * i for i in range(1, 11)))\n```\nThis prints 999."
    server = chat_server([fenced, "The sum of squares is 385."])
    sandbox = FakeSandbox(lambda code, call_id: [events.Logs(call_id, "385\n", "stdout")])
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Sum of squares", conversation), sandbox)

    assert error is None
    assert sandbox.ran == ["print(sum(i * i for i in range(1, 11)))"]
    call = of_type(collected, events.CallStarted)[0].call_id
    assert (
        "".join(e.delta for e in of_type(collected, events.CodeDelta) if e.call_id == call) == sandbox.ran[0]
    )
    assert any(
        "wrote its code as text" in n.text and "```python" in n.text
        for n in of_type(collected, events.Notice)
    )
    # The invented output after the block is neither shown as the answer nor kept.
    assert "999" not in "".join(e.delta for e in of_type(collected, events.TextDelta))
    assert of_type(collected, events.TextDone)[-1].text == "The sum of squares is 385."
    # The model reads the result the way it wrote the call: as text, after its own block.
    told = server.chat_requests[1].messages
    assert told[-2] == {"role": "assistant", "content": fenced.split("\nThis prints")[0]}
    assert told[-1]["role"] == "user" and "```\nstdout:\n385\n```" in told[-1]["content"]
    assert roles(conversation.messages) == ["user", "assistant", "user", "assistant"]


def test_a_hermes_tool_call_in_the_text_runs_and_gets_a_tool_response(chat_server: StartServer) -> None:
    hermes = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    server = chat_server([hermes, "It is 42."])
    sandbox = FakeSandbox(lambda code, call_id: [events.Logs(call_id, "42\n", "stdout")])

    collected, error = run_turn(server, make_request("Six times seven"), sandbox)

    assert error is None and sandbox.ran == ["print(6 * 7)"]
    assert any("<tool_call>" in n.text for n in of_type(collected, events.Notice))
    assert server.chat_requests[1].messages[-1] == {
        "role": "user",
        "content": "<tool_response>\nstdout:\n42\n</tool_response>",
    }


def test_with_text_tool_calls_off_a_fence_is_just_the_answer(chat_server: StartServer) -> None:
    server = chat_server(["```python\nprint(1)\n```"])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Show code"), sandbox, text_tool_calls=False)

    assert error is None and sandbox.ran == [] and isinstance(collected[-1], events.Completed)


def test_a_server_without_tools_is_asked_for_code_blocks_instead(chat_server: StartServer) -> None:
    no_tools = Fault(400, "registry.ollama.ai/library/gemma:2b does not support tools", "api_error")
    server = chat_server([no_tools, "```python\nprint(2 + 2)\n```", "Four."])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Add"), sandbox)

    assert error is None and sandbox.ran == ["print(2 + 2)"]
    retry = server.chat_requests[1].body
    assert "tools" not in retry and "tool_choice" not in retry
    assert "```python block" in retry["messages"][0]["content"]
    assert any("does not take tools" in n.text for n in of_type(collected, events.Notice))


def test_old_turns_are_left_out_to_fit_the_context(chat_server: StartServer) -> None:
    server = chat_server(["Short answer."], context_tokens=1500)
    conversation = Conversation()
    rambling = "blah " * 4000  # a 20,000-character answer from an earlier cell
    conversation.messages += [
        {"role": "user", "content": "Tell me everything"},
        {"role": "assistant", "content": rambling},
        {"role": "user", "content": "And the weather?"},
        {"role": "assistant", "content": "Sunny."},
    ]

    _, error = run_turn(server, make_request("Thanks", conversation), FakeSandbox(), context_tokens=1500)

    assert error is None
    sent = server.chat_requests[0].messages
    assert sent[-1]["content"] == "Thanks"
    assert len(json.dumps(sent)) < 1500 * 3
    assert {"role": "assistant", "content": "Sunny."} in sent  # the recent turn is kept whole
    assert len(conversation.messages) == 6  # history itself is not rewritten


def test_long_tool_outputs_are_cut_to_fit_a_small_context(chat_server: StartServer) -> None:
    server = chat_server([Reply.calls("print('x' * 50000)"), "Lots of x."], listing=LLAMA_SERVER_LISTING)
    sandbox = FakeSandbox(lambda code, call_id: [events.Logs(call_id, "x" * 50000 + "\n", "stdout")])

    run_turn(server, make_request("Print"), sandbox)

    told = server.chat_requests[1].messages[-1]["content"]
    assert len(told) <= (4096 - 1024 - 200) * 3 // 4  # a quarter of what the 4096-token context holds


def test_a_context_overflow_is_trimmed_and_sent_once_more(chat_server: StartServer) -> None:
    overflow = Fault(400, "request (9000 tokens) exceeds the available context size (4096 tokens)", "x")
    server = chat_server([overflow, "Fits now."])
    conversation = Conversation()
    conversation.messages += [
        {"role": "user", "content": "Earlier"},
        {"role": "assistant", "content": "word " * 3000},
    ]

    collected, error = run_turn(server, make_request("Now", conversation), FakeSandbox())

    assert error is None and isinstance(collected[-1], events.Completed)
    first, retry = server.chat_requests
    assert len(json.dumps(retry.messages)) < len(json.dumps(first.messages))
    assert retry.messages[-1]["content"] == "Now"


def test_a_prompt_too_long_for_the_context_names_its_size(chat_server: StartServer) -> None:
    server = chat_server(["never sent"], context_tokens=300)
    conversation = Conversation()

    _, error = run_turn(server, make_request("word " * 2000, conversation), FakeSandbox())

    assert isinstance(error, BackendError) and error.status_code == 400
    assert "context of 300 tokens" in error.message
    assert "%ci_reset" in error.message and "tool calling" not in error.message
    assert len(server.chat_requests) == 2  # trimmed and retried once, no more
    assert conversation.messages == []


def test_an_empty_answer_says_so(chat_server: StartServer) -> None:
    server = chat_server([""])

    collected, error = run_turn(server, make_request("Say nothing"), FakeSandbox())

    assert error is None and isinstance(collected[-1], events.Completed)
    assert any("empty answer" in n.text for n in of_type(collected, events.Notice))


def test_invalid_json_arguments_show_the_user_why_the_call_did_not_run(chat_server: StartServer) -> None:
    broken = ToolCall(arguments='{"code": "print(1)')
    server = chat_server([Reply(tool_calls=(broken,)), "Sorry."])

    collected, _ = run_turn(server, make_request("Print one"), FakeSandbox())

    shown = [n.text for n in of_type(collected, events.Notice)]
    assert any("not valid JSON" in text and "Unterminated string" in text for text in shown)


def test_an_empty_200_body_says_the_server_failed(chat_server: StartServer) -> None:
    server = chat_server([Cut(Reply(text="never"), after_chunks=0, clean=True)])

    _, error = run_turn(server, make_request("Hi"), FakeSandbox())

    assert isinstance(error, StreamError)
    assert "empty body" in error.message and "server failed" in error.message
    assert "Run the cell again" not in error.message


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_streams_as_thinking(chat_server: StartServer, field: str) -> None:

    server = chat_server([Reply(text="It is 4.", reasoning="Two plus two is four.", reasoning_field=field)])

    collected, error = run_turn(server, make_request("2 + 2?"), FakeSandbox())

    assert error is None
    assert "".join(e.delta for e in of_type(collected, events.ThinkingDelta)) == "Two plus two is four."
    assert of_type(collected, events.TextDone)[-1].text == "It is 4."


@pytest.mark.parametrize("style", ["whole", "no_index", "repeat_id"])
def test_documented_call_shapes_run_each_call_once(chat_server: StartServer, style: CallStyle) -> None:
    reply = Reply(
        text="Two calls.", tool_calls=(ToolCall("a = 1"), ToolCall("print(a + 1)")), call_style=style
    )
    server = chat_server([reply, "Done."])
    sandbox = FakeSandbox()
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Two", conversation), sandbox)

    assert error is None
    assert sandbox.ran == ["a = 1", "print(a + 1)"]
    assert len(of_type(collected, events.CallStarted)) == 2
    assert [len(m.get("tool_calls") or ()) for m in conversation.messages if m["role"] == "assistant"] == [
        2,
        0,
    ]


def test_a_python_block_cut_off_by_max_tokens_never_runs(chat_server: StartServer) -> None:
    server = chat_server([Reply(text="```python\nfor i in range(10):\n    print(i", finish_reason="length")])
    sandbox = FakeSandbox()

    collected, error = run_turn(server, make_request("Count"), sandbox, max_tokens=12)

    assert error is None and sandbox.ran == []
    call = of_type(collected, events.CallStarted)[0].call_id
    assert events.CallStatus(call, "incomplete") in collected
    assert any("max_tokens (12 tokens)" in n.text for n in of_type(collected, events.Notice))
    assert server.chat_requests[0].body["max_tokens"] == 12


def test_a_reasoning_model_s_thinking_is_shown_collapsed(chat_server: StartServer) -> None:
    from ci_magic.render.live import TurnView
    from tests.render_support import FakeClock, RecordingFrontend

    thought = "The user wants 2 + 2 <b>four</b>."
    server = chat_server([Reply(text="It is 4.", reasoning=thought, reasoning_field="reasoning")])
    collected, _ = run_turn(server, make_request("2 + 2?"), FakeSandbox())
    frontend = RecordingFrontend(FakeClock())
    view = TurnView(frontend, clock=frontend.clock)  # type: ignore[arg-type]

    for event in collected:
        view.handle(event)
    view.finish()

    html = frontend.all_text("text/html")
    assert "<details" in html and "<summary>thinking (33 characters)</summary>" in html
    assert "The user wants 2 + 2 &lt;b&gt;four&lt;/b&gt;." in html  # escaped, never markup
    assert "<details open" not in html


def test_after_a_forced_first_step_a_python_block_still_runs(chat_server: StartServer) -> None:
    # llama-cpp-python: named on the first step, "none" after; the model's next code comes as a block.
    server = chat_server(
        [Reply.calls("x = 2"), "```python\nprint(x * 21)\n```", "It is 42."], listing=LLAMA_CPP_PYTHON_LISTING
    )
    sandbox = FakeSandbox()

    _, error = run_turn(server, make_request("Compute"), sandbox)

    assert error is None and sandbox.ran == ["x = 2", "print(x * 21)"]
    assert [r.body["tool_choice"] for r in server.chat_requests][1:] == ["none", "none"]


def test_a_fence_runs_even_after_the_model_called_the_tool_natively(chat_server: StartServer) -> None:
    # Seen on llama-server with SmolLM2: a native call in one cell, a ```python block in the next.
    fence = "```python\nprint(sum(i**2 for i in range(1, 11)))\n```\n\nThis will output: 100."
    server = chat_server([Reply.calls("print(385)"), "385.", fence, "It is 385."])
    sandbox = FakeSandbox()
    conversation = Conversation()

    run_turn(server, make_request("First", conversation), sandbox)
    _, error = run_turn(server, make_request("Second", conversation), sandbox)

    assert error is None
    assert sandbox.ran == ["print(385)", "print(sum(i**2 for i in range(1, 11)))"]
    assert "100" not in json.dumps(conversation.messages)


def test_an_answer_quoting_code_that_already_ran_does_not_run_it_again(chat_server: StartServer) -> None:
    quoted = "I set x with:\n```python\nx = 1\n```\nand that is all."
    server = chat_server([Reply.calls("x = 1"), quoted])
    sandbox = FakeSandbox()
    conversation = Conversation()

    collected, error = run_turn(server, make_request("Set x", conversation), sandbox)

    assert error is None and isinstance(collected[-1], events.Completed)
    assert sandbox.ran == ["x = 1"]
    assert any("already ran" in n.text for n in of_type(collected, events.Notice))
    assert conversation.messages[-1] == {
        "role": "assistant",
        "content": "I set x with:\n```python\nx = 1\n```",
    }
    assert len(server.chat_requests) == 2
