"""Red-team payloads for class 8 of issue 9 (secrets in the notebook), not in the original review.

A model server behind basic auth is commonly configured as ``http://user:password@host/v1``
(LiteLLM proxies, nginx in front of llama.cpp). The password is as secret as ``model_api_key``:
it must be used, never shown, in any output the saved notebook keeps. ``xfail(strict=True)``
until the hole is closed.
"""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

import nbformat
import pytest

from tests.notebook_support import kernel_env, local_env, run_cells

pytestmark = pytest.mark.slow


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_password_in_the_model_url_is_never_shown_or_saved(tmp_path: Path) -> None:
    password = f"canary-pw-{secrets.token_hex(12)}"
    # Nothing listens there: the turn fails, and the failure names the server.
    url = f"http://alice:{password}@127.0.0.1:{closed_port()}/v1"
    env = local_env(CI_MAGIC_MODEL_BASE_URL=url, CI_MAGIC_MODEL="some-model", CI_MAGIC_MODEL_API_KEY=None)
    gateway_token = f"canary-gw-{secrets.token_hex(12)}"
    cells = [
        "%load_ext ci_magic",
        # A gateway reached with a token in its query string, as Jupyter prints its own URLs.
        f'%config CodeInterpreter.gateway_url = "http://gw.example:8888/?token={gateway_token}"',
        "%config CodeInterpreter",
        "%config CodeInterpreter.model_base_url",
        "%config CodeInterpreter.gateway_url",
        "%%ci\nSum the numbers 1..10",
        "%ci_status",
    ]
    with kernel_env(**env):
        run_cells(cells, tmp_path, timeout=120, save_as="analysis.ipynb")
    saved = (tmp_path / "analysis.ipynb").read_text()
    cells_out = nbformat.reads(saved, as_version=4).cells
    shown = [
        i
        for i, cell in enumerate(cells_out)
        if password in json.dumps(cell.get("outputs", []))
        or gateway_token in json.dumps(cell.get("outputs", []))
    ]
    assert not shown, f"a URL's password or token is in the saved outputs of cell(s) {shown}"
    # Masked, not hidden: the user still sees which servers are configured.
    settings = json.dumps(cells_out[2].get("outputs", [])) + json.dumps(cells_out[3].get("outputs", []))
    assert "127.0.0.1" in settings and "gw.example:8888" in settings, settings[:2000]
