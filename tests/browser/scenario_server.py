"""The scripted model the browser test talks to: the quickstart, plus a turn made of hostile content.

A prompt mentioning ``UNTRUSTED_MARKER`` gets ``hostile_turn()``: code that writes an HTML page and
an SVG that try to set ``window.__pwned`` in whatever page shows them (directly, through ``top``,
and through ``onload``/``onerror`` handlers), a CSV whose cells are the parser-differential payloads
of ``tests/security/output_payloads.py``, a file whose name is markup, logs that print a script
tag, and an answer whose Markdown carries the same payloads plus a ``javascript:`` link. Every
other prompt gets the project's ``quickstart`` model.

    python -m tests.browser.scenario_server --event-delay 0.03     # prints READY <base_url>
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from tests.security.output_payloads import MARKDOWN_PAYLOADS
from tests.servers.openai_server import OpenAIServer, serve_until_stopped
from tests.servers.responses_stream import prompt_text
from tests.servers.scripted import Call, Scripted, Text, Turn, quickstart

__all__ = ["HOSTILE_FILE_NAME", "PAYLOAD_FILES", "UNTRUSTED_MARKER", "browser_model", "hostile_turn", "main"]

UNTRUSTED_MARKER = "untrusted page"
HOSTILE_FILE_NAME = "<img src=x onerror='window.__pwned=150'>.txt"
PAYLOAD_FILES = ("evil.html", "evil.svg", "payload-cells.csv", HOSTILE_FILE_NAME)

# Each payload sets a different value, so a failure says which one ran.
_HOSTILE_CODE = (
    '''\
page = """<!doctype html><html><body><h1>Report</h1>
<script>window.__pwned = 1; try { top.__pwned = 1; } catch (e) {}</script>
<img src="x" onerror="try { top.__pwned = 2; } catch (e) {}">
</body></html>"""
with open("/mnt/data/evil.html", "w") as f:
    f.write(page)

svg = """<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"
  onload="try { top.__pwned = 3; } catch (e) {}"><rect width="120" height="40" fill="#c33"/>
<script>try { top.__pwned = 4; } catch (e) {}</script></svg>"""
with open("/mnt/data/evil.svg", "w") as f:
    f.write(svg)

print("<script>window.__pwned = 5</script> wrote evil.html and evil.svg")
'''
    + f"""
import csv
with open("/mnt/data/payload-cells.csv", "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["payload", "<b onmouseover='window.__pwned=151'>note</b>"])
    rows.writerows({sorted(MARKDOWN_PAYLOADS.items())!r})
with open({"/mnt/data/" + HOSTILE_FILE_NAME!r}, "w") as f:
    f.write("a file whose name is markup")
"""
)

_HOSTILE_ANSWER = (
    "Here is the page. <script>window.__pwned = 6</script>\n\n"
    '<svg onload="window.__pwned = 7"><rect width="10" height="10"/></svg>\n\n'
    '<img src="x" onerror="window.__pwned = 8">\n\n'
    "[a helpful link](javascript:window.__pwned=9)\n\n"
    "Files: [evil.html](sandbox:/mnt/data/evil.html) and [evil.svg](sandbox:/mnt/data/evil.svg)\n\n"
    # The parser differentials of tests/security/output_payloads.py, as the model was steered to write them.
    + "\n\n".join(MARKDOWN_PAYLOADS.values())
)


def hostile_turn() -> Turn:
    return [Call(_HOSTILE_CODE), Text(_HOSTILE_ANSWER)]


def browser_model(request: dict[str, Any]) -> Turn:
    if UNTRUSTED_MARKER in prompt_text(request).lower():
        return hostile_turn()
    return quickstart(request)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.browser.scenario_server",
        description="The browser test's scripted model server (until SIGTERM).",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between streamed events")
    args = parser.parse_args(argv)
    serve_until_stopped(OpenAIServer(Scripted(browser_model), port=args.port, event_delay=args.event_delay))


if __name__ == "__main__":
    main(sys.argv[1:])
