"""A person runs %%ci in terminal IPython (a real pseudo-terminal) and reads the result as plain text.

IPython runs under pexpect with ``TERM=dumb``, so prompt_toolkit moves no cursor and between one
``In [n]:`` prompt and the next the screen holds only what the cell printed: any ANSI, HTML or
JSON there is ours. The model is the scripted quickstart on the in-process OpenAI-compatible
server, slowed so there is a stream to interrupt.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.servers.openai_server import OpenAIServer

pytestmark = pytest.mark.slow

QUICKSTART = ["%%ci", "Load the numbers 1..100, plot their squares and save the table as squares.csv"]
PROMPT = re.compile(r"In \[(\d+)\]: ")
TIMEOUT = 60


class Terminal:
    """``ipython`` in a 120×50 pseudo-terminal; ``run`` types a cell and returns what it printed."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.expect_prompt()

    def expect_prompt(self, timeout: float = TIMEOUT) -> str:
        self.child.expect(PROMPT, timeout=timeout)
        return str(self.child.before)

    def type_cell(self, lines: list[str]) -> None:
        """Type the lines and press Enter; a cell magic, as for a person, ends with two empty lines."""
        for line in lines:
            self.child.send(line + "\r")
        if lines[0].startswith("%%"):
            self.child.send("\r\r")

    def run(self, lines: list[str], timeout: float = TIMEOUT) -> str:
        self.type_cell(lines)
        return output_of(self.expect_prompt(timeout), lines)


def output_of(raw: str, typed: list[str]) -> str:
    """What the cell printed, as the terminal shows it: ``\\r`` applied, the echo of the input dropped."""
    lines = screen(raw).split("\n")
    while lines and (not lines[0].strip() or any(lines[0].startswith(t) for t in typed)):
        lines.pop(0)
    return "\n".join(lines)


def screen(raw: str) -> str:
    """Apply carriage returns the way a terminal does: later text overwrites the line from column 0."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return "\n".join(lines).strip("\n")


@pytest.fixture
def slow_server(openai_server: OpenAIServer) -> OpenAIServer:
    openai_server.event_delay = 0.02
    return openai_server


@pytest.fixture
def terminal(slow_server: OpenAIServer, tmp_path: Path) -> Iterator[Terminal]:
    env = {
        **os.environ,
        "TERM": "dumb",
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": slow_server.url,
        "IPYTHONDIR": str(tmp_path / "ipython"),  # no user profile or startup files
    }
    for name in (
        "CI_MAGIC_BACKEND",
        "CI_MAGIC_OUTPUT_DIR",
        "CI_MAGIC_MODEL",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_ENDPOINT",
        "NO_COLOR",
        "FORCE_COLOR",
    ):
        env.pop(name, None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "IPython", "--no-banner", "--HistoryManager.hist_file=:memory:"],
        cwd=str(tmp_path),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(50, 120),
        timeout=TIMEOUT,
        # Ctrl-C and hang-up as in a person's terminal, whatever this runner inherited: a job started
        # in the background by a script (`cmd &`, nohup) ignores SIGINT (and SIGHUP), and so would
        # IPython: the ^C was lost, and closing the terminal could not end it in time.
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)],
    )
    try:
        term = Terminal(child)
        loaded = term.run(["%load_ext ci_magic"])
        assert loaded == "", f"%load_ext ci_magic printed:\n{loaded[-2000:]}"
        yield term
    finally:
        child.close(force=True)


def assert_plain_text(text: str) -> None:
    assert "\x1b" not in text, f"ANSI escape sequences in the output: {text!r}"
    for html in ("<div", "<pre", "<span", "<table", "style=", "</"):
        assert html not in text, f"raw HTML ({html}) in the output:\n{text}"
    for dump in ("text/html", "text/plain", "image/png", "<IPython.core.display", "object at 0x"):
        assert dump not in text, f"a mime bundle or object dump ({dump}) in the output:\n{text}"
    dumps = [line for line in text.splitlines() if re.match(r"\s*\[?\{['\"]", line)]
    assert not dumps, f"JSON or dict dumps in the output: {dumps}"


def test_quickstart_cell_reads_as_plain_text(terminal: Terminal, tmp_path: Path) -> None:
    text = terminal.run(QUICKSTART)
    assert_plain_text(text)
    lines = text.splitlines()
    assert 'df["square"] = df["n"] ** 2' in lines, f"the first call's code, line by line:\n{text}"
    assert "plt.show()" in lines
    assert "saved 100 rows to /mnt/data/squares.csv" in lines, "the second call's log"
    assert any(re.fullmatch(r"4\s+5\s+25", line) for line in lines), "df.head() as printed in the sandbox"
    assert (
        "I built a table of the numbers 1..100 and their squares, plotted the squares, and saved the "
        "table." in lines
    ), "the answer"
    assert "- Rows: 100 (n from 1 to 100)" in lines
    status = [line for line in lines if line.startswith("ci: ")]
    assert len(status) == 1, f"one status line left on screen (the live one is redrawn in place): {status}"
    summary = (
        r"ci: done in \d+\.\d s · 2 calls · [\d,]+ tokens \([\d,]+ in, [\d,]+ out\)"
        r" · ~\$\d+\.\d+ incl\. \$\d+\.\d+ container"
        r" · first code \d+\.\d s · model \d+\.\d s · code \d+\.\d s"
    )
    assert re.fullmatch(summary, status[0]), status[0]


def test_images_and_files_are_reported_by_their_saved_path(terminal: Terminal, tmp_path: Path) -> None:
    text = terminal.run(QUICKSTART)
    shown_paths = re.findall(r"(ci_outputs/\S+\.(?:png|csv))", text)
    pngs = [p for p in shown_paths if p.endswith(".png")]
    assert pngs, f"the chart is reported by the path it was saved to:\n{text}"
    assert "ci_outputs/squares.csv" in shown_paths, text
    for relative in shown_paths:
        assert (tmp_path / relative).is_file(), f"{relative} is printed but not on disk"
    assert (tmp_path / pngs[0]).read_bytes().startswith(b"\x89PNG")


def test_ctrl_c_while_streaming_returns_to_the_prompt_with_one_line(terminal: Terminal) -> None:
    terminal.type_cell(QUICKSTART)
    terminal.child.expect_exact("import pandas as pd", timeout=TIMEOUT)  # the code is streaming in
    terminal.child.sendintr()
    after = output_of(terminal.expect_prompt(timeout=15), QUICKSTART)
    assert_plain_text(after)
    assert "Traceback" not in after and "KeyboardInterrupt" not in after, after
    lines = after.splitlines()
    said = [line for line in lines if re.search(r"\bInterrupted\b", line)]
    assert len(said) == 1, f"the interruption is explained once:\n{after}"
    assert lines[-1] == said[0], f"the explanation is the last line printed, not wrapped:\n{after}"
    status = [line for line in lines if line.startswith("ci: ")]
    short = r"ci: interrupted after \d+\.\d s"
    assert status == [] or (status == [lines[-2]] and re.fullmatch(short, status[0])), (
        f"at most a short status line before it:\n{after}"
    )
    answer = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.run(["6 * 7"]))  # IPython colours its Out prompt
    assert re.fullmatch(r"Out\[\d+\]: 42", answer), f"the shell is usable again: {answer!r}"
