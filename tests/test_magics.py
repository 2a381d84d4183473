"""The magics as a user types them: help, options, configuration, and where results go."""

from __future__ import annotations

import re

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets import TraitError

from ci_magic.errors import BackendError, ConfigurationError, VariableError
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


OUT_OF_RANGE = [
    ("context_tokens", 511),
    ("download_size_cap", 0),
    ("download_turn_budget", 0),
    ("download_concurrency", -1),
    ("max_retries", -1),
    ("pool_size", -1),
    ("max_steps", -1),
    ("max_tokens", -1),
    ("max_updates_per_second", 0.4),
    ("max_updates_per_second", 61.0),
]
AT_THE_EDGE = [
    ("context_tokens", 512),
    ("download_size_cap", 1),
    ("pool_size", 0),
    ("max_updates_per_second", 0.5),
    ("max_updates_per_second", 60.0),
]


def test_counts_and_rates_out_of_range_are_refused_whether_configured_or_from_the_environment(
    shell, monkeypatch, caplog
) -> None:
    ci = interpreter(shell)
    for name, value in OUT_OF_RANGE:
        before = getattr(ci, name)
        caplog.clear()
        shell.run_line_magic("config", f"CodeInterpreter.{name} = {value!r}")  # %config logs the refusal
        assert f"'{name}' trait" in caplog.text, caplog.text
        assert getattr(ci, name) == before, f"a refused {name} is not kept"
        with pytest.raises(TraitError, match=name):
            setattr(ci, name, value)
    for name, value in AT_THE_EDGE:
        shell.run_line_magic("config", f"CodeInterpreter.{name} = {value!r}")
        assert getattr(ci, name) == value
    for variable, value, setting in [
        ("CI_MAGIC_CONTEXT_TOKENS", "100", "context_tokens"),
        ("CI_MAGIC_EXPIRES_MINUTES", "0", "expires_after_minutes"),
        ("CI_MAGIC_DOWNLOAD_TURN_BUDGET", "0", "download_turn_budget"),
    ]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigurationError) as refused:  # one paragraph naming the variable
            getattr(CodeInterpreter(), setting)
        assert variable in str(refused.value) and f"CodeInterpreter.{setting} = " in str(refused.value)
        monkeypatch.delenv(variable)


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


# -- rough edges a new user hit ---------------------------------------------------------------------


def test_a_line_prompt_ending_in_a_question_mark_reaches_the_model(shell, openai_server) -> None:
    outcome = shell.run_cell("%ci what files do we have?")
    assert outcome.success, outcome.error_in_exec
    [request] = openai_server.requests_to("/v1/responses", "POST")
    assert str(request.json["input"]).endswith("what files do we have?")
    assignment = shell.run_cell("answer = %ci -q and how big are they?")
    assert assignment.success and shell.user_ns["answer"] is None  # %ci binds _ci, returns nothing
    assert str(openai_server.requests_to("/v1/responses", "POST")[-1].json["input"]).endswith(
        "how big are they?"
    )
    help_outcome = shell.run_cell("%ci?")
    assert help_outcome.success and len(openai_server.requests_to("/v1/responses", "POST")) == 2


def test_after_a_401_a_new_key_and_ci_reset_are_enough(shell, openai_server, monkeypatch, capsys) -> None:
    openai_server.api_key = "the-right-key"
    refused = shell.run_cell("%ci hello")
    assert isinstance(refused.error_in_exec, BackendError) and refused.error_in_exec.status_code == 401
    monkeypatch.setenv("OPENAI_API_KEY", "the-right-key")
    shell.run_line_magic("ci_reset", "")
    shell.run_line_magic("ci", "hello again")
    assert shell.user_ns["_ci"].ok


def test_a_backend_changed_with_config_shows_in_status_at_once(shell, capsys) -> None:
    shell.run_line_magic("ci", "What is in /mnt/data?")
    shell.run_line_magic("config", 'CodeInterpreter.backend = "local"')
    capsys.readouterr()
    shell.run_line_magic("ci_status", "")
    shown = capsys.readouterr().out
    assert re.search(r"backend\s+local", shown) and "the next cell starts one on this backend" in shown


def test_reset_counts_turns_from_zero(shell, capsys) -> None:
    shell.run_line_magic("ci", "What is in /mnt/data?")
    shell.run_line_magic("ci_reset", "")
    capsys.readouterr()
    shell.run_line_magic("ci_status", "")
    assert re.search(r"turns\s+0\b", capsys.readouterr().out)


def test_a_bad_environment_value_is_one_paragraph_naming_it(shell, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CI_MAGIC_BACKEND", "bogus")
    shell.run_line_magic("unload_ext", "ci_magic")
    shell.run_line_magic("load_ext", "ci_magic")
    outcome = shell.run_cell("%%ci\nhello")
    assert isinstance(outcome.error_in_exec, ConfigurationError)
    printed = capsys.readouterr().out
    assert "TraitError" not in printed and "Traceback" not in printed
    assert "CI_MAGIC_BACKEND is 'bogus'" in printed and "'openai', 'local'" in printed


def test_a_variable_that_cannot_be_sent_is_a_variable_error_not_configuration(shell, capsys) -> None:
    shell.run_line_magic("config", "CodeInterpreter.upload_size_cap = 10")
    shell.user_ns["notes"] = "far more than ten bytes of notes"
    outcome = shell.run_cell("%%ci -v notes\nSummarize notes")
    assert isinstance(outcome.error_in_exec, VariableError), outcome.error_in_exec
    assert "\nci-magic variable: " in capsys.readouterr().out, "the title says what went wrong"


def test_a_command_in_an_error_is_never_wrapped_mid_command(shell, capsys) -> None:
    command = '%config CodeInterpreter.model_base_url = "http://localhost:11434/v1/with/a/long/path"'
    error = ConfigurationError(f"{'The local backend needs a model server. ' * 3}Point it with {command}.")
    shell.user_ns["error"] = error
    shell.run_cell("raise error")
    assert any(command in line for line in capsys.readouterr().out.splitlines())


def test_the_plain_api_is_a_context_manager_and_speaks_python_in_its_errors(
    openai_server, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    with CodeInterpreter(output_dir=str(tmp_path), expires_after_minutes=60) as ci:
        with pytest.raises(ConfigurationError) as refused:
            ci.run("hello", display=False)
        assert ci._session is not None
    assert ci._session is None, "leaving the block closes the session"
    assert (
        "%config" not in refused.value.message
        and "CodeInterpreter(expires_after_minutes=20)" in refused.value.message
    )
    monkeypatch.delenv("OPENAI_API_KEY")
    with CodeInterpreter(backend="openai") as ci, pytest.raises(ConfigurationError) as no_key:
        ci.run("hello", display=False)
    assert (
        "%config" not in no_key.value.message and 'CodeInterpreter(backend="local")' in no_key.value.message
    )


def test_the_models_opening_sentence_prints_before_its_code(openai_server, monkeypatch, tmp_path) -> None:
    import io

    from ci_magic.render.frontend import TerminalFrontend
    from tests.servers.scripted import Call, Scripted, Text

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    openai_server.responder = Scripted(
        [[Text("First I will add the numbers."), Call("print(41 + 1)"), Text("The answer is 42.")]]
    )
    out = io.StringIO()
    with CodeInterpreter(frontend=TerminalFrontend(out), output_dir=str(tmp_path)) as ci:
        ci.run("What is 41 + 1?")
    printed = out.getvalue()
    assert printed.index("First I will add") < printed.index("print(41 + 1)") < printed.index("answer is 42")
    assert "── output ──\n42" in printed, "printed output has one label on every backend (was 'logs' here)"


def test_one_command_starts_the_test_servers_and_prints_the_environment_to_use(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    servers = subprocess.Popen(
        [sys.executable, "-m", "tests.servers", "--event-delay", "0"],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert servers.stdout is not None
        lines = list(
            iter(servers.stdout.readline, "The scripted models answer the quickstart's prompts, e.g.\n")
        )
        exports = dict(
            pair.split("=", 1)
            for line in lines
            if "export " in line
            for pair in line.split()[1:]
            if "=" in pair
        )
        assert {"OPENAI_API_KEY", "OPENAI_BASE_URL", "CI_MAGIC_BACKEND", "CI_MAGIC_MODEL_BASE_URL"} <= set(
            exports
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CI_MAGIC_", "AZURE_"))}
        env |= {"OPENAI_API_KEY": exports["OPENAI_API_KEY"], "OPENAI_BASE_URL": exports["OPENAI_BASE_URL"]}
        script = (
            "from ci_magic import CodeInterpreter\n"
            "with CodeInterpreter() as ci:\n"
            "    print(ci.run('What is in /mnt/data?', display=False).ok)"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.stdout.strip() == "True", done.stderr[-2000:]
    finally:
        servers.terminate()
        servers.wait(timeout=10)


def test_sdk_failures_become_backend_errors_saying_who_what_and_what_to_do(monkeypatch, tmp_path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    with (
        CodeInterpreter(output_dir=str(tmp_path), max_retries=0) as ci,
        pytest.raises(BackendError) as failed,
    ):
        ci.run("hello", display=False)
    message = failed.value.message
    assert message.startswith(f"Could not reach OpenAI at http://127.0.0.1:{port}/v1/containers")
    assert "while creating a container. Check the network and OPENAI_BASE_URL." in message


def test_ci_files_shows_every_size_and_who_wrote_each_file(shell, capsys) -> None:
    shell.run_cell_magic(
        "ci", "-q", "Load the numbers 1..100, plot their squares and save the table as squares.csv"
    )
    shell.run_cell_magic("ci_exec", "-q", "open('/mnt/data/mine.txt', 'w').write('hello')")
    capsys.readouterr()
    shell.run_line_magic("ci_files", "")
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["mine.txt"][:3] == ["5", "B", "notebook"], "written by %%ci_exec: the user's file"
    assert rows["squares.csv"][2] == "model" and rows["squares.csv"][1] == "B"
    assert all(cells[0] != "?" for cells in rows.values()), rows
