"""A user restarts the notebook's kernel mid-session, and the first cell afterwards picks up where they were.

The session saves its state (container id, conversation, transcript, pushed files) in a small file
keyed by the notebook's path, in the user's Jupyter data directory. A kernel *restart* keeps the
container; the first cell after it reattaches and says so in one line. On OpenAI and a gateway the
container (and its memory) lives on; the local sandbox dies with its kernel by design, so its files
stay and its in-memory state is re-run. ``%ci_reset`` forgets the saved state; a real shutdown
deletes the container as before.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient.util import ensure_async, run_sync

from tests.gateway_support import KernelGateway, gateway_available
from tests.notebook_support import errors_of, kernel_env, local_env, notebook_client, openai_env, output_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RESTART = "<restart the kernel>"
SQUARES = "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"


def run_with_restarts(
    cells: Sequence[str],
    workdir: Path,
    *,
    timeout: int = 180,
    expire_before: dict[int, Callable[[str], None]] | None = None,
) -> list[Any]:
    """Run ``cells`` in one notebook; at each RESTART the kernel is restarted the way Jupyter's
    "Restart kernel" does it (KernelManager.restart_kernel: a shutdown_request with restart=True).
    ``expire_before[i](container_id)`` runs before cell ``i`` with the id the cell before the restart
    printed last. Returns the executed cells (RESTART markers left out)."""
    client = notebook_client([c for c in cells if c != RESTART], workdir, timeout=timeout)
    notebook = client.nb
    restart_before = set()
    index = 0
    for source in cells:
        if source == RESTART:
            restart_before.add(index)
        else:
            index += 1
    with client.setup_kernel():
        for number, cell in enumerate(notebook.cells):
            if number in restart_before:
                assert client.km is not None and client.kc is not None
                # nbclient's manager and client are the async ones (AsyncKernelManager, AsyncKernelClient).
                run_sync(ensure_async_call(client.km.restart_kernel))()
                ready = getattr(client.kc, "wait_for_ready")  # noqa: B009  (typed on the blocking client only)
                run_sync(ensure_async_call(ready))(timeout=60)
            if expire_before and number in expire_before:
                printed = [
                    output_text(c).strip() for c in notebook.cells[:number] if "cntr_" in output_text(c)
                ]
                expire_before[number](printed[-1].splitlines()[-1])
            client.execute_cell(cell, number)
    return list(notebook.cells)


def ensure_async_call(method: Any) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        return await ensure_async(method(*args, **kwargs))

    return call


def seconds_of(cell: Any) -> float:
    """How long the cell took, from the kernel's own timestamps in the cell's metadata."""
    timing = cell.metadata["execution"]
    start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def state_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "ci-magic" / "sessions").glob("*.json"))


def test_openai_restart_reattaches_to_the_same_container_and_conversation(
    openai_server, tmp_path: Path
) -> None:
    data_dir = tmp_path / "jupyter-data"
    notebook_path = tmp_path / "analysis.ipynb"
    cells = [
        "%load_ext ci_magic",
        SQUARES,
        "print(_ci.container_id, _ci.response_id)",
        RESTART,
        "%load_ext ci_magic",
        "%%ci\nWhat is in /mnt/data now?",  # 4: reattaches
        "%%ci_exec\nprint('df is still here:', df.shape)",
        "%ci_reset",
        RESTART,
        "%load_ext ci_magic",
        "%%ci\nWhat is in /mnt/data now?",  # 8: after %ci_reset: a new session
    ]
    # JPY_SESSION_NAME is how the Jupyter server tells a kernel its notebook's path.
    env = openai_env(openai_server.url, JUPYTER_DATA_DIR=str(data_dir), JPY_SESSION_NAME=str(notebook_path))
    seen_state: dict[str, Any] = {}

    def look_at_state_file(_: Any) -> None:
        files = state_files(data_dir)
        seen_state["files"] = files
        seen_state["text"] = files[0].read_text() if files else ""
        seen_state["mode"] = stat.S_IMODE(files[0].stat().st_mode) if files else None
        seen_state["folder_mode"] = stat.S_IMODE(files[0].parent.stat().st_mode) if files else None

    with kernel_env(**env):
        notebook = run_with_restarts(cells, tmp_path)
        # (the state file was written after cell 1, and again at the restart)
        look_at_state_file(None)
    texts = [output_text(cell) for cell in notebook]
    first_container, first_response = texts[2].split()[-2:]

    reattached = notebook[4]
    assert not errors_of(reattached), texts[4]
    line = f"Reattached to container {first_container} after the kernel restart; the conversation continues."
    assert line in texts[4]
    assert "started a new one" not in texts[4]
    sent = [r for r in openai_server.requests if r.method == "POST" and r.path == "/v1/responses"]
    after_restart = sent[1].json
    assert after_restart["tools"][0]["container"] == first_container, "the same container"
    assert after_restart["previous_response_id"] == first_response, "the same conversation"
    assert "df is still here: (100, 2)" in texts[5], "its memory lived on through the restart"
    print(f"openai: reattach cell {seconds_of(reattached):.2f} s, next cell {seconds_of(notebook[5]):.2f} s")

    creates = [r for r in openai_server.requests if r.method == "POST" and r.path == "/v1/containers"]
    deletes = [r for r in openai_server.requests if r.method == "DELETE" and "/containers/" in r.path]
    assert deletes[0].path.endswith(first_container), "%ci_reset deleted it; the restart did not"
    assert len(creates) == 2, "one before the restart, one after %ci_reset; none for the restart"
    assert "Reattached" not in texts[8] and not errors_of(notebook[8])
    assert sent[-1].json.get("previous_response_id") is None, "%ci_reset forgot the conversation"
    assert len(deletes) == 2, "the shutdown at the end deleted the last container as before"

    # The state file: in the Jupyter data dir (not the notebook's folder), user-only, no secrets.
    assert not list(tmp_path.glob("*.json")), "nothing beside the notebook"
    assert seen_state["files"], "kept after the final shutdown: the notebook's path names it"
    assert seen_state["mode"] == 0o600 and seen_state["folder_mode"] == 0o700
    assert "test-key" not in seen_state["text"] and openai_server.url not in seen_state["text"]
    saved = json.loads(seen_state["text"])
    assert saved["key"] == f"notebook:{notebook_path}" and saved["ended"] == "shutdown"


def test_local_restart_reattaches_keeps_files_and_reruns_memory(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = local_env(
        XDG_CACHE_HOME=str(cache),
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
        JPY_SESSION_NAME=None,  # no notebook path: the kernel's connection file names the session
    )
    cells = [
        "%load_ext ci_magic",
        "%%ci_exec\nx = 41\nwith open('/mnt/data/kept.txt', 'w') as f:\n    f.write('written before')",
        "%%ci_exec\nimport os\nprint('sandbox pid', os.getpid())",
        "print(_ci.container_id)",
        RESTART,
        "%load_ext ci_magic",
        "%%ci_exec\nprint('after restart:', x + 1, open('/mnt/data/kept.txt').read())",  # 5
        "%%ci_exec\nprint('and then:', x)",  # 6: an ordinary cell, for comparison
    ]
    with kernel_env(**env):
        notebook = run_with_restarts(cells, tmp_path)
    texts = [output_text(cell) for cell in notebook]
    container = texts[3].strip().splitlines()[-1]
    after = notebook[5]
    assert not errors_of(after), texts[5]
    assert f"Reattached to container {container} after the kernel restart" in texts[5]
    assert "after restart: 42 written before" in texts[5]
    assert "re-ran 2 code blocks" in texts[5], "the sandbox died with its kernel: its memory is re-run"
    assert "started a new one" not in texts[5]
    assert "and then: 41" in texts[6] and "re-ran" not in texts[6]
    # Nothing of the first sandbox outlived the kernel that started it.
    old_pid = int(re.search(r"sandbox pid (\d+)", texts[2]).group(1))  # type: ignore[union-attr]
    assert old_pid > 0
    print(f"local: reattach cell {seconds_of(after):.2f} s, next cell {seconds_of(notebook[6]):.2f} s")
    # Jupyter gives an exiting kernel 5 s before it kills it; what that kernel started then goes too,
    # later on a busy machine. A sandbox left running stays: the wait ends at once when all are gone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _sandboxes_under(cache):
        time.sleep(0.1)
    assert not _sandboxes_under(cache), "the final shutdown left no sandbox process running"


def _sandboxes_under(folder: Path) -> list[int]:
    """Processes whose command line or working directory lies under ``folder`` (the containers' root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(folder) in command or cwd.startswith(str(folder)):
            found.append(int(entry.name))
    return found


def test_reset_forgets_the_saved_state(tmp_path: Path) -> None:
    """%ci_reset removes the state file at once (not only at the next save)."""
    data_dir = tmp_path / "jupyter-data"
    env = local_env(
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        JUPYTER_DATA_DIR=str(data_dir),
        JPY_SESSION_NAME=str(tmp_path / "reset.ipynb"),
    )
    seen: dict[str, list[Path]] = {}
    cells = ["%load_ext ci_magic", "%%ci_exec\nx = 1", "%ci_reset", "print('done')"]

    def before(index: int):
        def look(_: Any) -> None:
            seen[str(index)] = state_files(data_dir)

        return look

    with kernel_env(**env):
        from tests.notebook_support import run_cells

        run_cells(cells, tmp_path, before={2: before(2), 3: before(3)})
    assert seen["2"], "saved after the first turn"
    assert not seen["3"], "%ci_reset forgot it"
    nbformat.validate  # noqa: B018  (nbformat is what run_cells builds on)


@pytest.mark.skipif(not gateway_available(), reason="jupyter_kernel_gateway is not installed")
def test_gateway_restart_reattaches_to_the_same_kernel_with_its_memory(tmp_path: Path) -> None:
    with KernelGateway(tmp_path / "gateway", token="reattach-test-token") as gateway:
        env = {
            "OPENAI_API_KEY": None,
            "AZURE_OPENAI_API_KEY": None,
            "CI_MAGIC_BACKEND": "gateway",
            "CI_MAGIC_MODEL_BASE_URL": None,
            "CI_MAGIC_GATEWAY_URL": gateway.url,
            "CI_MAGIC_GATEWAY_TOKEN": "reattach-test-token",
            "CI_MAGIC_GATEWAY_KERNEL_NAME": None,
            "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
            "JPY_SESSION_NAME": str(tmp_path / "gateway.ipynb"),
            "PYTHONPATH": str(REPO),
        }
        cells = [
            "%load_ext ci_magic",
            "%%ci_exec\ntotal = 6\nwith open('made.txt', 'w') as f:\n    f.write('x')",
            "print(_ci.container_id)",
            RESTART,
            "%load_ext ci_magic",
            "%%ci_exec\nprint('still here:', total)",  # 4: reattached, memory intact
            "%%ci_exec\nprint('and then:', total)",
        ]
        with kernel_env(**env):
            notebook = run_with_restarts(cells, tmp_path)
        texts = [output_text(cell) for cell in notebook]
        kernel_id = texts[2].strip().splitlines()[-1]
        # The gateway lists a kernel until its own shutdown of it has finished: wait for that.
        deadline = time.monotonic() + 20
        while kernel_id in (left := gateway.kernel_ids()) and time.monotonic() < deadline:
            time.sleep(0.3)
        saved = state_files(tmp_path / "jupyter-data")
        state_text = saved[0].read_text() if saved else ""
    after = notebook[4]
    assert not errors_of(after), texts[4]
    assert (
        f"Reattached to container {kernel_id} after the kernel restart; the conversation continues."
        in texts[4]
    )
    assert "still here: 6" in texts[4] and "re-ran" not in texts[4], "the gateway kept its memory"
    assert "made.txt" not in "".join(texts[4:]), "its files are known again, not new to this turn"
    print(f"gateway: reattach cell {seconds_of(after):.2f} s, next cell {seconds_of(notebook[5]):.2f} s")
    assert kernel_id not in left, "the final shutdown deleted the kernel as before"
    assert "reattach-test-token" not in state_text and gateway.url not in state_text


def test_openai_restart_then_expiry_the_pushed_data_and_the_state_come_back(
    openai_server, tmp_path: Path
) -> None:
    """After a restart the container had expired too: the expiry rules apply, with what the kernel
    before the restart knew: the pushed frame is re-sent (its bytes were kept with the saved state)
    and the code that read it is re-run."""
    data_dir = tmp_path / "jupyter-data"
    cells = [
        "%load_ext ci_magic",
        "import pandas as pd\nsales = pd.DataFrame({'revenue': [1.5, 2.5, 3.0]})\n%ci_push sales",
        # The code reads the path the schema card gives (OpenAI prefixes each upload with random hex).
        "ci = get_ipython().magics_manager.registry['CIMagics'].interpreter\n"
        "path = next(row.path for row in ci.files() if row.path.endswith('sales.parquet'))\n"
        "get_ipython().run_cell_magic('ci_exec', '', "
        "f'import pandas as pd\\ntotal = pd.read_parquet({path!r}).revenue.sum()')",
        "print(_ci.container_id)",
        RESTART,
        "%load_ext ci_magic",
        "%%ci_exec\nprint('total is back:', total)",  # 5: the container expired meanwhile
    ]
    env = openai_env(
        openai_server.url, JUPYTER_DATA_DIR=str(data_dir), JPY_SESSION_NAME=str(tmp_path / "sales.ipynb")
    )
    with kernel_env(**env):
        notebook = run_with_restarts(cells, tmp_path, expire_before={5: openai_server.expire})
    texts = [output_text(cell) for cell in notebook]
    after = notebook[5]
    assert not errors_of(after), texts[5]
    assert "is expired; started a new one" in texts[5]
    assert "total is back: 7.0" in texts[5], "sales.parquet was re-sent, then the code that read it re-run"
    assert not errors_of(notebook[2]) and "FileNotFoundError" not in texts[2]
    assert "re-ran 1 code block" in texts[5]
    uploads = [r for r in openai_server.requests if r.method == "POST" and r.path.endswith("/files")]
    assert len(uploads) == 2, "sent before the restart, and again to the new container after it"


def test_a_state_file_that_is_not_trustworthy_is_ignored(tmp_path: Path) -> None:
    """The state file is the user's own, but it is read as defensively as anything on disk: a symlink,
    an oversized file, another notebook's state, a bad id or another version are ignored, not read."""
    from ci_magic.state_file import MAX_STATE_BYTES, SessionState, StateFile

    folder = tmp_path / "sessions"
    mine = StateFile("notebook:/home/me/analysis.ipynb", folder)
    mine.save(SessionState(backend="openai", backend_fingerprint="f", container_id="cntr_abc"))
    assert mine.load() is not None and mine.load().container_id == "cntr_abc"  # type: ignore[union-attr]
    assert stat.S_IMODE(mine.path.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700

    good = json.loads(mine.path.read_text())
    for change in (
        {"key": "notebook:/home/me/other.ipynb"},  # another notebook's (a hash collision, a copied file)
        {"version": 99},
        {"container_id": "../../etc/passwd"},
    ):
        mine.path.write_text(json.dumps({**good, **change}))
        loaded = mine.load()
        assert loaded is None or loaded.container_id is None, change

    mine.path.write_text(json.dumps(good) + " " * (MAX_STATE_BYTES + 1))
    assert mine.load() is None, "oversized: not read"

    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(json.dumps(good))
    mine.path.unlink()
    mine.path.symlink_to(elsewhere)
    assert mine.load() is None, "a symlink is not followed"
