"""The first data cell after ``%load_ext ci_magic`` does not wait for a sandbox, nor for pandas.

Loading the extension with the local backend starts the sandbox's warm pool in the background, and
pooled kernels import numpy, pandas and matplotlib before they are handed out. A user who loads the
extension and reads for a moment gets a container whose ``import pandas`` is already done.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

from tests.notebook_support import kernel_env, local_env, notebook_client, output_text

pytestmark = pytest.mark.slow


# Waits (only) until the background pool has a kernel ready; the story's assertion is the next cell.
POOL_READY = (
    "magics = get_ipython().magics_manager.registry['CIMagics']\n"
    "session = magics.interpreter._session\n"
    "print('ready' if session is not None and session.backend.sandbox.pool_ready() else 'waiting')"
)

FIRST_DATA_CELL = (
    "%%ci_exec\n"
    "import sys, time\n"
    "already = 'pandas' in sys.modules\n"
    "started = time.perf_counter()\n"
    "import pandas as pd\n"
    "print('pre-imported:', already, 'import ms:', round((time.perf_counter() - started) * 1000, 1))"
)


def test_after_load_ext_the_first_data_cell_finds_pandas_imported(tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", POOL_READY, FIRST_DATA_CELL]
    client = notebook_client(cells, tmp_path, timeout=180, allow_errors=False)
    notebook = client.nb
    probe = notebook.cells[1]
    env = local_env()
    with kernel_env(**env), client.setup_kernel():
        client.execute_cell(notebook.cells[0], 0)
        # The user reads for a while; no ci-magic cell runs meanwhile (the probe only looks).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client.execute_cell(probe, 1)
            if "ready" in output_text(probe):
                break
            time.sleep(1.0)
        client.execute_cell(notebook.cells[2], 2)
    assert "ready" in output_text(probe), "the pool never filled after %load_ext"
    text = output_text(notebook.cells[2])
    assert "pre-imported: True" in text, text
    found = re.search(r"import ms: ([0-9.]+)", text)
    assert found is not None, text
    assert float(found.group(1)) < 50
    nbformat.validate(notebook)
