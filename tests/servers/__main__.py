"""``python -m tests.servers``: both test servers, to try %%ci with no key and no network.

Starts the OpenAI-compatible Responses + Containers server (its scripted model really runs the
code) and the scripted Chat Completions model for the local backend, prints the environment
variables that point ci-magic at each, and serves until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Sequence

from tests.servers.chat_server import SCENARIOS, ChatServer
from tests.servers.openai_server import OpenAIServer
from tests.servers.scripted import quickstart


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.servers", description=__doc__.split("\n")[0])
    parser.add_argument("--event-delay", type=float, default=0.02, help="seconds between streamed events")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    responses = OpenAIServer(quickstart, event_delay=args.event_delay).start()
    chat = ChatServer(SCENARIOS["quickstart"], event_delay=args.event_delay).start()
    try:
        print(
            "Test servers are running; Ctrl-C stops them. Set one of these in the shell that starts\n"
            "Jupyter (or in the notebook with %env before %load_ext ci_magic):\n\n"
            "  # the openai backend (Responses API + containers), scripted model\n"
            f"  export OPENAI_API_KEY=test-key OPENAI_BASE_URL={responses.url}\n\n"
            "  # the local backend (a sandbox on this machine), scripted chat model\n"
            f"  export CI_MAGIC_BACKEND=local CI_MAGIC_MODEL_BASE_URL={chat.base_url}\n\n"
            "The scripted models answer the quickstart's prompts, e.g.\n"
            "  %%ci\n  Load the numbers 1..100, plot their squares and save the table as squares.csv",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        chat.close()
        responses.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
