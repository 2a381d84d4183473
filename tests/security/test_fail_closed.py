"""Class 6 of issue 9: the sandbox fails closed.

Where bubblewrap is missing or cannot make namespaces, ``auto`` (the default) must stop the cell
with one paragraph saying what to do, never run the code unisolated. Only a user who sets
``isolation = "none"`` gets unisolated code, and is told so. Tried the way a user meets it: a
notebook shell with ``%%ci_exec`` on the local backend, and the sandbox manager the model uses.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets import TraitError

from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.config import Settings
from ci_magic.errors import ConfigurationError, SandboxError
from ci_magic.events import Logs

MARKER = "ran-unisolated"


@pytest.fixture
def no_bwrap_path(tmp_path: Path) -> str:
    """A PATH with everything a notebook needs except bubblewrap."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("sh", "setpriv", "unshare", "python3"):
        for place in ("/usr/bin", "/bin"):
            if os.path.exists(f"{place}/{tool}"):
                os.symlink(f"{place}/{tool}", folder / tool)
                break
    return str(folder)


@pytest.fixture
def broken_bwrap_path(tmp_path: Path) -> str:
    """A PATH whose bwrap behaves like one in a container that forbids user namespaces."""
    folder = tmp_path / "broken-bin"
    folder.mkdir()
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"{folder}:/usr/bin:/bin"


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("CI_MAGIC_BACKEND", "local")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CI_MAGIC_ISOLATION", raising=False)
    monkeypatch.chdir(tmp_path)
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ci_magic")
    shell.run_line_magic("config", "CodeInterpreter.pool_size = 0")
    yield shell
    shell.run_line_magic("unload_ext", "ci_magic")
    InteractiveShell.clear_instance()


@pytest.fixture
def unisolated_notebook(
    notebook: InteractiveShell,
    no_bwrap_path: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> InteractiveShell:
    """A notebook on a machine without bubblewrap whose user chose ``isolation = "none"``."""
    monkeypatch.setenv("PATH", no_bwrap_path)
    notebook.run_line_magic("config", 'CodeInterpreter.isolation = "none"')
    capsys.readouterr()
    return notebook


def hostile_cell(tmp_path: Path) -> str:
    """Code that would leave a file on the host if it ran without a sandbox."""
    return f"open({str(tmp_path / MARKER)!r}, 'w').write('x')\nprint('ran')"


def test_auto_without_bubblewrap_stops_the_cell_with_what_to_do(
    notebook: InteractiveShell, no_bwrap_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", no_bwrap_path)
    outcome = notebook.run_cell(f"%%ci_exec\n{hostile_cell(tmp_path)}")
    error = outcome.error_in_exec
    assert isinstance(error, SandboxError), error
    paragraph = str(error)
    assert "\n" not in paragraph
    assert "bubblewrap" in paragraph and "is not installed" in paragraph
    assert "apt-get install bubblewrap" in paragraph
    assert 'CodeInterpreter.isolation = "none"' in paragraph and "not isolated" in paragraph
    assert not (tmp_path / MARKER).exists(), "the code ran without isolation"


def test_auto_with_a_bubblewrap_that_cannot_make_namespaces_fails_closed(
    runner: asyncio.Runner, broken_bwrap_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", broken_bwrap_path)
    manager = SandboxManager(tmp_path / "containers", pool_size=0)  # isolation="auto"
    try:
        with pytest.raises(SandboxError) as raised:
            runner.run(manager.create(name="model's container"))
    finally:
        runner.run(manager.aclose())
    message = str(raised.value)
    assert "does not work here" in message and "No permissions to create new namespace" in message
    assert "apt-get install bubblewrap" in message


def test_isolation_none_is_a_knowing_choice_and_says_not_isolated(
    unisolated_notebook: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = unisolated_notebook.run_cell("%%ci_exec\nprint(6 * 7)")
    assert outcome.error_in_exec is None, outcome.error_in_exec
    shown = capsys.readouterr().out
    assert "42" in shown and "not isolated" in shown, shown
    manager = SandboxManager(tmp_path / "containers", pool_size=0, isolation="none")
    runner = asyncio.Runner()
    try:
        info = runner.run(manager.create(name="trusted"))

        async def run() -> list[object]:
            return [e async for e in manager.execute(info.id, "print(6 * 7)", call_id="c")]

        events = runner.run(run())
        (warning,) = manager.take_notices()
        assert warning.level == "warning" and "not isolated" in warning.text
        assert manager.isolation is not None and manager.isolation.label == "not isolated"
        assert "".join(e.text for e in events if isinstance(e, Logs)) == "42\n"
    finally:
        runner.run(manager.aclose())
        runner.close()


def test_the_isolation_setting_is_validated_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CI_MAGIC_ISOLATION", raising=False)
    assert Settings().isolation == "auto"
    monkeypatch.setenv("CI_MAGIC_ISOLATION", "None")
    assert Settings().isolation == "none"
    for retired in ("unshare", "off", ""):
        with pytest.raises(TraitError, match=r"auto.*bwrap.*none"):
            Settings(isolation=retired)
    with pytest.raises(ConfigurationError, match="auto, bwrap, none"):
        asyncio.run(
            SandboxManager(tmp_path / "containers", pool_size=0, isolation="unshare").create(name="x")
        )


def test_without_libseccomp_the_cell_stops_instead_of_running_unfiltered(
    notebook: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ci_magic.backends.local import isolation, seccomp

    # As on a machine where the binding (or libseccomp.so.2 behind it) cannot be loaded.
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    seccomp.filter_bpf.cache_clear()
    isolation._detect.cache_clear()
    try:
        outcome = notebook.run_cell(f"%%ci_exec\n{hostile_cell(tmp_path)}")
    finally:
        seccomp.filter_bpf.cache_clear()
        isolation._detect.cache_clear()
    error = outcome.error_in_exec
    assert isinstance(error, SandboxError), error
    assert "libseccomp" in str(error) and "apt-get install libseccomp2" in str(error)
    assert not (tmp_path / MARKER).exists()


def status_lines(shown: str) -> list[str]:
    """The final status line of every turn, as the terminal shows it (``ci: done in ...``)."""
    return [line for line in shown.splitlines() if line.startswith("ci: ")]


TURNS = ["%%ci_exec\nprint(6 * 7)", "%%ci_exec\n1 / 0", "%%ci_exec\nimport os\nprint(os.getpid())"]


def test_every_status_line_says_not_isolated_when_isolation_is_none(
    unisolated_notebook: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    for cell in TURNS:  # a fine turn, one whose code raised, and one after the warning was shown
        unisolated_notebook.run_cell(cell)
    lines = status_lines(capsys.readouterr().out)
    assert len(lines) == len(TURNS), lines
    assert all("not isolated" in line for line in lines), lines


def test_no_status_line_says_not_isolated_under_bubblewrap(
    notebook: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    capsys.readouterr()
    for cell in TURNS:
        outcome = notebook.run_cell(cell)
        if isinstance(outcome.error_in_exec, SandboxError):
            pytest.skip(f"bubblewrap cannot make a sandbox here: {outcome.error_in_exec}")
    lines = status_lines(capsys.readouterr().out)
    assert len(lines) == len(TURNS), lines
    assert not any("not isolated" in line for line in lines), lines
