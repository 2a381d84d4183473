"""The HTTP layer both test servers share: routing, bodies, streams, request records and faults.

``TestServer`` runs a threaded HTTP/1.1 server (keep-alive, TCP_NODELAY) on a background thread and
dispatches each request to a route of its subclass (``routes()``: method, path pattern, function
of the ``Exchange`` and the pattern's groups). Every request is recorded in ``server.requests``
with the status it was answered with, so tests count and inspect what a client sent.

The fault design, defined once for both servers:

    server.fail_next("/responses", 429, times=1, retry_after=0.1)  # scripted HTTP errors, then success
    server.cut_stream_after(25)                                    # drop the next stream mid-way
    server.cut_stream_after(3, clean=True)                         # or end its body early but properly
    server.event_delay = 0.1                                       # a slow stream

Errors are answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import json
import math
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "BAD_JSON",
    "ApiError",
    "Exchange",
    "QuietHTTPServer",
    "RecordedRequest",
    "Route",
    "StreamCut",
    "TestServer",
    "Upload",
    "command_line",
    "error_body",
    "serve_until_stopped",
    "server_options",
]

BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
    "JSON. If you have trouble figuring out how to fix this, please contact us through our help "
    "center at help.openai.com.)"
)
# What OpenAI answers for these statuses (message, type, code), used by ``fail_next``.
FAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    429: ("Rate limit reached for requests. Please try again in 1s.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error the server answers with OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


@dataclass
class RecordedRequest:
    """One request as the server saw it; ``status`` is the status code it was answered with."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any = None
    multipart: dict[str, Any] | None = None
    status: int | None = None

    @property
    def body(self) -> Any:
        """The parsed JSON body, or None."""
        return self.json

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.json.get("messages", [])) if isinstance(self.json, dict) else []


@dataclass
class Upload:
    """A parsed multipart form: text fields, and files as (filename, content type, bytes)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamCut:
    """Stop a stream after ``after`` events: drop the connection, or (``clean``) end the body early."""

    after: int
    clean: bool = False


@dataclass
class _Fault:
    path_prefix: str
    status: int
    times: int
    body: Any
    retry_after: float | None

    def matches(self, path: str) -> bool:
        return _under(path, self.path_prefix)


def _under(path: str, prefix: str) -> bool:
    """``/v1/responses`` is under both ``/v1/responses`` and ``/responses``."""
    return path.startswith(prefix) or path.removeprefix("/v1").startswith(prefix)


Route = tuple[str, "re.Pattern[str]", Callable[..., None]]


class QuietHTTPServer(ThreadingHTTPServer):
    """Threaded, non-blocking shutdown; a client that hangs up (a kernel exiting) is not an error."""

    daemon_threads = True
    block_on_close = False

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm meets the
        # client's delayed ACK and every keep-alive request waits ~40 ms.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class TestServer:
    """A server on 127.0.0.1 and a background thread; subclasses give ``routes()``."""

    __test__ = False  # not a pytest test class
    thread_name = "test-server"
    server_version = "ci-magic-test-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, event_delay: float = 0.0) -> None:
        self.event_delay = event_delay
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._cut: StreamCut | None = None
        self._routes = self.routes()
        self._httpd = QuietHTTPServer(
            (host, port), type("Handler", (Exchange,), {"owner": self, "server_version": self.server_version})
        )
        self._thread: threading.Thread | None = None

    # -- what a subclass says ----------------------------------------------------------------------

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def check_auth(self, request: RecordedRequest) -> None:
        """Raise ``ApiError(401, ...)`` for a request without an acceptable key; default: any."""

    def not_found(self, method: str, path: str) -> ApiError:
        return ApiError(404, f"Invalid URL ({method} {path})")

    def response_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_{secrets.token_hex(16)}"}

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The ``base_url`` for the SDK, ending in ``/v1``."""
        host = self._httpd.server_address[0]
        return f"http://{host!s}:{self.port}/v1"

    def start(self) -> Any:
        if self._thread is None:
            # A short poll interval keeps stop() quick: shutdown() waits for the loop's next poll.
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(0.02,), name=self.thread_name, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults and records ------------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str,
        status: int,
        times: int = 1,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` requests under ``path_prefix`` (e.g. ``/responses``) with an error."""
        with self._lock:
            self._faults.append(_Fault(path_prefix, status, times, body, retry_after))

    def cut_stream_after(self, n_events: int, *, clean: bool = False) -> None:
        """Cut the next streamed answer after ``n_events`` events (no completion event)."""
        self._cut = StreamCut(n_events, clean)

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        return [
            r
            for r in list(self.requests)
            if _under(r.path, path_prefix) and (method is None or r.method == method)
        ]

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _take_cut(self) -> StreamCut | None:
        cut, self._cut = self._cut, None
        return cut


class Exchange(BaseHTTPRequestHandler):
    """One connection's handler: parses and records each request, offers the ways to answer it."""

    protocol_version = "HTTP/1.1"  # keep-alive for JSON; streams use chunked encoding
    owner: TestServer
    record: RecordedRequest
    upload: Upload | None

    def log_message(self, format: str, *args: Any) -> None:  # tests read ``requests`` instead
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- reading -----------------------------------------------------------------------------------

    def query(self, name: str, default: str | None = None) -> str | None:
        values = self.record.query.get(name)
        return values[-1] if values else default

    def _dispatch(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = self._read_body()
        self.record = RecordedRequest(self.command, path, parse_qs(url.query), headers)
        self.upload = None  # handler objects live across keep-alive requests
        with owner._lock:
            owner.requests.append(self.record)
        try:
            self._parse_body(headers.get("content-type", ""), raw)
            fault = owner._take_fault(path)
            if fault is not None:
                self._send_fault(fault)
                return
            owner.check_auth(self.record)
            for method, pattern, route in owner._routes:
                match = pattern.fullmatch(path)
                if match and method == self.command:
                    route(self, **match.groupdict())
                    return
            raise owner.not_found(self.command, path)
        except ApiError as error:
            self.send_api_error(error)
        except ConnectionError:
            self.close_connection = True  # the client went away (it cancelled the turn)
        except Exception:
            traceback.print_exc()
            self.send_json(error_body(FAULT_ERRORS[500][0], "server_error"), 500)

    def _parse_body(self, content_type: str, raw: bytes) -> None:
        if content_type.startswith("multipart/form-data"):
            upload = _parse_multipart(content_type, raw)
            self.record.multipart = {
                "fields": upload.fields,
                "files": [
                    {"field": name, "filename": f[0], "content_type": f[1], "size": len(f[2])}
                    for name, f in upload.files.items()
                ],
            }
            self.upload = upload
        elif raw:
            try:
                self.record.json = json.loads(raw)
            except ValueError:
                if self.command == "POST":
                    self.owner.check_auth(self.record)
                    raise ApiError(400, BAD_JSON) from None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- answering ---------------------------------------------------------------------------------

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        self.record.status = status
        self.send_response(status)
        for name, value in {**headers, **self.owner.response_headers()}.items():
            self.send_header(name, value)
        self.end_headers()

    def send_json(self, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        """A JSON answer; a ``str`` body is sent as it is (a recorded body)."""
        payload = (body if isinstance(body, str) else _dumps(body)).encode()
        self._start(
            status,
            {"Content-Type": "application/json", "Content-Length": str(len(payload)), **(headers or {})},
        )
        self.wfile.write(payload)

    def send_api_error(self, error: ApiError, headers: Mapping[str, str] | None = None) -> None:
        self.send_json(error.body(), error.status, headers)

    def _send_fault(self, fault: _Fault) -> None:
        if fault.body is not None:
            body = fault.body
        else:
            message, kind, code = FAULT_ERRORS.get(
                fault.status, (f"Injected failure {fault.status}.", "server_error", None)
            )
            body = error_body(message, kind, None, code)
        headers = {}
        if fault.retry_after is not None:
            headers["retry-after-ms"] = str(int(fault.retry_after * 1000))
            headers["retry-after"] = str(max(1, math.ceil(fault.retry_after)))
        self.send_json(body, fault.status, headers)

    def send_stream(
        self,
        events: Iterable[bytes],
        *,
        cut: StreamCut | None = None,
        status: int = 200,
        content_type: str = "text/event-stream; charset=utf-8",
        on_error: Callable[[Exception, int], bytes] | None = None,
    ) -> int:
        """Stream events as chunks, ``event_delay`` apart; a cut (given, or the server's next one)
        stops it early. ``on_error`` turns a failing event source into a last, in-band event.
        Returns how many events went out."""
        cut = cut or self.owner._take_cut()
        self._start(
            status,
            {"Content-Type": content_type, "Transfer-Encoding": "chunked", "Cache-Control": "no-cache"},
        )
        iterator: Iterator[bytes] = iter(events)
        sent = 0
        try:
            while True:
                if cut is not None and sent >= cut.after:
                    if cut.clean:
                        self.write_chunk(b"")
                    else:
                        self._abort_connection()
                    return sent
                try:
                    data = next(iterator)
                except StopIteration:
                    break
                except Exception as exc:
                    if on_error is None:
                        raise
                    traceback.print_exc()
                    self.write_chunk(on_error(exc, sent))
                    break
                if sent and self.owner.event_delay:
                    time.sleep(self.owner.event_delay)
                self.write_chunk(data)
                sent += 1
            self.write_chunk(b"")
            return sent
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def send_file(
        self, handle: BinaryIO, size: int, content_type: str, headers: Mapping[str, str], *, chunked: bool
    ) -> None:
        """Stream a file in blocks; without Content-Length (chunked) when ``chunked``."""
        length = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}
        self._start(200, {"Content-Type": content_type, **length, **headers})
        while block := handle.read(1 << 20):
            if chunked:
                self.write_chunk(block)
            else:
                self.wfile.write(block)
        if chunked:
            self.write_chunk(b"")
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a chunked body; ``b""`` ends the body."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort_connection(self) -> None:
        """Drop the connection mid-body: the client sees an incomplete chunked response."""
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _parse_multipart(content_type: str, body: bytes) -> Upload:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    upload = Upload()
    if not message.is_multipart():
        raise ApiError(400, "Could not parse the multipart form body.")
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            upload.fields[name] = data.decode("utf-8", errors="replace")
        else:
            upload.files[name] = (filename, part.get_content_type(), data)
    return upload


def command_line(prog: str, description: str) -> argparse.ArgumentParser:
    """A server's command line with the options every test server takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="accept only this bearer key (default: any)")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between streamed events")
    return parser


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"host": args.host, "port": args.port, "api_key": args.api_key, "event_delay": args.event_delay}


def serve_until_stopped(server: TestServer) -> None:
    """Start ``server``, print ``READY <url>`` for the parent process, serve until SIGTERM or Ctrl-C."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    print(f"READY {server.url}", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            stopped.wait()
    finally:
        server.stop()
