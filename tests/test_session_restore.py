"""A user's container is replaced mid-session, and the variables built in it come back.

With ``CodeInterpreter.restore_on_expiry = "replay"`` (the default) the code that ran successfully
in the old container is run again in the new one, verbatim and in order, before the turn: locally
and on a gateway with no model, on OpenAI in forced code_interpreter requests, several blocks per
request. One line says what came back; code that took too long, or wrote outside /mnt/data, is not
re-run (one line says why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.gateway_support import KernelGateway, gateway_available
from tests.notebook_support import errors_of, kernel_env, openai_env, output_text, run_cells
from tests.notebook_support import local_env as notebook_local_env

pytestmark = pytest.mark.slow

SQUARES = "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"

# Two idle hours pass for the local sandbox: its clock is moved on (as the OpenAI test server's
# is), so the container expires the way it would after a long lunch.
LET_TWO_HOURS_PASS = """\
import time as _time
_sandbox = get_ipython().magics_manager.registry["CIMagics"].interpreter._get_session().backend.sandbox
_offset = getattr(_sandbox, "_hours_passed", 0) + 2
_sandbox._hours_passed = _offset
_sandbox._clock = lambda: _time.time() + 3600 * _offset
"""


def _summary(text: str) -> str:
    """The restore's one line (printed with -s: how long restoring took on each backend)."""
    return next((line for line in text.splitlines() if "re-ran" in line and "<" not in line), "")


def _restored_output(notebook: Any, index: int, backend: str) -> str:
    """The output of cell ``index``, run in the new container: no error, and its restore line printed."""
    cell = notebook.cells[index]
    text = output_text(cell)
    assert not errors_of(cell), text
    print(f"{backend}:", _summary(text))
    return text


def local_env(tmp_path: Path) -> dict[str, str | None]:
    return notebook_local_env(
        XDG_CACHE_HOME=str(tmp_path / "cache"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data")
    )


def test_local_state_comes_back_after_expiry_and_each_rule_holds(tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        "%%ci_exec\nx = 41\ndef bump(v):\n    return v + 1\nopen('/mnt/data/note.txt', 'w').write('kept')",
        "%%ci_exec\nraise ValueError('this one failed, so it is not re-run')",
        "%%ci_exec\ny = bump(x)\nprint('y is', y)",
        LET_TWO_HOURS_PASS,
        "%%ci_exec\nprint('after expiry:', y, open('/mnt/data/note.txt').read())",  # 5: restored
        '%config CodeInterpreter.restore_on_expiry = "off"',
        LET_TWO_HOURS_PASS,
        "%%ci_exec\nprint('with restore off:', 'y' in dir())",  # 8: nothing re-run
        '%config CodeInterpreter.restore_on_expiry = "replay"\n'
        "%config CodeInterpreter.restore_time_limit = 0.2",
        "%%ci_exec\nimport time\ntime.sleep(0.5)\nslow = 1",
        LET_TWO_HOURS_PASS,
        "%%ci_exec\nprint('after a slow block:', 'slow' in dir())",  # 12: over the time limit
        "%config CodeInterpreter.restore_time_limit = 60",
        "%%ci_exec\nopen('/tmp/elsewhere.txt', 'w').write('x')\noutside = 1",
        LET_TWO_HOURS_PASS,
        "%%ci_exec\nprint('after writing elsewhere:', 'outside' in dir())",  # 16: wrote outside /mnt/data
    ]
    with kernel_env(**local_env(tmp_path)):
        notebook = run_cells(cells, tmp_path, timeout=180)
    texts = [output_text(cell) for cell in notebook.cells]
    for index in (1, 3, 5, 8, 12, 16):
        assert not errors_of(notebook.cells[index]), texts[index]

    restored = texts[5]
    print("local:", _summary(restored))
    assert "after expiry: 42 kept" in restored, "x, bump and y are back, and the file the code wrote"
    assert "re-ran 2 code blocks" in restored and "x, bump, y and 1 file are back" in restored, restored
    assert "this one failed" not in restored

    assert "with restore off: False" in texts[8] and "re-ran" not in texts[8]

    assert "after a slow block: False" in texts[12]
    assert "not restored" in texts[12] and "restore_time_limit" in texts[12], texts[12]

    assert "after writing elsewhere: False" in texts[16]
    assert "wrote outside /mnt/data (/tmp/elsewhere.txt)" in texts[16], texts[16]


def test_openai_state_comes_back_in_one_batched_forced_request(openai_server, tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        SQUARES,  # two calls by the model: the table, then the plot and the csv
        "%%ci_exec\ntotal = int(df['n'].sum())",
        "%%ci_exec\nraise ValueError('failed: not re-run')",
        "print(_ci.container_id)",
        "%%ci_exec\nprint('after expiry:', df['square'].sum(), total)",
    ]

    def expire(notebook: Any) -> None:
        openai_server.expire(output_text(notebook.cells[4]).strip().splitlines()[-1])

    env = openai_env(openai_server.url, JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"))
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, before={5: expire})
    text = _restored_output(notebook, 5, "openai")
    assert "after expiry: 338350 5050" in text
    assert "re-ran 3 code blocks" in text and "df, fig, ax, total and 1 file are back" in text, text

    sent = [r for r in openai_server.requests if r.method == "POST" and r.path == "/v1/responses"]
    expired_at = next(i for i, r in enumerate(sent) if r.status == 400)
    restore = sent[expired_at + 1].json
    assert restore["tool_choice"] == {"type": "code_interpreter"}, "forced: the model must run the code"
    assert restore.get("previous_response_id") is None, "the restore is not part of the conversation"
    assert 'df["square"] = df["n"] ** 2' in restore["input"] and "total = int" in restore["input"]
    assert "failed: not re-run" not in restore["input"]
    assert len(sent) - expired_at - 1 == 2, "one request re-ran all three blocks, then the cell's own"


@pytest.mark.skipif(not gateway_available(), reason="jupyter_kernel_gateway is not installed")
def test_gateway_state_comes_back_after_the_kernel_was_culled(tmp_path: Path) -> None:
    with KernelGateway(tmp_path / "gateway", token="restore-test-token") as gateway:
        env = {
            **local_env(tmp_path),
            "CI_MAGIC_BACKEND": "gateway",
            "CI_MAGIC_GATEWAY_URL": gateway.url,
            "CI_MAGIC_GATEWAY_TOKEN": "restore-test-token",
            "CI_MAGIC_GATEWAY_KERNEL_NAME": None,
        }
        cells = [
            "%load_ext ci_magic",
            "%%ci_exec\nimport pandas as pd\nframe = pd.DataFrame({'a': [1, 2, 3]})\nframe.to_csv('a.csv')",
            "print(_ci.container_id)",
            "%%ci_exec\nprint('after the cull:', int(frame['a'].sum()))",
        ]

        def cull(notebook: Any) -> None:
            gateway.delete_kernel(output_text(notebook.cells[2]).strip().splitlines()[-1])

        with kernel_env(**env):
            notebook = run_cells(cells, tmp_path, timeout=180, before={3: cull})
    text = _restored_output(notebook, 3, "gateway")
    assert "after the cull: 6" in text
    assert "re-ran 1 code block" in text and "frame and 1 file are back" in text, text


def test_what_counts_as_writing_outside_mnt_data() -> None:
    from ci_magic.restore import writes_outside_data

    inside = [
        "df.to_csv('/mnt/data/out.csv')",
        "plt.savefig('chart.png')",  # relative: the working folder is the data folder
        "open('/etc/hosts').read()",  # reading is fine
        "Path('/mnt/data/sub').mkdir(exist_ok=True)",
    ]
    outside = {
        "df.to_parquet('/tmp/x.parquet')": "/tmp/x.parquet",
        "with open('/home/me/notes.txt', 'a') as f:\n    f.write('x')": "/home/me/notes.txt",
        "import os\nos.makedirs('~/cache')": "~/cache",
        "Path('/tmp/q.txt').write_text('x')": "/tmp/q.txt",
        "open('/mnt/data/../etc/x', 'w')": "/mnt/data/../etc/x",
        "!pip install lightgbm": "it installs packages",
    }
    assert [writes_outside_data(code) for code in inside] == [None] * len(inside)
    assert {code: writes_outside_data(code) for code in outside} == outside
