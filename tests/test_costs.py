"""A user sees what each cell cost and where its time went, and the session's totals in %ci_status."""

from __future__ import annotations

import re
from pathlib import Path

from ci_magic.costs import DEFAULT_PRICES, merged_prices, token_cost
from ci_magic.events import Usage
from tests.notebook_support import kernel_env, openai_env, output_text, run_cells
from tests.servers.scripted import Call, Text


def status_line(cell) -> str:
    return next(line for line in output_text(cell).splitlines() if line.startswith("ci: done in"))


def test_each_cell_shows_tokens_cost_and_times_and_the_status_shows_totals(
    openai_server, tmp_path: Path
) -> None:
    openai_server.responder = [
        [Call("import time\ntime.sleep(1.0)\nprint(6 * 7)"), Text("It is 42.")],
        [Call("print(7 * 6)"), Text("Still 42.")],
    ]
    cells = [
        "%load_ext ci_magic",
        "%%ci\nWhat is 6 times 7?",
        "print(_ci.usage.input_tokens, _ci.usage.output_tokens, repr(_ci.cost.total))",
        # A price of $1,000 per million tokens makes the cost the token count in thousandths.
        '%config CodeInterpreter.prices = {"gpt-5-mini": {"input": 1000, "output": 2000}}',
        "%%ci\nAnd 7 times 6?",
        "print(_ci.usage.input_tokens, _ci.usage.output_tokens, repr(_ci.cost.tokens), _ci.cost.container)",
        "%ci_status",
    ]
    with kernel_env(**openai_env(openai_server.url)):
        notebook = run_cells(cells, tmp_path)

    first = status_line(notebook.cells[1])
    tokens_in, tokens_out, cost = output_text(notebook.cells[2]).split()
    price = DEFAULT_PRICES["gpt-5-mini"]
    tokens = (int(tokens_in) * price["input"] + int(tokens_out) * price["output"]) / 1e6
    container = 5 * DEFAULT_PRICES["container"]["1g"]  # a new 1 GB container: the 5-minute minimum
    assert float(cost) == round(tokens + container, 8)
    assert f"{int(tokens_in) + int(tokens_out):,} tokens" in first
    assert re.search(r"~\$0\.0\d+ incl\. \$0\.0075 container", first), first
    code_time = float(re.search(r"· code (\d+\.\d) s", first).group(1))
    assert code_time >= 0.5, "the call slept 1 s (measured from the stream: give or take its buffering)"
    assert re.search(r"first code \d+\.\d s · model \d+\.\d s", first), first

    second = status_line(notebook.cells[4])
    tokens_in, tokens_out, cost, container_fee = output_text(notebook.cells[5]).split()
    assert float(cost) == round((int(tokens_in) * 1000 + int(tokens_out) * 2000) / 1e6, 8)
    assert float(container_fee) == 0.0, "the same container, still inside its first 5 minutes"
    assert "container" not in second and f"~${float(cost):.2f}" in second

    status = output_text(notebook.cells[6])
    assert re.search(r"cost\s*~\$\d+\.\d+: \$[\d.]+ tokens, \$0\.0075 container", status), status
    assert re.search(r"model \d+\.\d s, code \d+\.\d s", status)


def test_prices_follow_dated_model_names_and_say_when_unknown() -> None:
    prices = merged_prices({"my-local-model": {"input": 0, "output": 0}})
    usage = Usage(1_000_000, 100_000, 1_100_000)
    assert token_cost("gpt-5-mini-2025-08-07", usage, prices) == 0.25 + 0.2
    assert token_cost("gpt-5", usage, prices) == 1.25 + 1.0
    assert token_cost("my-local-model", usage, prices) == 0.0
    assert token_cost("qwen2.5-coder", usage, prices) is None
    assert token_cost("qwen2.5-coder", Usage(), prices) == 0.0


def test_an_unpriced_local_model_is_not_named_in_the_status_line() -> None:
    # llama.cpp serves a model by its file path: the status line never shows the user's folders.
    from ci_magic.costs import TurnCost
    from ci_magic.render.live import _cost_and_times
    from ci_magic.result import Result

    result = Result(prompt="p")
    result.cost = TurnCost(model="/home/ana/.cache/models/smollm2.gguf", tokens=None)
    (shown,) = _cost_and_times(result)
    assert "/home/ana" not in shown and "CodeInterpreter.prices" in shown
