"""Issue 9, class 3 (decoding): a small file the sandbox wrote never expands into the user's memory.

The attacker is the code in the sandbox (typed into ``%%ci_exec`` here; a prompt-injected model
writes the same). It plants files that are tiny on disk, so every download cap lets them through,
but that decode into gigabytes: Parquet row groups and Feather record batches of zeros (dictionary,
run-length and zstd encoding squeeze 8 MB into a few hundred bytes), a .npy header promising
billions of values, an .npz whose member inflates 1000-fold. The user then does what users do:
``%ci_pull`` them. Each pull must be refused from the file's own metadata, before decoding, in one
paragraph that names the setting to raise; the kernel reports its own peak memory, so the cost to
the user's machine is measured where it would fall. The same attack runs on the local sandbox and
through the OpenAI-compatible test server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.notebook_support import kernel_env, local_env, openai_env, output_text, run_cells

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_PEAK_GROWTH = 160 * 1024**2  # a pull's own bookkeeping, not the gigabytes the files claim
BOMBS = ("totals.parquet", "events.feather", "grid.npy", "parts.npz")

PLANT = """%%ci_exec
import os, zipfile
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

zeros = pa.table({"amount": np.zeros(4_000_000, dtype=np.int64)})  # 32 MB in memory
with pq.ParquetWriter("totals.parquet", zeros.schema, compression="zstd", use_dictionary=False) as writer:
    for _ in range(40):  # 160 million rows: 1.3 GB decoded
        writer.write_table(zeros)
options = pa.ipc.IpcWriteOptions(compression="zstd")
with pa.ipc.new_file("events.feather", zeros.schema, options=options) as writer:
    for batch in zeros.to_batches() * 40:
        writer.write_batch(batch)
header = {"descr": "<f8", "fortran_order": False, "shape": (50_000, 50_000)}
with open("grid.npy", "wb") as f:  # a header promising 20 GB, and no data
    np.lib.format.write_array_header_1_0(f, header)
with zipfile.ZipFile("parts.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    with archive.open("x.npy", "w", force_zip64=True) as member:  # 1.25 GB of zeros, 6 MB zipped
        np.lib.format.write_array_header_1_0(member, dict(header, shape=(80 * 2**21,)))
        for _ in range(80):
            member.write(bytes(2**24))
print("planted", {name: os.path.getsize(name) for name in sorted(os.listdir(".")) if "." in name})
"""

PEAK_BEFORE = "import resource\nci_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
PULLS = [f"%ci_pull {name}" for name in BOMBS]
PEAK_GROWTH = (
    "import json, resource\n"
    "growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ci_peak_before\n"
    "bound = sorted(n for n in ('totals', 'events', 'grid', 'parts') if n in globals())\n"
    "print('REPORT', json.dumps({'peak_growth': growth, 'bound': bound}))"
)


def assert_bombs_refused(notebook, tmp_path: Path) -> None:
    planted = output_text(notebook.cells[1])
    sizes = json.loads(re.search(r"planted (\{.*\})", planted).group(1).replace("'", '"'))
    assert set(BOMBS) <= set(sizes) and max(sizes[name] for name in BOMBS) < 8 * 1024**2, planted
    for index, name in enumerate(BOMBS, start=3):
        refusal = output_text(notebook.cells[index])
        # One paragraph: what the file would cost, where it was kept, and the setting that takes it.
        assert f"{name} is " in refusal and "once decoded" in refusal, refusal
        assert "%config CodeInterpreter.pull_memory_cap = " in refusal, refusal
        assert "Traceback" not in refusal and 'File "' not in refusal, refusal
        assert (tmp_path / "ci_outputs" / name).stat().st_size == sizes[name], "kept, for reading in part"
    outcome = json.loads(re.search(r"REPORT (\{.*\})", output_text(notebook.cells[-1])).group(1))
    print(f"kernel peak RSS growth while pulling the bombs: {outcome['peak_growth'] / 2**20:.1f} MiB")
    assert outcome["peak_growth"] < MAX_PEAK_GROWTH, outcome
    assert outcome["bound"] == [], "nothing was bound to a variable"


def test_bombs_planted_in_the_local_sandbox_are_refused_on_pull(tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", PLANT, PEAK_BEFORE, *PULLS, PEAK_GROWTH]
    with kernel_env(**local_env()):
        notebook = run_cells(cells, tmp_path, timeout=300)
    assert_bombs_refused(notebook, tmp_path)


def test_bombs_planted_through_the_openai_backend_are_refused_on_pull(openai_server, tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", PLANT, PEAK_BEFORE, *PULLS, PEAK_GROWTH]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path, timeout=300)
    assert_bombs_refused(notebook, tmp_path)
