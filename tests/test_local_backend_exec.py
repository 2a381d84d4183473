"""The local backend as the session sees it: %%ci_exec turns, containers and their files.

Real sandboxes throughout (see test_local_sandbox.py for isolation and limits); no model server
is involved, because %%ci_exec and the file operations do not need one.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ci_magic import events
from ci_magic.backends.base import DEFAULT_DOWNLOAD_SIZE_CAP, Backend, Conversation, TurnRequest
from ci_magic.backends.local.backend import LocalBackend
from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.errors import ConfigurationError, ContainerFileError, SandboxError
from ci_magic.filenames import download_into
from ci_magic.result import ResultBuilder


async def download_bytes(backend: Backend, container_id: str, file_id: str) -> bytes:
    """A container file's content, fetched the way the notebook fetches it (to disk, bounded)."""
    with tempfile.TemporaryDirectory() as folder:
        path, _ = await download_into(
            backend, container_id, file_id, Path(folder), "download", max_bytes=DEFAULT_DOWNLOAD_SIZE_CAP
        )
        return path.read_bytes()


class Clock:
    """Wall-clock time the test can move forward, for idle expiry."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def backend(runner: asyncio.Runner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    sandbox = SandboxManager(tmp_path_factory.mktemp("containers"), pool_size=1)
    backend = LocalBackend(sandbox, model_client=None, model="")
    yield backend
    runner.run(backend.aclose())


@pytest.fixture
def container(runner: asyncio.Runner, backend: LocalBackend) -> str:
    info = runner.run(backend.create_container(name="notebook", memory_limit="1g", expires_after_minutes=20))
    return info.id


def turn(
    runner: asyncio.Runner, backend: LocalBackend, container: str, code: str | None, prompt: str = ""
) -> list[events.Event]:
    request = TurnRequest(
        prompt=prompt,
        container_id=container,
        model="",
        instructions="",
        conversation=Conversation(),
        exec_code=code,
    )

    async def collect() -> list[events.Event]:
        return [event async for event in backend.stream(request)]

    return runner.run(collect())


def run_code(runner: asyncio.Runner, backend: LocalBackend, container: str, code: str) -> str:
    return "".join(e.text for e in turn(runner, backend, container, code) if isinstance(e, events.Logs))


def test_the_local_backend_is_a_backend(backend: LocalBackend) -> None:
    assert isinstance(backend, Backend) and backend.name == "local"


def test_ci_exec_runs_the_code_verbatim_as_one_complete_turn(
    runner: asyncio.Runner, backend: LocalBackend, container: str
) -> None:
    code = "answer = 6 * 7\nprint(answer)"
    collected = turn(runner, backend, container, code)
    kinds = [type(e) for e in collected]
    assert kinds == [
        events.TurnStarted,
        events.CallStarted,
        events.CodeDone,
        events.CallStatus,
        events.Logs,
        events.CallStatus,
        events.Completed,
    ]
    started, done, running, _, finished, completed = (
        collected[1],
        collected[2],
        collected[3],
        collected[4],
        collected[5],
        collected[6],
    )
    assert isinstance(started, events.CallStarted) and started.container_id == container
    assert isinstance(done, events.CodeDone) and done.code == code and done.call_id == started.call_id
    assert (running, finished) == (
        events.CallStatus(started.call_id, "running"),
        events.CallStatus(started.call_id, "completed"),
    )
    assert isinstance(completed, events.Completed) and completed.container_id == container

    builder = ResultBuilder(prompt="")
    for event in collected:
        builder.feed(event)
    assert builder.result.ok and builder.result.code == code and builder.result.calls[0].logs == "42\n"


def test_failing_code_is_data_in_a_completed_turn(
    runner: asyncio.Runner, backend: LocalBackend, container: str
) -> None:
    collected = turn(runner, backend, container, "import json\njson.loads('{not json')")
    (error,) = [e for e in collected if isinstance(e, events.ExecutionError)]
    assert error.name == "JSONDecodeError" and "json.loads" in error.traceback
    assert [e.status for e in collected if isinstance(e, events.CallStatus)] == ["running", "failed"]
    assert isinstance(collected[-1], events.Completed)


def test_a_prompt_without_a_model_server_says_how_to_configure_one(
    runner: asyncio.Runner, backend: LocalBackend, container: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        turn(runner, backend, container, None, prompt="plot the sales")
    message = str(raised.value)
    assert "CodeInterpreter.model_base_url" in message and "CI_MAGIC_MODEL_BASE_URL" in message
    assert "CI_MAGIC_MODEL" in message and "%%ci_exec" in message
    assert raised.value._render_traceback_()[0].startswith("ci-magic configuration:")


def test_uploads_are_user_files_and_what_the_code_writes_is_the_assistants(
    runner: asyncio.Runner, backend: LocalBackend, container: str, tmp_path: Path
) -> None:
    local_csv = tmp_path / "sales.csv"
    local_csv.write_text("region,total\nnorth,10\nsouth,32\n")
    uploaded = runner.run(backend.upload_file(container, "sales.csv", local_csv))
    assert (uploaded.path, uploaded.source, uploaded.bytes) == (
        "/mnt/data/sales.csv",
        "user",
        local_csv.stat().st_size,
    )
    runner.run(backend.upload_file(container, "/mnt/data/notes/readme.txt", b"hello"))

    out = run_code(
        runner,
        backend,
        container,
        "import os, pandas as pd\n"
        "df = pd.read_csv('/mnt/data/sales.csv')\n"
        "os.makedirs('out', exist_ok=True)\n"
        "df.describe().to_csv('out/summary.csv')\n"
        "print(df.total.sum(), open('notes/readme.txt').read())",
    )
    assert out == "42 hello\n"

    files = {f.name: f for f in runner.run(backend.list_files(container))}
    assert {name: f.source for name, f in files.items()} == {
        "sales.csv": "user",
        "notes/readme.txt": "user",
        "out/summary.csv": "assistant",
    }
    assert files["sales.csv"].id == uploaded.id  # ids are stable across listings
    summary = runner.run(download_bytes(backend, container, files["out/summary.csv"].id))
    assert summary.startswith(b",total\ncount,2.0") and files["out/summary.csv"].bytes == len(summary)
    again = {f.name: f.id for f in runner.run(backend.list_files(container))}
    assert again == {name: f.id for name, f in files.items()}


def test_deleting_a_file_removes_it_from_the_sandbox_too(
    runner: asyncio.Runner, backend: LocalBackend, container: str
) -> None:
    doomed = runner.run(backend.upload_file(container, "old.parquet", b"PAR1"))
    runner.run(backend.delete_file(container, doomed.id))
    assert [f.name for f in runner.run(backend.list_files(container))] == []
    assert (
        run_code(runner, backend, container, "import os\nprint(os.path.exists('old.parquet'))") == "False\n"
    )
    with pytest.raises(ContainerFileError, match="no file with id"):
        runner.run(download_bytes(backend, container, doomed.id))


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/etc/passwd", "a/../../b.txt", "", "dir\\file.txt", "./x"]
)
def test_file_names_that_would_leave_mnt_data_are_refused(
    runner: asyncio.Runner, backend: LocalBackend, container: str, name: str
) -> None:
    with pytest.raises(ContainerFileError, match="would not land inside /mnt/data"):
        runner.run(backend.upload_file(container, name, b"x"))


def test_symlinks_made_in_the_sandbox_are_never_followed_by_the_host(
    runner: asyncio.Runner, backend: LocalBackend, container: str, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("the host's private data")
    host_dir = tmp_path / "host-folder"
    host_dir.mkdir()
    runner.run(backend.upload_file(container, "report.txt", b"honest content"))
    report = next(f for f in runner.run(backend.list_files(container)) if f.name == "report.txt")

    # The code swaps the listed file for a link to a host path and links a host folder.
    run_code(
        runner,
        backend,
        container,
        f"import os\nos.remove('report.txt')\nos.symlink({str(secret)!r}, 'report.txt')\n"
        f"os.symlink({str(host_dir)!r}, 'linked')\nos.symlink('/etc', 'etc')",
    )
    with pytest.raises(ContainerFileError, match="symlink"):
        runner.run(download_bytes(backend, container, report.id))
    assert [f.name for f in runner.run(backend.list_files(container))] == []
    with pytest.raises(ContainerFileError, match="symlink"):
        runner.run(backend.upload_file(container, "linked/planted.txt", b"x"))
    assert list(host_dir.iterdir()) == [] and secret.read_text() == "the host's private data"


def test_containers_are_created_listed_retrieved_and_deleted(
    runner: asyncio.Runner, backend: LocalBackend
) -> None:
    info = runner.run(backend.create_container(name="scratch", memory_limit="4g", expires_after_minutes=5))
    assert info.id.startswith("cntr_") and info.usable and info.memory_limit == "4g"
    assert runner.run(backend.get_container(info.id)) == info
    assert info.id in {c.id for c in runner.run(backend.sandbox.containers())}
    runner.run(backend.delete_container(info.id))
    assert runner.run(backend.get_container(info.id)) is None
    assert not (backend.sandbox.root / info.id).exists()
    with pytest.raises(SandboxError, match="no local container"):
        turn(runner, backend, info.id, "print(1)")


def test_an_idle_container_expires_but_its_files_can_still_be_fetched(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    clock = Clock()
    backend = LocalBackend(SandboxManager(tmp_path, pool_size=0, clock=clock), model_client=None, model="")
    try:
        info = runner.run(backend.create_container(name="idle", memory_limit="1g", expires_after_minutes=2))
        assert (
            run_code(runner, backend, info.id, "open('result.txt', 'w').write('42')\nprint('saved')")
            == "saved\n"
        )
        clock.now += 90  # activity moves the expiry: 90 s of idleness is fine
        assert runner.run(backend.get_container(info.id)).status == "running"
        clock.now += 60
        expired = runner.run(backend.get_container(info.id))
        assert expired is not None and expired.status == "expired" and not expired.usable
        with pytest.raises(SandboxError, match="expired after 2 idle minutes"):
            turn(runner, backend, info.id, "print(1)")
        (result,) = runner.run(backend.list_files(info.id))
        assert runner.run(download_bytes(backend, info.id, result.id)) == b"42"
    finally:
        runner.run(backend.aclose())


def test_a_restarted_notebook_finds_its_containers_and_files_again(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    first = LocalBackend(SandboxManager(tmp_path, pool_size=0), model_client=None, model="")
    info = runner.run(first.create_container(name="kept", memory_limit="1g", expires_after_minutes=20))
    run_code(runner, first, info.id, "open('model.pkl', 'w').write('weights')\nlearned = True")
    runner.run(first.aclose())  # the notebook's kernel restarts: our kernels go, the folder stays

    second = LocalBackend(SandboxManager(tmp_path, pool_size=0), model_client=None, model="")
    try:
        again = runner.run(second.get_container(info.id))
        assert again is not None and again.usable and again.name == "kept"
        (saved,) = runner.run(second.list_files(info.id))
        assert (saved.name, saved.source) == ("model.pkl", "assistant")
        assert runner.run(second.sandbox.get_file(info.id, saved.id)) == saved
        out = run_code(runner, second, info.id, "print('learned' in dir(), open('model.pkl').read())")
        assert out == "False weights\n"  # a fresh kernel, the same files
    finally:
        runner.run(second.aclose())


def test_reduced_isolation_is_announced_in_the_first_turn_only(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    backend = LocalBackend(
        SandboxManager(tmp_path, pool_size=0, isolation="none"), model_client=None, model=""
    )
    try:
        info = runner.run(backend.create_container(name="plain", memory_limit="1g", expires_after_minutes=20))
        first = turn(runner, backend, info.id, "print('hi')")
        second = turn(runner, backend, info.id, "print('hi')")
    finally:
        runner.run(backend.aclose())

    def messages(collected: list[events.Event]) -> list[events.Notice]:
        return [e for e in collected if isinstance(e, events.Notice) and e.kind == "message"]

    (notice,) = messages(first)
    assert notice.level == "warning" and "isolation is reduced" in notice.text
    assert isinstance(first[0], events.TurnStarted) and isinstance(first[1], events.Notice)
    assert not messages(second)
    for collected in first, second:  # what every status line carries, every turn
        assert [e.text for e in collected if isinstance(e, events.Notice) and e.kind == "status"] == [
            "not isolated"
        ]


def test_a_prompt_runs_the_models_code_in_the_sandbox(
    runner: asyncio.Runner, backend: LocalBackend, container: str, chat_server: Callable[..., Any]
) -> None:
    import openai

    from tests.servers.chat_server import Reply

    server = chat_server([Reply.calls("import os\nprint(os.getcwd(), 6 * 7)"), "The answer is 42."])
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test")
    model_backend = LocalBackend(backend.sandbox, model_client=client, model="scripted")
    builder = ResultBuilder(prompt="what is six times seven?")
    for event in turn(runner, model_backend, container, None, prompt="what is six times seven?"):
        builder.feed(event)
    result = builder.result
    assert result.ok and result.text == "The answer is 42."
    expected_cwd = (
        "/mnt/data"
        if backend.sandbox.isolation.namespaced
        else str(backend.sandbox.root / container / "data")
    )
    assert result.calls[0].logs == f"{expected_cwd} 42\n" and result.calls[0].status == "completed"
