"""Issue 9, class 8: secrets in the notebook.

The user keeps a model key and a gateway header in the environment, as the README says, and then
does what the README also says: ``%config CodeInterpreter`` to see the settings, ``%ci_status``,
a prompt, a ``%%ci_exec`` cell, a typo in a setting. Sandbox code that wants the secrets prints
what it can see. The saved notebook is then searched for the secrets: they must be used (the model
server got them) and never shown.
"""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

import nbformat
import pytest

from tests.notebook_support import kernel_env, local_env, output_text, run_cells
from tests.servers.chat_server import quickstart

pytestmark = pytest.mark.slow


def test_keys_and_headers_are_used_but_never_shown_or_saved(chat_server, tmp_path: Path) -> None:
    api_key = f"sk-canary-{secrets.token_hex(12)}"
    header_token = f"canary-header-{secrets.token_hex(12)}"
    typo_secret = f"canary-typo-{secrets.token_hex(12)}"
    gateway_token = f"canary-gateway-{secrets.token_hex(12)}"  # set, unused here: still never shown
    server = chat_server(quickstart, api_key=api_key)
    env = local_env(
        CI_MAGIC_MODEL_BASE_URL=server.base_url,
        CI_MAGIC_MODEL=None,
        CI_MAGIC_MODEL_API_KEY=api_key,
        CI_MAGIC_EXTRA_HEADERS=json.dumps({"X-Gateway-Token": header_token, "x-model": "m"}),
        CI_MAGIC_GATEWAY_TOKEN=gateway_token,
    )
    cells = [
        "%load_ext ci_magic",
        "%config CodeInterpreter",
        "%config CodeInterpreter.model_api_key",
        "%config CodeInterpreter.extra_headers",
        f'%config CodeInterpreter.model_api_key = ["{typo_secret}"]',
        "%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv",
        # The attacker's code looks for the secrets wherever the sandbox lets it.
        "%%ci_exec\nimport os, glob\nprint(dict(os.environ))\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(path, open(path, 'rb').read())\n    except OSError:\n        pass",
        "%ci_status",
        "_ci",
        "%config CodeInterpreter",
    ]
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, timeout=180, save_as="analysis.ipynb")
    saved = (tmp_path / "analysis.ipynb").read_text()
    for secret in (api_key, header_token, gateway_token):
        assert secret not in saved, f"a secret from the environment is in the saved notebook: {secret[:12]}"
    outputs = json.dumps([cell.get("outputs", []) for cell in nbformat.reads(saved, as_version=4).cells])
    assert typo_secret not in outputs, "a mistyped secret was echoed in an error"

    listing = output_text(notebook.cells[1])
    assert "model_api_key" in listing and "Current: '<secret>'" in listing, listing
    assert "X-Gateway-Token" in listing, "header names stay visible; only their values are masked"
    assert "<secret>" in output_text(notebook.cells[2])
    assert "'X-Gateway-Token': '<secret>'" in output_text(notebook.cells[3])
    assert "secret" in output_text(notebook.cells[4]), output_text(notebook.cells[4])
    assert "squares.csv" in output_text(notebook.cells[5]), "the turn ran with the key"
    chat = server.chat_requests
    assert chat and all(r.headers.get("authorization") == f"Bearer {api_key}" for r in chat)
    assert all(r.headers.get("x-gateway-token") == header_token for r in chat)


def test_credentials_in_the_model_server_url_are_never_shown(tmp_path: Path) -> None:
    # The user's model server sits behind basic auth and a query key; it is not running right now.
    password = f"canary-pass-{secrets.token_hex(8)}"
    query_key = f"canary-query-{secrets.token_hex(8)}"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://analyst:{password}@127.0.0.1:{port}/v1?api-key={query_key}"
    env = local_env(CI_MAGIC_MODEL_BASE_URL=base_url, CI_MAGIC_MODEL=None)
    cells = ["%load_ext ci_magic", "%ci what is 2 + 2", "%config CodeInterpreter.model = 'm'", "%ci 2 + 2"]
    with kernel_env(**env):
        notebook = run_cells(cells, tmp_path, timeout=120, save_as="analysis.ipynb")
    saved = (tmp_path / "analysis.ipynb").read_text()
    for cell in notebook.cells[1], notebook.cells[3]:
        shown = output_text(cell)
        assert f"127.0.0.1:{port}/v1" in shown, f"the error names the server it could not reach: {shown}"
    assert password not in saved and query_key not in saved, "a credential from the URL was shown"
