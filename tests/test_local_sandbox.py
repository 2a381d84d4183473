"""The local sandbox: each container is a real Jupyter kernel, isolated, limited and self-healing.

Everything here is real: ipykernel processes in bubblewrap namespaces, real rlimits, a real TCP
server on the host's loopback, real canary files in the home folder. Tests that need namespaces
skip (saying why) where bubblewrap cannot run. The attacks of issue 9 live in tests/security/.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ci_magic import events
from ci_magic.backends.local import sandbox as sandbox_module
from ci_magic.backends.local.isolation import detect_isolation, probe_python
from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.errors import ConfigurationError, SandboxError
from tests.security.sandbox_support import recording_connections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Sandbox:
    """A SandboxManager driven from synchronous test code, as the notebook bridge would."""

    def __init__(self, runner: asyncio.Runner, manager: SandboxManager) -> None:
        self.run = runner.run
        self.manager = manager

    def create(self, **options: object) -> str:
        return self.run(self.manager.create(name="test", **options)).id  # type: ignore[arg-type]

    def execute(self, cid: str, code: str, *, timeout: float | None = None) -> list[events.Event]:
        async def collect() -> list[events.Event]:
            code_ = textwrap.dedent(code)
            return [e async for e in self.manager.execute(cid, code_, call_id="ci_test", timeout=timeout)]

        return self.run(collect())

    def data_dir(self, cid: str) -> Path:
        return self.manager.root / cid / "data"


def stdout(collected: list[events.Event]) -> str:
    return "".join(e.text for e in collected if isinstance(e, events.Logs) and e.stream == "stdout")


def errors(collected: list[events.Event]) -> list[events.ExecutionError]:
    return [e for e in collected if isinstance(e, events.ExecutionError)]


def final_status(collected: list[events.Event]) -> str:
    last = collected[-1]
    assert isinstance(last, events.CallStatus), collected
    return last.status


@pytest.fixture(scope="module")
def sandbox(runner: asyncio.Runner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The default sandbox (strongest isolation available), with a short default timeout."""
    manager = SandboxManager(tmp_path_factory.mktemp("containers"), pool_size=0, execution_timeout=3.0)
    yield Sandbox(runner, manager)
    runner.run(manager.aclose())


@pytest.fixture(scope="module")
def container(sandbox: Sandbox) -> str:
    return sandbox.create()


@pytest.fixture(scope="module")
def isolated(runner: asyncio.Runner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox that must be isolated by bubblewrap (the only namespace mechanism)."""
    try:
        detect_isolation("bwrap", probe_python(sys.executable))
    except SandboxError as err:
        pytest.skip(f"bubblewrap isolation does not work on this machine: {err}")
    manager = SandboxManager(tmp_path_factory.mktemp("containers-bwrap"), pool_size=0, isolation="bwrap")
    yield Sandbox(runner, manager)
    runner.run(manager.aclose())


def namespaced(sandbox: Sandbox) -> bool:
    isolation = sandbox.manager.isolation
    return isolation is not None and isolation.namespaced


# ---------------------------------------------------------------- what the code shows


def test_prints_tables_figures_and_tracebacks_come_back_as_events(sandbox: Sandbox, container: str) -> None:
    collected = sandbox.execute(
        container,
        """
        import sys
        import pandas as pd
        import matplotlib.pyplot as plt
        print("hello from the sandbox")
        print("careful", file=sys.stderr)
        plt.plot([1, 2, 3], [3, 1, 2])
        plt.show()
        pd.DataFrame({"city": ["Oslo", "Lima"], "people": [709_000, 10_000_000]})
        """,
        timeout=60,  # the first import of pandas and matplotlib, on a busy machine
    )
    assert stdout(collected) == "hello from the sandbox\n"
    assert [e.text for e in collected if isinstance(e, events.Logs) and e.stream == "stderr"] == ["careful\n"]
    images = [e for e in collected if isinstance(e, events.Image)]
    assert len(images) == 1 and images[0].data.startswith(PNG_MAGIC) and images[0].mime == "image/png"
    table = next(e for e in collected if isinstance(e, events.RichOutput))
    assert "<table" in str(table.bundle["text/html"]) and "Lima" in str(table.bundle["text/plain"])
    assert final_status(collected) == "completed"

    failing = sandbox.execute(container, "def f():\n    return 1 / 0\nf()")
    (error,) = errors(failing)
    assert (error.name, error.value) == ("ZeroDivisionError", "division by zero")
    assert "return 1 / 0" in error.traceback and "\x1b[" not in error.traceback
    assert final_status(failing) == "failed"


def test_live_display_updates_keep_their_display_id(sandbox: Sandbox, container: str) -> None:
    collected = sandbox.execute(
        container,
        """
        from IPython.display import display
        handle = display("step 1", display_id=True)
        handle.update("step 2")
        """,
    )
    first, second = (e for e in collected if isinstance(e, events.RichOutput))
    assert first.display_id and first.display_id == second.display_id
    assert (first.update, second.update) == (False, True)
    assert second.bundle["text/plain"] == "'step 2'"


def test_variables_and_imports_persist_between_runs(sandbox: Sandbox, container: str) -> None:
    sandbox.execute(container, "import statistics\ntotal = 41")
    assert stdout(sandbox.execute(container, "print(statistics.mean([total, total + 2]))")) == "42\n"


def test_code_runs_in_mnt_data_and_its_files_land_in_the_container(sandbox: Sandbox) -> None:
    cid = sandbox.create()
    collected = sandbox.execute(cid, "import os\nprint(os.getcwd())\nopen('report.txt', 'w').write('done')")
    if namespaced(sandbox):
        assert stdout(collected) == "/mnt/data\n"
    assert (sandbox.data_dir(cid) / "report.txt").read_text() == "done"


# ----------------------------------------------------------------------- isolation


@pytest.fixture
def host_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on every host interface (loopback included), recording who connects."""
    server = socket.create_server(("0.0.0.0", 0))
    with recording_connections(server) as accepted:
        yield server.getsockname()[1], accepted


def test_the_network_is_unreachable_even_the_hosts_loopback(
    isolated: Sandbox, host_server: tuple[int, list[socket.socket]]
) -> None:
    port, accepted = host_server
    # Prove the server answers from the host before trusting a refusal from the sandbox.
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1
    cid = isolated.create()
    targets = ["127.0.0.1", *_host_addresses(), "1.1.1.1"]
    collected = isolated.execute(
        cid,
        f"""
        import socket
        for host in {targets!r}:
            try:
                socket.create_connection((host, {port}), timeout=2).close()
                print(host, "connected")
            except OSError as err:
                print(host, "blocked", type(err).__name__)
        try:
            socket.getaddrinfo("pypi.org", 443)
            print("dns works")
        except OSError:
            print("dns blocked")
        """,
    )
    out = stdout(collected)
    assert "connected" not in out and "dns works" not in out, out
    assert out.count("blocked") == len(targets) + 1
    assert len(accepted) == 1  # only the host's own probe ever reached the server


def _host_addresses() -> list[str]:
    """The host's own non-loopback address, where it has one (a route is enough, no traffic)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return []
        address = probe.getsockname()[0]
    return [] if address.startswith("127.") else [address]


def test_api_keys_in_the_hosts_environment_never_reach_the_sandbox(
    isolated: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "sk-canary-" + secrets.token_hex(8)
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    monkeypatch.setenv("CI_MAGIC_MODEL_API_KEY", canary)
    cid = isolated.create()  # started while the canary is in our environment
    collected = isolated.execute(
        cid,
        f"""
        import os, glob
        print("env", any("{canary}" in v for v in os.environ.values()))
        seen = []
        for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
            try:
                if b"{canary}" in open(path, "rb").read():
                    seen.append(path)
            except OSError:
                pass
        print("proc", seen)
        """,
    )
    assert stdout(collected) == "env False\nproc []\n"


def test_the_users_home_the_notebook_folder_and_other_containers_are_invisible(
    isolated: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home_canary = Path.home() / f"ci-magic-canary-{secrets.token_hex(4)}.txt"
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "secret.csv").write_text("salary\n1\n")
    monkeypatch.chdir(notebook)
    home_canary.write_text("private")
    try:
        neighbour = isolated.create()
        isolated.run(isolated.manager.upload(neighbour, "neighbour.txt", b"not yours"))
        cid = isolated.create()
        collected = isolated.execute(
            cid,
            f"""
            import os
            for path in [{str(home_canary)!r}, {str(notebook / "secret.csv")!r},
                         {str(isolated.data_dir(neighbour) / "neighbour.txt")!r}, "/mnt/data/neighbour.txt"]:
                print(os.path.exists(path))
            print(sorted(os.listdir(os.path.expanduser("~"))))
            """,
        )
    finally:
        home_canary.unlink()
    *exists, home_listing = stdout(collected).splitlines()
    assert exists == ["False"] * 4
    assert home_canary.name not in home_listing  # the sandbox's home is its own, empty but for IPython's


def test_writes_outside_mnt_data_never_reach_the_host(isolated: Sandbox) -> None:
    token = f"ci-magic-escape-{secrets.token_hex(4)}"
    cid = isolated.create()
    interpreter_dir = os.path.dirname(probe_python(sys.executable).executable)
    collected = isolated.execute(
        cid,
        f"""
        import os
        folders = ["/tmp", os.path.expanduser("~"), "/etc", "/usr", "/", {interpreter_dir!r}, "/mnt/data"]
        for folder in folders:
            try:
                with open(os.path.join(folder, {token!r}), "w") as f:
                    f.write("x")
                print(folder, "written")
            except OSError as err:
                print(folder, "refused", err.strerror)
        """,
    )
    out = stdout(collected)
    # The interpreter's folder is read-only, unless it lies in /tmp, which inside is the
    # sandbox's own tmpfs (only the files it needs are bound there).
    private = interpreter_dir.startswith(("/tmp/", str(Path.home()) + "/"))
    for folder in ("/etc", "/usr", *([] if private else [interpreter_dir])):
        assert f"{folder} refused" in out, out
    # The sandbox may scribble on its private /tmp and home: none of it exists on the host.
    for folder in ("/tmp", str(Path.home()), "/etc", "/usr", "/", interpreter_dir):
        assert not (Path(folder) / token).exists(), folder
    assert (isolated.data_dir(cid) / token).read_text() == "x"


def test_everyday_tools_still_work_inside_the_sandbox(isolated: Sandbox) -> None:
    cid = isolated.create()
    collected = isolated.execute(
        cid,
        """
        import multiprocessing, socket, subprocess
        with multiprocessing.Pool(2) as pool:
            print(pool.map(abs, [-1, -2]))
        server = socket.create_server(("127.0.0.1", 0))  # the sandbox's own loopback
        socket.create_connection(server.getsockname()).close()
        print(subprocess.run(["echo", "subprocess"], capture_output=True, text=True).stdout.strip())
        """,
        timeout=30,
    )
    assert stdout(collected) == "[1, 2]\nsubprocess\n"


def test_isolation_none_runs_unisolated_and_says_so(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "sk-canary-" + secrets.token_hex(8)
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    manager = SandboxManager(tmp_path / "containers", pool_size=0, isolation="none")
    plain = Sandbox(runner, manager)
    try:
        cid = plain.create()
        (warning,) = manager.take_notices()
        assert warning.level == "warning" and "not isolated" in warning.text
        assert manager.isolation is not None and manager.isolation.label == "not isolated"
        assert manager.take_notices() == []
        collected = plain.execute(
            cid,
            f"""
            import os, resource
            print(any("{canary}" in v for v in os.environ.values()))
            print(os.getcwd())
            print(resource.getrlimit(resource.RLIMIT_DATA)[0] < 4 * 2**30)
            """,
        )
        assert stdout(collected) == f"False\n{plain.data_dir(cid)}\nTrue\n"
    finally:
        runner.run(manager.aclose())


UNPRIVILEGED_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
from ci_magic.backends.local.sandbox import SandboxManager

async def main(port, canary):
    manager = SandboxManager(Path(os.environ["HOME"]) / "containers", pool_size=0)
    info = await manager.create(name="unprivileged")
    code = (
        "import os, socket\\n"
        f"print(os.path.exists({canary!r}))\\n"
        "try:\\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\\n"
        "except OSError:\\n"
        "    print('blocked')\\n"
    )
    out = [e.text async for e in manager.execute(info.id, code, call_id="c") if hasattr(e, "text")]
    print(json.dumps({"mode": manager.isolation.mode, "out": "".join(out)}))
    await manager.aclose()

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A home folder nobody can reach (pytest's own tmp_path sits below a root-only folder)."""
    home = Path(tempfile.mkdtemp(prefix="ci-magic-nobody-"))
    os.chown(home, 65534, 65534)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_an_unprivileged_user_gets_the_same_isolation(
    nobody_home: Path, host_server: tuple[int, list[socket.socket]]
) -> None:
    """As root, re-run the network and home checks as ``nobody`` (a user namespace, not a uid switch).

    The interpreter must be readable by nobody: this test's own, or the one named by
    CI_MAGIC_UNPRIVILEGED_PYTHON (e.g. a venv of /usr/bin/python3 that adds this venv's site-packages).
    """
    if os.geteuid() != 0:
        pytest.skip("not root: every other test here already runs unprivileged")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to switch to nobody")
    python = os.environ.get("CI_MAGIC_UNPRIVILEGED_PYTHON", sys.executable)
    # Through sh: setpriv execs its command while it still holds root's capabilities, so it would
    # start an interpreter nobody cannot really read; sh's exec happens as plain nobody.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    as_nobody += ["/bin/sh", "-c", 'exec "$0" "$@"']
    canary = nobody_home / "canary.txt"
    canary.write_text("private")
    os.chown(canary, 65534, 65534)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(nobody_home), "TMPDIR": str(nobody_home)}
    can_run = "import sys, ci_magic.backends.local.sandbox; print(open(sys.argv[1]).read())"
    check = subprocess.run(
        [*as_nobody, python, "-c", can_run, str(canary)], env=env, capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        why = check.stderr.strip().splitlines()[-1:]
        pytest.skip(
            f"nobody cannot run {python} with ci_magic importable ({why}); "
            "set CI_MAGIC_UNPRIVILEGED_PYTHON to an interpreter nobody can read"
        )
    assert check.stdout == "private\n"  # outside the sandbox, nobody sees its own home
    port, accepted = host_server
    done = subprocess.run(
        [*as_nobody, python, "-c", UNPRIVILEGED_SCRIPT, str(port), str(canary)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mode"] == "bwrap", report
    assert report["out"] == "False\nblocked\n"
    assert accepted == []


# -------------------------------------------------------------------------- limits


def test_a_memory_bomb_is_a_memory_error_and_the_container_keeps_its_files(sandbox: Sandbox) -> None:
    cid = sandbox.create()
    sandbox.run(sandbox.manager.upload(cid, "sales.csv", b"region,total\nnorth,3\n"))
    bomb = sandbox.execute(cid, "chunks = []\nwhile True:\n    chunks.append(bytes(100 * 2**20))")
    (error,) = errors(bomb)
    assert error.name == "MemoryError" and final_status(bomb) == "failed"
    after = sandbox.execute(cid, "del chunks\nprint(open('sales.csv').read().splitlines()[1])")
    assert stdout(after) == "north,3\n"


def test_a_parquet_round_trip_after_a_chart_does_not_hang_under_the_memory_limit(sandbox: Sandbox) -> None:
    # The everyday notebook order: draw a chart, then read a table. Arrow's default allocator
    # (mimalloc) spun forever here once the address-space limit refused it a new arena.
    cid = sandbox.create()
    collected = sandbox.execute(
        cid,
        """
        import matplotlib.pyplot as plt
        import pandas as pd
        plt.plot([1, 2, 3]); plt.savefig("chart.png")
        pd.DataFrame({"a": range(1000)}).to_parquet("table.parquet")
        print(pd.read_parquet("table.parquet").shape)
        """,
        timeout=60,
    )
    assert stdout(collected) == "(1000, 1)\n", collected
    assert final_status(collected) == "completed"


@pytest.mark.parametrize("allocator", ["default", "mimalloc"])
def test_after_reading_parquet_the_code_still_has_its_memory_tier(sandbox: Sandbox, allocator: str) -> None:
    # mimalloc (Arrow's default pool, and the one code may pick) reserved 1 GiB of address space
    # for its first arena: after a chart, read_parquet then hung past the interrupt; without the
    # chart it returned, but a 1g container had 50 MiB left for anything else.
    cid = sandbox.create(memory_limit="1g")
    pick = "pa.set_memory_pool(pa.mimalloc_memory_pool())" if allocator == "mimalloc" else ""
    collected = sandbox.execute(
        cid,
        f"""
        import matplotlib.pyplot as plt
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        {pick}
        plt.plot([1, 2, 3]); plt.savefig("chart.png")
        pd.DataFrame({{"a": range(100_000)}}).to_parquet("table.parquet")
        print(pd.read_parquet("table.parquet").shape)
        block = np.ones(600 * 2**20 // 8)
        print(block.nbytes // 2**20, "MiB")
        """,
        timeout=60,
    )
    assert stdout(collected) == "(100000, 1)\n600 MiB\n", collected
    assert final_status(collected) == "completed"


def test_the_memory_tier_sets_how_much_the_code_may_allocate(sandbox: Sandbox) -> None:
    two_gib = "block = bytes(2 * 2**30)\nprint(len(block) // 2**30, 'GiB')"
    small = sandbox.create(memory_limit="1g")
    assert errors(sandbox.execute(small, two_gib))[0].name == "MemoryError"
    large = sandbox.create(memory_limit="4g")
    assert stdout(sandbox.execute(large, two_gib)) == "2 GiB\n"
    with pytest.raises(ConfigurationError, match="1g, 4g, 16g, 64g"):
        sandbox.create(memory_limit="3g")


def test_a_runaway_file_write_stops_at_the_file_size_limit(sandbox: Sandbox, container: str) -> None:
    collected = sandbox.execute(
        container,
        """
        with open("huge.bin", "wb") as f:
            f.seek(9 * 2**30)  # sparse: past the 8 GiB limit without touching the disk
            try:
                f.write(b"x")
                f.flush()
            except OSError as err:
                print(err.strerror)
        """,
    )
    assert stdout(collected) == "File too large\n"


def test_a_sandbox_python_without_ipykernel_is_refused_with_advice(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    system = "/usr/bin/python3"
    lacks = (
        subprocess.run([system, "-c", "import ipykernel"], capture_output=True, check=False)
        if os.path.exists(system)
        else None
    )
    if lacks is None or lacks.returncode == 0:
        pytest.skip(f"needs {system} without ipykernel")
    manager = SandboxManager(tmp_path, python=system, pool_size=0)
    with pytest.raises(ConfigurationError, match="has no ipykernel") as raised:
        runner.run(manager.create(name="x"))
    assert "pip install ipykernel pandas numpy matplotlib" in str(raised.value)
    manager = SandboxManager(tmp_path, python=str(tmp_path / "no-such-python"), pool_size=0)
    with pytest.raises(ConfigurationError, match="does not exist"):
        runner.run(manager.create(name="x"))


def test_a_fork_bomb_stays_inside_its_process_limit(sandbox: Sandbox) -> None:
    cid = sandbox.create()  # first: the isolation in use is known once a container exists
    if not namespaced(sandbox):
        pytest.skip("without namespaces the process limit counts all of the user's processes")
    collected = sandbox.execute(
        cid,
        """
        import os, signal, subprocess, sys, time
        forever = "import os\\nwhile True:\\n    try: os.fork()\\n    except OSError: pass"
        bomb = subprocess.Popen([sys.executable, "-c", forever], start_new_session=True)
        time.sleep(2)
        running = sum(name.isdigit() for name in os.listdir("/proc"))
        os.killpg(bomb.pid, signal.SIGKILL)
        bomb.wait()
        print(running)
        """,
        timeout=30,
    )
    running = int(stdout(collected))
    assert 100 < running <= 256  # it hit the limit, and the limit held
    assert stdout(sandbox.execute(cid, "print('still answering')")) == "still answering\n"


def test_an_endless_loop_times_out_and_the_next_run_still_has_its_variables(sandbox: Sandbox) -> None:
    cid = sandbox.create()
    started = time.monotonic()
    collected = sandbox.execute(cid, "counter = 0\nwhile True:\n    counter += 1")  # default timeout: 3 s
    elapsed = time.monotonic() - started
    (error,) = errors(collected)
    assert error.name == "TimeoutError" and "3 s limit" in error.value
    assert final_status(collected) == "failed" and 2.9 < elapsed < 8
    assert stdout(sandbox.execute(cid, "print(counter > 0)")) == "True\n"


def test_code_that_ignores_the_interrupt_gets_the_kernel_restarted(sandbox: Sandbox) -> None:
    cid = sandbox.create()
    sandbox.run(sandbox.manager.upload(cid, "keep.txt", b"kept"))
    stubborn = """
    import time
    state = "lost on restart"
    while True:
        try:
            time.sleep(10)
        except KeyboardInterrupt:
            pass
    """
    collected = sandbox.execute(cid, stubborn, timeout=0.5)
    (error,) = errors(collected)
    assert error.name == "TimeoutError" and "restarted" in error.value
    after = sandbox.execute(cid, "print('state' in dir(), open('keep.txt').read())")
    assert stdout(after) == "False kept\n"


def test_stopping_to_listen_interrupts_the_running_code(sandbox: Sandbox, container: str) -> None:
    """What Ctrl-C on the notebook cell does: the stream is abandoned, the sandbox must stop too."""

    async def abandon() -> None:
        code = "print('working', flush=True)\nimport time\ntime.sleep(60)"
        stream = sandbox.manager.execute(container, code, call_id="ci_test")
        async for event in stream:
            if isinstance(event, events.Logs):
                break
        await stream.aclose()

    sandbox.run(abandon())
    started = time.monotonic()
    assert stdout(sandbox.execute(container, "print('free again')", timeout=10)) == "free again\n"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("crash", "reason"),
    [
        ("import os\nos._exit(3)", "exited with status 3"),
        ("import ctypes\nctypes.string_at(0)", "segmentation fault"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ],
    ids=["os._exit", "segfault", "oom-kill"],
)
def test_a_kernel_crash_is_reported_restarted_and_the_files_survive(
    sandbox: Sandbox, crash: str, reason: str
) -> None:
    cid = sandbox.create()
    sandbox.run(sandbox.manager.upload(cid, "inputs/data.csv", b"a,b\n1,2\n"))
    sandbox.execute(cid, "doomed = True")
    collected = sandbox.execute(cid, crash)
    (error,) = errors(collected)
    assert reason in error.value and "restarted" in error.value and "intact" in error.value
    assert final_status(collected) == "failed"
    after = sandbox.execute(cid, "print('doomed' in dir(), open('inputs/data.csv').read().split()[1])")
    assert stdout(after) == "False 1,2\n"


def test_a_kernel_that_dies_between_runs_is_restarted_with_a_notice(sandbox: Sandbox) -> None:
    cid = sandbox.create()
    sandbox.execute(cid, "import os, threading\nthreading.Timer(0.2, os._exit, (5,)).start()")
    time.sleep(0.8)
    collected = sandbox.execute(cid, "print('back')")
    notices = [e for e in collected if isinstance(e, events.Notice)]
    assert len(notices) == 1 and "exited with status 5" in notices[0].text
    assert stdout(collected) == "back\n"


# --------------------------------------------------------------------- warm pool


def test_the_warm_pool_hands_out_a_container_that_answers_at_once(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    cold_manager = SandboxManager(tmp_path / "cold", pool_size=0)
    warm_manager = SandboxManager(tmp_path / "warm", pool_size=1)
    cold, warm = Sandbox(runner, cold_manager), Sandbox(runner, warm_manager)
    try:
        cold.create()  # probe the interpreter outside the timings
        runner.run(warm_manager.warm())

        def first_answer(sandbox: Sandbox) -> float:
            started = time.monotonic()
            assert stdout(sandbox.execute(sandbox.create(), "print(1)")) == "1\n"
            return time.monotonic() - started

        cold_times = [first_answer(cold) for _ in range(3)]
        warm_times = []
        for _ in range(3):
            deadline = time.monotonic() + 30  # let the pool refill, as between two notebook cells
            while warm_manager.pool_ready() < 1 and time.monotonic() < deadline:
                runner.run(asyncio.sleep(0.05))  # the loop runs between cells, so the pool refills
            warm_times.append(first_answer(warm))
    finally:
        runner.run(cold_manager.aclose())
        runner.run(warm_manager.aclose())
    assert sorted(warm_times)[1] < 0.5 * sorted(cold_times)[1], (warm_times, cold_times)


def test_the_pool_refills_after_the_handed_out_containers_first_cell(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refill forks, mounts and imports beside the user's first cell: it waits for that cell."""
    manager = SandboxManager(tmp_path / "warm", pool_size=1)
    sandbox = Sandbox(runner, manager)
    try:
        runner.run(manager.warm())
        deadline = time.monotonic() + 60
        while manager.pool_ready() < 1 and time.monotonic() < deadline:
            runner.run(asyncio.sleep(0.05))
        cid = sandbox.create()
        runner.run(asyncio.sleep(0.5))  # the loop runs, as while the user types the first cell
        assert manager._pool == [], "the pool began refilling before the container's first cell"
        assert stdout(sandbox.execute(cid, "print(1)")) == "1\n"
        assert len(manager._pool) == 1, "the pool did not refill after the first cell"
        # A container nobody runs refills the pool all the same, a little later.
        monkeypatch.setattr(sandbox_module, "REFILL_AFTER", 0.2)
        while manager.pool_ready() < 1 and time.monotonic() < deadline + 60:
            runner.run(asyncio.sleep(0.05))
        runner.run(asyncio.sleep(0.2))
        sandbox.create()
        runner.run(asyncio.sleep(0.1))
        assert manager._pool == []
        runner.run(asyncio.sleep(0.5))
        assert len(manager._pool) == 1, "a container that was never run kept the pool empty"
    finally:
        runner.run(manager.aclose())
