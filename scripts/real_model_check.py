"""Run a notebook of ``%%ci`` cells against a real llama-server, and say what happened.

Started by ``scripts/real_model_check.sh`` (which builds the server and fetches a model), or by hand
against any running llama-server::

    python scripts/real_model_check.py --server http://127.0.0.1:8080 --out /tmp/ci-magic-check

A small proxy in front of the server reads the ``timings`` llama-server puts in each answer
(``prompt_ms`` + ``predicted_ms``: the server's own time), so the report can say how long each turn
took in all, how long the server worked, and what ci-magic added on top (streaming, decoding,
rendering, the sandbox running the code).
"""

from __future__ import annotations

import argparse
import html
import http.client
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]

CELLS = [
    "%load_ext ci_magic",
    # A tiny model on a shared CPU: few steps per turn (max_tokens comes from the environment).
    "%config CodeInterpreter.max_steps = 3",
    # SmolLM2-135M calls the tool when the prompt spells the call out (Qwen2.5's template is Hermes).
    "%%ci\nReply with exactly this and nothing else:\n<tool_call>\n"
    '{"name": "python", "arguments": {"code": "print(sum(i * i for i in range(1, 11)))"}}\n</tool_call>\n',
    # Asked in plain words, the same model writes its code as a ```python block: it runs as a call.
    "%%ci --new\nUse the python tool to compute the sum of the squares of 1..10 and print it",
    "%ci_status",
]


@dataclass
class Exchange:
    started: float
    ended: float = 0.0
    path: str = ""
    status: int = 0
    server_ms: float = 0.0  # prompt_ms + predicted_ms from llama-server's timings
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    estimated: bool = False  # no timings: ci-magic stopped reading (a call written as text)


@dataclass
class Proxy:
    """Forwards to llama-server unchanged and notes each answer's ``timings``."""

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.forward("GET")

            def do_POST(self) -> None:
                self.forward("POST")

            def forward(self, method: str) -> None:
                exchange = Exchange(time.monotonic(), path=self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                target = urlsplit(proxy.upstream)
                upstream = http.client.HTTPConnection(
                    target.hostname or "127.0.0.1", target.port, timeout=600
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(method, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                exchange.status = answer.status
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                tail = b""
                try:
                    while chunk := answer.read1(65536):
                        tail = (tail + chunk)[-8192:]
                        self._note_timings(exchange, tail)
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # ci-magic stopped reading (a call written as text)
                finally:
                    upstream.close()
                    exchange.ended = time.monotonic()
                    # No timings: ci-magic stopped reading early (a call written as text), and the
                    # server's own time for that answer is unknown.
                    exchange.estimated = not exchange.server_ms
                    with proxy.lock:
                        proxy.exchanges.append(exchange)

            @staticmethod
            def _note_timings(exchange: Exchange, tail: bytes) -> None:
                for line in tail.decode("utf-8", "replace").splitlines():
                    if '"timings"' not in line:
                        continue
                    try:
                        data = json.loads(line.removeprefix("data: "))
                    except json.JSONDecodeError:
                        continue
                    timings = data.get("timings") or {}
                    exchange.server_ms = float(timings.get("prompt_ms", 0)) + float(
                        timings.get("predicted_ms", 0)
                    )
                    exchange.prompt_tokens = int(timings.get("prompt_n", 0))
                    exchange.predicted_tokens = int(timings.get("predicted_n", 0))

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"


def _text(output: dict[str, Any]) -> str:
    data = output.get("data") or {}
    raw = output.get("text") or data.get("text/plain") or ""
    if "text/html" in data:
        raw = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", data["text/html"], flags=re.S)
        raw = html.unescape(re.sub(r"<[^>]+>", " ", raw))
    if output.get("output_type") == "error":
        raw = f"{output.get('ename')}: {output.get('evalue')}"
    return re.sub(r"\s+", " ", str(raw)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="llama-server's root URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed notebook")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds one cell may take")
    parser.add_argument("--read-seconds", type=float, default=15.0, help="pause after %%load_ext")
    args = parser.parse_args(argv)

    import os

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError
    from nbformat.v4 import new_code_cell, new_notebook

    proxy = Proxy(args.server.rstrip("/"))
    base_url = proxy.start() + "/v1"
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        CI_MAGIC_BACKEND="local",
        CI_MAGIC_MODEL_BASE_URL=base_url,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "CI_MAGIC_MODEL"):
        os.environ.pop(name, None)

    notebook = new_notebook(cells=[new_code_cell(source) for source in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(
        notebook,
        timeout=args.cell_timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(args.out)}},
    )
    windows: list[tuple[float, float]] = []
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            started = time.monotonic()
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                cell.outputs.append({"output_type": "stream", "name": "stderr", "text": "(cell timed out)"})
                if client.km is not None:
                    client.km.interrupt_kernel()
            windows.append((started, time.monotonic()))
            if index == 0:
                time.sleep(args.read_seconds)  # the user reads a moment: the sandbox pool warms meanwhile
    nbformat.write(notebook, args.out / "real_model_check.ipynb")

    print(f"notebook: {args.out / 'real_model_check.ipynb'} (model server {args.server}, via {base_url})")
    overheads: list[float] = []
    for cell, (started, ended) in zip(notebook.cells, windows, strict=True):
        wall = ended - started
        mine = [
            e
            for e in proxy.exchanges
            if started <= e.started <= ended and e.path.endswith("/chat/completions")
        ]
        server_s = sum(e.server_ms for e in mine) / 1000
        print(f"\n>>> {cell.source.splitlines()[0]}  ({cell.source.count(chr(10))} more lines)")
        for output in cell.outputs:
            text = _text(output)
            if text:
                print(f"    {text[:400]}")
        if any(e.estimated for e in mine):
            cut = sum(e.estimated for e in mine)
            print(
                f"    -- {len(mine)} model request(s), {cut} stopped early by ci-magic after a call written "
                f"as text (the server reports no time for those); cell {wall:.2f} s"
            )
        elif mine:
            added = wall - server_s
            overheads.append(added / len(mine))
            statuses = ",".join(str(e.status) for e in mine)
            tokens = sum(e.predicted_tokens for e in mine)
            print(
                f"    -- {len(mine)} model request(s) (HTTP {statuses}), {tokens} tokens generated; "
                f"cell {wall:.2f} s, server {server_s:.2f} s, ci-magic added {added:.2f} s "
                f"({added / len(mine):.2f} s per request, sandbox code runs included; "
                f"{added / server_s:.1%} of the server's time)"
            )
        else:
            print(f"    -- no model request; cell {wall:.2f} s")
    if overheads:
        median = sorted(overheads)[len(overheads) // 2]
        print(f"\nci-magic time per model request beyond the server's own: median {median:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
