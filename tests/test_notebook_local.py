"""With no OpenAI key, %%ci runs in the local sandbox, driven by an OpenAI-compatible chat model."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.notebook_support import (
    answers_of,
    errors_of,
    kernel_env,
    local_env,
    output_text,
    run_cells,
    texts_by_mime,
)
from tests.servers.chat_server import quickstart

pytestmark = pytest.mark.slow


def no_key_env(model_base_url: str | None) -> dict[str, str | None]:
    """No key and no backend named: local is the default without a key."""
    return local_env(CI_MAGIC_BACKEND=None, CI_MAGIC_MODEL_BASE_URL=model_base_url, CI_MAGIC_MODEL=None)


def test_prompt_streams_code_runs_it_locally_and_files_come_back(chat_server, tmp_path: Path) -> None:
    server = chat_server(quickstart)
    cells = [
        "%load_ext ci_magic",
        "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv",
        "squares = %ci_pull squares.csv\n"
        "print(type(squares).__name__, squares.shape, int(squares.iloc[-1, -1]))",
        "%%ci_exec\nimport os\nprint(os.getcwd(), sorted(os.listdir('.')))",
        "%ci_status",
    ]
    with kernel_env(**no_key_env(server.base_url)):
        notebook = run_cells(cells, tmp_path, timeout=180)
    ci_cell = notebook.cells[1]
    assert not errors_of(ci_cell), output_text(ci_cell)
    text = output_text(ci_cell)
    assert "** 2" in text or "**2" in text, "the model's code is shown"
    assert texts_by_mime(ci_cell, "image/png"), "the chart from the sandbox kernel is inline"
    assert any("squares.csv" in answer["text/plain"] for answer in answers_of(ci_cell)), "the answer"
    assert not texts_by_mime(ci_cell, "text/markdown"), "nothing the model wrote goes out as Markdown"
    saved = pd.read_csv(tmp_path / "ci_outputs" / "squares.csv")
    assert saved.shape[0] == 100
    assert "DataFrame (100, 2) 10000" in output_text(notebook.cells[2])
    exec_text = output_text(notebook.cells[3])
    assert not errors_of(notebook.cells[3]), exec_text
    assert "/mnt/data" in exec_text and "squares.csv" in exec_text
    status = output_text(notebook.cells[4])
    assert "local" in status and "cntr_" in status
    chat_requests = server.chat_requests
    assert chat_requests and chat_requests[0].body["tools"][0]["function"]["name"] == "python"


def test_without_a_model_server_prompts_explain_and_exec_still_works(tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", "%%ci\nHello", "%%ci_exec\nprint(6 * 7)"]
    with kernel_env(**no_key_env(None)):
        notebook = run_cells(cells, tmp_path, timeout=180)
    errors = errors_of(notebook.cells[1])
    assert len(errors) == 1
    message = "\n".join(errors[0].traceback)
    assert "model_base_url" in message and "CI_MAGIC_MODEL_BASE_URL" in message and "%%ci_exec" in message
    assert "Traceback" not in message
    assert not errors_of(notebook.cells[2]), output_text(notebook.cells[2])
    assert "42" in output_text(notebook.cells[2])


def test_dataframe_named_in_prompt_reaches_the_sandbox_with_its_schema_card(
    chat_server, tmp_path: Path
) -> None:
    server = chat_server(quickstart)
    cells = [
        "%load_ext ci_magic",
        "import pandas as pd\n"
        "sales_df = pd.DataFrame({'region': ['n', 's', 'e'], 'revenue': [1.5, 2.5, 3.0]})",
        "%%ci\nWhat is the total revenue in sales_df?",
        "%%ci_exec\nimport pandas as pd\nprint(pd.read_parquet('/mnt/data/sales_df.parquet').revenue.sum())",
    ]
    with kernel_env(**no_key_env(server.base_url)):
        notebook = run_cells(cells, tmp_path, timeout=180)
    assert not errors_of(notebook.cells[2]), output_text(notebook.cells[2])
    user_message = next(m for m in server.chat_requests[0].messages if m["role"] == "user")
    content = (
        user_message["content"] if isinstance(user_message["content"], str) else str(user_message["content"])
    )
    assert "/mnt/data/sales_df.parquet" in content and "revenue" in content and "float64" in content
    assert "7.0" in output_text(notebook.cells[3])


class MessageBytes:
    """A frontend that measures what Jupyter would send: every display and update, JSON-encoded."""

    def __init__(self) -> None:
        self.sent = 0
        self.messages = 0
        self.last: dict[str, object] = {}

    def open(self, bundle: dict, *, role: str = "output", final: bool = False) -> MessageBytes:
        self.update(bundle)
        return self

    def update(self, bundle: dict, *, final: bool = False) -> None:
        encoded = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in bundle.items()}
        self.sent += len(json.dumps(encoded))
        self.messages += 1
        if "── output ──" in str(bundle.get("text/plain")):
            self.last = bundle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local sandbox needs Linux namespaces")
def test_a_call_printing_10_mb_sends_well_under_1_mb_and_keeps_the_whole_log(tmp_path: Path) -> None:
    from ci_magic.interpreter import CodeInterpreter

    frontend = MessageBytes()
    code = "for i in range(100_000):\n    print(f'line {i:06d} ' + 'x' * 93)"  # 10.6 MB
    with CodeInterpreter(backend="local", frontend=frontend, output_dir=str(tmp_path)) as ci:
        result = ci.exec(code)
    log = result.calls[0].logs
    assert len(log) == 10_600_000, "the Result keeps all of it"
    assert frontend.sent < 1_000_000, f"{frontend.sent:,} bytes in {frontend.messages} display messages"
    shown = str(frontend.last["text/plain"])
    assert "line 000000" in shown and "line 099999" in shown, "the head and the tail are shown"
    saved = next((tmp_path / "logs").glob("*-stdout.txt"))
    assert saved.read_text() == log and saved.name in str(frontend.last["text/html"]), "saved whole, linked"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local sandbox needs Linux namespaces")
def test_code_stopped_by_the_execution_timeout_ends_as_failed_saying_which_setting(tmp_path: Path) -> None:
    import io

    from ci_magic.interpreter import CodeInterpreter
    from ci_magic.render.frontend import TerminalFrontend

    out = io.StringIO()
    with CodeInterpreter(
        backend="local", execution_timeout=1, frontend=TerminalFrontend(out), output_dir=str(tmp_path)
    ) as ci:
        result = ci.exec("import time\nprint('working')\ntime.sleep(60)")
    printed = out.getvalue()
    [call] = result.calls
    assert call.status == "failed" and call.error is not None
    assert "stopped after 1 s" in call.error.value and "CodeInterpreter.execution_timeout" in call.error.value
    assert "KeyboardInterrupt" not in printed, "no traceback of an interrupt the user never made"
    assert "ci: failed after" in printed and "done in" not in printed
