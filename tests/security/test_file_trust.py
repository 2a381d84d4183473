"""Issue 9, class 3 (transport): the notebook never trusts a file the sandbox wrote.

The attacker is the code in the sandbox (here typed into ``%%ci_exec``; a prompt-injected model
writes the same). It plants what a careless host would read: links to the host's files and
devices, a FIFO that blocks a reader for ever, and sparse files that are free to make in the
sandbox but cost gigabytes to whoever reads them. Each attack runs in a real notebook kernel
(nbclient), on the local sandbox and through the OpenAI-compatible test server; the kernel
reports its own peak memory, so the cost to the user's machine is measured where it would fall.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest

from tests.notebook_support import errors_of, kernel_env, openai_env, output_text, run_cells
from tests.notebook_support import local_env as notebook_local_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3
SPARSE_BYTES = 3 * GIB // 2  # two of these: 3 GiB to read and write, no disk or memory to make
DEFAULT_CAP = 256 * 1024**2
# What a turn may cost the kernel's memory: chunked copies, not the files.
MAX_PEAK_GROWTH = 96 * 1024**2

SPARSE_ATTACK = f"""%%ci_exec
import os
for name in ("model_weights.bin", "archive.bin"):
    with open(name, "wb") as f:
        f.truncate({SPARSE_BYTES})
print("planted", [(n, os.stat(n).st_size, os.stat(n).st_blocks * 512) for n in sorted(os.listdir("."))])
"""

PEAK_BEFORE = "import resource\nci_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
PEAK_GROWTH = (
    "import json, os, resource\n"
    "growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ci_peak_before\n"
    "saved = {os.path.relpath(os.path.join(d, n), 'ci_outputs'): os.path.getsize(os.path.join(d, n))\n"
    "         for d, _, names in os.walk('ci_outputs') for n in names}\n"
    "print('REPORT', json.dumps({'peak_growth': growth, 'saved': saved}))"
)


def local_env() -> dict[str, str | None]:
    # Two 1.5 GiB sparse files count 3 GiB against the disk limit (2 GiB by default).
    return notebook_local_env(CI_MAGIC_DOWNLOAD_SIZE_CAP=None, CI_MAGIC_DISK_LIMIT="4g")


def report(cell) -> dict:
    match = re.search(r"REPORT (\{.*\})", output_text(cell))
    assert match, output_text(cell)
    return json.loads(match.group(1))


def assert_sparse_attack_contained(notebook, attack_index: int, *, size_reported: bool = True) -> None:
    attack = notebook.cells[attack_index]
    text = output_text(attack)
    assert "planted" in text and str(SPARSE_BYTES) in text, f"the sandbox could not plant the files: {text}"
    outcome = report(notebook.cells[attack_index + 1])
    print(f"kernel peak RSS growth during the sparse-file attack: {outcome['peak_growth'] / 2**20:.1f} MiB")
    assert outcome["peak_growth"] < MAX_PEAK_GROWTH, outcome
    assert sum(outcome["saved"].values()) <= DEFAULT_CAP, outcome
    assert not any(name.endswith(".part") or ".part" in name for name in outcome["saved"]), outcome
    # The user is told, in one line each, which setting would take the files.
    assert text.count("download_size_cap") >= 2, text
    # Refused on the size the container reported, before a byte was read (else cut while streaming).
    refused_early = set(re.findall(r"Not saved: (\S+) is 1\.5 GB, over the", text))
    assert len(refused_early) == (2 if size_reported else 0), text


def test_sparse_files_cost_the_local_notebook_neither_memory_nor_disk(tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        "%%ci_exec\nprint('ready')",
        PEAK_BEFORE,
        SPARSE_ATTACK,
        PEAK_GROWTH,
        "%ci_pull model_weights.bin",
    ]
    with kernel_env(**local_env()):
        notebook = run_cells(cells, tmp_path, timeout=300)
    assert not errors_of(notebook.cells[1]), output_text(notebook.cells[1])
    assert_sparse_attack_contained(notebook, 3)
    pull = output_text(notebook.cells[5])
    # %ci_pull refuses in one paragraph naming the override; nothing is written.
    assert "download_size_cap" in pull and "1.5 GB" in pull, pull
    assert not (tmp_path / "ci_outputs" / "model_weights.bin").exists()


def test_sparse_files_cost_the_openai_notebook_neither_memory_nor_disk(openai_server, tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", "%%ci_exec\nprint('ready')", PEAK_BEFORE, SPARSE_ATTACK, PEAK_GROWTH]
    with kernel_env(**openai_env(openai_server.url, CI_MAGIC_DOWNLOAD_SIZE_CAP=None)):
        notebook = run_cells(cells, tmp_path, timeout=300)
    assert_sparse_attack_contained(notebook, 3)


def test_a_server_that_hides_file_sizes_is_cut_off_at_the_cap(openai_server, tmp_path: Path) -> None:
    """No Content-Length, no size in the listing: the stream itself stops at the cap."""
    openai_server.hide_file_sizes = True
    cells = ["%load_ext ci_magic", "%%ci_exec\nprint('ready')", PEAK_BEFORE, SPARSE_ATTACK, PEAK_GROWTH]
    with kernel_env(**openai_env(openai_server.url, CI_MAGIC_DOWNLOAD_SIZE_CAP=None)):
        notebook = run_cells(cells, tmp_path, timeout=300)
    assert_sparse_attack_contained(notebook, 3, size_reported=False)
    downloads = [r for r in openai_server.requests if r.path.endswith("/content")]
    assert len(downloads) == 2, "both files were tried, and refused while streaming"


def test_links_fifos_and_devices_planted_in_the_sandbox_are_never_read(tmp_path: Path) -> None:
    canary = secrets.token_hex(16)
    home = tmp_path / "home"
    home.mkdir()
    (home / "credentials.txt").write_text(f"aws_secret_access_key = {canary}\n")
    attack = f"""%%ci_exec
import os
planted = []
for target, name in [("/etc/passwd", "result.csv"), ({str(home / "credentials.txt")!r}, "notes.txt"),
                     ({str(home)!r}, "home"), ("/dev/zero", "zeros.bin"), ("/etc", "out")]:
    os.symlink(target, name)
    planted.append(name)
try:
    os.mkfifo("stream.csv")
    planted.append("stream.csv")
except OSError as error:
    print("no fifo:", error)
print("planted", sorted(planted))
"""
    cells = [
        "%load_ext ci_magic",
        attack,
        "%ci_pull result.csv",
        "%ci_pull zeros.bin",
        "%ci_pull stream.csv",
        "%ci_pull out/passwd",
        "%ci_files",
    ]
    with kernel_env(**local_env()):
        notebook = run_cells(cells, tmp_path, timeout=120)
    text = output_text(notebook.cells[1])
    assert "planted" in text and "result.csv" in text and "zeros.bin" in text, text
    for index in (2, 3, 4, 5):  # refused, promptly (a FIFO read would hang until the timeout)
        assert errors_of(notebook.cells[index]), output_text(notebook.cells[index])
    outputs = tmp_path / "ci_outputs"
    saved = [p for p in outputs.rglob("*")] if outputs.exists() else []
    assert not any(p.is_symlink() for p in saved), saved
    for path in saved:
        if path.is_file():
            content = path.read_bytes()
            assert canary.encode() not in content and b"root:" not in content, path
    listing = output_text(notebook.cells[6])
    assert "result.csv" not in listing and "zeros.bin" not in listing, listing


FLOOD = """%%ci_exec
import os
for number in range(6):
    with open(f"export_{number}.bin", "wb") as f:
        f.write(os.urandom(4 * 2**20))
print("planted", len(os.listdir(".")))
"""


@pytest.mark.parametrize("backend", ["local", "openai"])
def test_a_flood_of_files_stops_at_the_turn_budget(backend: str, openai_server, tmp_path: Path) -> None:
    """Six 4 MB files against a 10 MB turn budget: two are saved, four skipped, one line each."""
    cells = ["%load_ext ci_magic", "%config CodeInterpreter.download_turn_budget = 10 * 2**20", FLOOD]
    env = (
        local_env() if backend == "local" else openai_env(openai_server.url, CI_MAGIC_DOWNLOAD_SIZE_CAP=None)
    )
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, timeout=180)
    text = output_text(notebook.cells[2])
    assert "planted 6" in text, text
    saved = list((tmp_path / "ci_outputs").glob("export_*.bin"))
    assert len(saved) == 2 and all(p.stat().st_size == 4 * 2**20 for p in saved), saved
    skipped = set(re.findall(r"Not saved: (\S+) would take this turn's downloads past", text))
    assert len(skipped) == 4 and "download_turn_budget" in text, text
    assert not list((tmp_path / "ci_outputs").glob(".*.part"))
