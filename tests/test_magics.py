"""The magics as a user types them: help, options, configuration, and where results go."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets import TraitError

from ci_magic.interpreter import CodeInterpreter
from ci_magic.magics import split_options


@pytest.fixture
def shell(monkeypatch, openai_server, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    monkeypatch.delenv("CI_MAGIC_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    InteractiveShell.clear_instance()
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ci_magic")
    yield ip
    ip.run_line_magic("unload_ext", "ci_magic")
    InteractiveShell.clear_instance()


def interpreter(ip) -> CodeInterpreter:
    return ip.magics_manager.registry["CIMagics"].interpreter


def test_help_is_real_argparse_help(shell) -> None:
    doc = shell.find_cell_magic("ci").__doc__
    for option in ("--model", "--new", "--insert", "-o NAME", "--quiet", "-v A,B"):
        assert option in doc
    assert "%ci [--model MODEL] [--new] [--insert]" in doc
    assert "--as FILENAME" in shell.find_line_magic("ci_push").__doc__
    assert "--all" in shell.find_line_magic("ci_pull").__doc__


def test_config_and_environment_set_the_same_traits(shell, monkeypatch) -> None:
    shell.run_line_magic("config", 'CodeInterpreter.model = "gpt-5"')
    shell.run_line_magic("config", "CodeInterpreter.expires_after_minutes = 5")
    ci = interpreter(shell)
    assert (ci.model, ci.expires_after_minutes, ci.backend) == ("gpt-5", 5, "openai")
    monkeypatch.setenv("CI_MAGIC_MODEL", "from-env")
    monkeypatch.setenv("CI_MAGIC_MEMORY_LIMIT", "4g")
    monkeypatch.setenv("CI_MAGIC_EXTRA_HEADERS", "x-model=gpt-5-mini,x-team=data")
    fresh = CodeInterpreter()
    assert fresh.model == "from-env" and fresh.memory_limit == "4g"
    assert fresh.extra_headers == {"x-model": "gpt-5-mini", "x-team": "data"}
    with pytest.raises(TraitError, match="between 1 and 1440"):
        ci.expires_after_minutes = 0


def test_line_prompts_are_prose_not_shell_words() -> None:
    assert split_options("--new -o r what's the mean of df? -- it's \"odd\"") == (
        "--new -o r",
        "what's the mean of df? -- it's \"odd\"",
    )
    assert split_options("-v a,b plot a vs b") == ("-v a,b", "plot a vs b")
    assert split_options("plot --weird flags-in-prose") == ("", "plot --weird flags-in-prose")


def test_a_cell_binds_ci_and_o_name_and_inserts_its_code(shell, capsys) -> None:
    shell.run_cell_magic(
        "ci", "-o squares --insert", "Load the numbers 1..100, plot their squares and save squares.csv"
    )
    result = shell.user_ns["_ci"]
    assert shell.user_ns["squares"] is result and result.ok and len(result.calls) == 2
    assert shell.rl_next_input == result.code, "--insert puts the code that ran into the next cell"
    printed = capsys.readouterr().out
    assert 'df["square"] = df["n"] ** 2' in printed and "<div" not in printed, "plain text outside Jupyter"


def test_status_checks_the_container_now_and_never_fails_on_a_dead_one(shell, capsys, openai_server) -> None:
    shell.run_line_magic("config", "CodeInterpreter.max_retries = 0")
    shell.run_line_magic("ci", "What is in /mnt/data?")
    container_id = shell.user_ns["_ci"].container_id
    openai_server.expire(container_id)
    capsys.readouterr()
    shell.run_line_magic("ci_status", "")
    expired = capsys.readouterr().out
    assert "expired: the next cell starts a new container" in expired and "\nfiles " not in expired
    openai_server.fail_next("/v1/containers", 500)
    shell.run_line_magic("ci_status", "")
    assert "unknown, the check failed: OpenAI answered 500" in capsys.readouterr().out
    shell.run_line_magic("ci", "And now?")
    assert shell.user_ns["_ci"].ok and shell.user_ns["_ci"].container_id != container_id


def test_a_bad_output_name_is_refused_before_anything_runs(shell, openai_server) -> None:
    with pytest.raises(UsageError, match="identifier"):
        shell.run_cell_magic("ci", "-o 2bad", "Hello")
    assert openai_server.requests_to("/v1/responses") == []


def test_status_before_and_after_the_first_cell_and_reset(shell, capsys, openai_server) -> None:
    shell.run_line_magic("ci_status", "")
    before = capsys.readouterr().out
    assert "openai" in before and "not created yet" in before
    shell.run_line_magic("ci", "What is in /mnt/data?")
    shell.run_line_magic("ci_status", "")
    after = capsys.readouterr().out
    assert "cntr_" in after and "running" in after and "tokens" in after
    container_id = shell.user_ns["_ci"].container_id
    shell.run_line_magic("ci_reset", "")
    assert "fresh conversation" in capsys.readouterr().out
    assert [r.path for r in openai_server.requests if r.method == "DELETE"] == [
        f"/v1/containers/{container_id}"
    ]
    shell.run_line_magic("ci", "What is in /mnt/data now?")
    assert shell.user_ns["_ci"].container_id != container_id
    last = openai_server.requests_to("/v1/responses", "POST")[-1].json
    assert last.get("previous_response_id") is None, "the conversation starts afresh"


def test_extra_headers_reach_every_model_request(shell, openai_server) -> None:
    shell.run_line_magic("config", 'CodeInterpreter.extra_headers = {"x-model": "gpt-5-mini"}')
    shell.run_line_magic("ci", "What is in /mnt/data?")
    requests = openai_server.requests_to("/v1/responses", "POST")
    requests += openai_server.requests_to("/v1/containers")
    assert requests and all(r.headers.get("x-model") == "gpt-5-mini" for r in requests)


def test_azure_variables_make_an_azure_client(monkeypatch) -> None:
    import openai

    from ci_magic.backends.openai_backend import make_client

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example-resource.openai.azure.com/")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key")
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-04-01-preview")
    versioned = make_client(max_retries=1, timeout=5, headers={})
    assert isinstance(versioned, openai.AsyncAzureOpenAI)
    monkeypatch.delenv("OPENAI_API_VERSION")
    v1 = make_client(max_retries=1, timeout=5, headers={})
    assert str(v1.base_url) == "https://example-resource.openai.azure.com/openai/v1/"
    assert v1.api_key == "azure-key"
