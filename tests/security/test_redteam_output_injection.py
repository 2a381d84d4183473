"""Red-team payloads for the output path (classes 1 and 10 of issue 9), not in the original review.

1. A sandbox ``display_data`` is capped nowhere: ``text/plain`` and ``application/json`` pass
   ``safe_bundle`` whole, so the 20 KB cap on a call's logs is sidestepped by displaying the same
   bytes, and tens of megabytes land in the user's kernel, the page and the saved notebook.
2. ``outgoing_bundle`` is documented as the last pass that keeps "a mistake anywhere upstream"
   from putting a script on the page. Its allow-list keeps an ``<iframe srcdoc>`` that has no
   ``sandbox`` attribute at all (``tag_attribute_values`` only constrains the attribute when it is
   present), and a srcdoc frame without ``sandbox`` runs its scripts in the notebook's origin; a
   ``data:`` link with a leading space passes the ``data:`` check as well.

3. The terminal path (IPython in a terminal prints ``text/plain``) strips 7-bit escape sequences
   but not the 8-bit C1 controls U+0080..U+009F: ``\u009b`` is CSI and ``\u009d`` is OSC for
   terminals that honour C1 in UTF-8 (xterm does), so sandbox output can still clear the screen,
   retitle the window or set the clipboard (OSC 52).

Each is ``xfail(strict=True)`` until the hole is closed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from ci_magic.backends.local.isolation import detect_isolation, probe_python
from ci_magic.errors import SandboxError
from ci_magic.render.safe_html import outgoing_bundle, safe_bundle
from tests.notebook_support import kernel_env, local_env, run_cells

REPO = Path(__file__).resolve().parents[2]
CAP_BYTES = 1_000_000  # far above any cap the renderer keeps (logs: 20 KB head and tail)


@pytest.mark.slow
def test_a_huge_display_from_the_sandbox_is_capped_like_its_logs(tmp_path: Path) -> None:
    env = local_env(CI_MAGIC_OUTPUT_DIR=None)
    flood = (
        "%%ci_exec\n"
        "from IPython.display import display\n"
        "display({'text/plain': 'P' * 8_000_000, 'application/json': {'k': 'J' * 8_000_000}}, raw=True)\n"
    )
    with kernel_env(**env):
        run_cells(["%load_ext ci_magic", flood], tmp_path, timeout=120, save_as="flood.ipynb")
    saved = tmp_path / "flood.ipynb"
    cell = nbformat.read(saved, as_version=4).cells[1]
    sizes = {
        mime: len(value if isinstance(value, str) else repr(value))
        for output in cell.get("outputs", [])
        for mime, value in output.get("data", {}).items()
    }
    assert max(sizes.values()) < CAP_BYTES, f"sandbox display outputs kept whole: {sizes}"
    assert saved.stat().st_size < 4 * CAP_BYTES


def test_every_mime_type_of_one_sandbox_display_has_a_budget() -> None:
    # What display(..., raw=True) in the sandbox can send: each type far over any cap.
    png_header = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    flood = {
        "text/plain": "P" * 5_000_000,
        "application/json": {"rows": ["J" * 1000] * 5000},
        "text/html": "<table><tr><td>" + "<b>x</b>" * 200_000 + "</td></tr></table>",
        "image/png": base64.b64encode(png_header + b"\0" * 5_000_000).decode("ascii"),
    }
    shown = safe_bundle(flood)
    sizes = {mime: len(v if isinstance(v, str) else json.dumps(v)) for mime, v in shown.items()}
    assert sum(sizes.values()) < CAP_BYTES, f"one display kept {sizes}"
    plain = str(shown["text/plain"])
    assert "JSON not shown" in plain and "image not shown" in plain and "characters not shown" in plain, plain


@pytest.mark.parametrize(
    "fragment",
    [
        # No sandbox attribute: the frame's document is same-origin and its script runs.
        '<iframe srcdoc="&lt;script&gt;parent.document.title=1&lt;/script&gt;"></iframe>',
        '<iframe sandbox="allow-scripts allow-same-origin" srcdoc="&lt;script&gt;1&lt;/script&gt;"></iframe>',
        '<iframe title="a > b" srcdoc="&lt;script&gt;1&lt;/script&gt;"></iframe>',
        '<a href=" data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">open</a>',
        '<a href="&#x01;DaTa&#x09;:text/html,&lt;script&gt;1&lt;/script&gt;">open</a>',
        '<a href="&#32;javascript&#58;parent.alert(1)">open</a>',
    ],
)
def test_the_last_pass_before_the_notebook_drops_live_frames_and_data_links(fragment: str) -> None:
    cleaned = str(outgoing_bundle({"text/html": fragment})["text/html"])
    if "<iframe" in cleaned:
        assert 'sandbox=""' in cleaned, f"a frame without sandbox reached the page: {cleaned}"
    assert "data:text/html" not in cleaned, f"a data: document link reached the page: {cleaned}"
    assert "href" not in cleaned, f"a link with a live scheme reached the page: {cleaned}"


TERMINAL_SESSION = """
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "ci_magic")
shell.run_line_magic("config", "CodeInterpreter.pool_size = 0")
shell.run_cell_magic("ci_exec", "", CODE)
shell.run_line_magic("unload_ext", "ci_magic")
"""
# What the sandbox prints: clear the screen, retitle the window, put a command on the clipboard.
# Then show a file name in reversed order (bidi override: "gnp.exe" reads as "exe.png").
C1_PAYLOAD = (
    "print('before' + chr(0x9b) + '2J' + chr(0x9d) + '52;c;cm0gLXJmIH4K' + chr(0x9c) + 'after'"
    " + chr(0x202e) + 'gnp.exe' + chr(0x2066) + chr(0x200f))"
)


def test_sandbox_output_reaches_a_terminal_without_c1_control_sequences(tmp_path: Path) -> None:
    try:
        detect_isolation("auto", probe_python(sys.executable))
    except SandboxError as err:
        pytest.skip(f"no namespace isolation on this machine: {err}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "CI_MAGIC_BACKEND": "local",
        "CI_MAGIC_OUTPUT_DIR": str(tmp_path / "outputs"),
        "PYTHONPATH": str(REPO),
    }
    session = f"CODE = {C1_PAYLOAD!r}\n" + TERMINAL_SESSION
    done = subprocess.run(
        [sys.executable, "-c", session], env=env, cwd=tmp_path, capture_output=True, timeout=120, check=False
    )
    shown = done.stdout.decode("utf-8", errors="replace")
    assert "before" in shown and "after" in shown, f"the call did not run: {done.stderr[-2000:]!r}"
    controls = sorted(
        {
            f"U+{ord(c):04X}"
            for c in re.findall("[\u0080-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]", shown)
        }
    )
    assert not controls, f"C1 or bidi control characters from the sandbox reached the terminal: {controls}"
