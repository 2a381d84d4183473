"""An OpenAI-compatible HTTP server for tests, demos and benchmarks (standard library only).

It speaks the REST shapes of OpenAI's Containers API, container files, ``/v1/models`` and
``/v1/responses`` (streamed as SSE or not), so the real ``openai`` SDK works against it through
``base_url``. What a response contains comes from a *responder*: ``Replay`` of a genuine
recording, or the ``Scripted`` model whose code really runs in a per-container Python process.

    with OpenAIServer(Scripted([[Call("x = 41"), Text("Set x.")]])) as server:
        client = OpenAI(base_url=server.url, api_key="test")

Knobs for tests: ``advance_clock``, ``expire``, ``fail_next``, ``cut_stream_after``,
``require_model``, ``event_delay``; every request is kept in ``server.requests``.

As a process (prints ``READY <url>`` once listening)::

    python -m tests.servers.openai_server --port 0 --scenario quickstart --event-delay 0.02
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
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, urlsplit

from tests.servers.containers import ApiError, Clock, Container, ContainerStore, new_id, upload_path
from tests.servers.expiry import ChainExpiry
from tests.servers.http_base import QuietHTTPServer
from tests.servers.replay import Replay
from tests.servers.responses_stream import Responder, SSEEvent, TurnContext, dumps
from tests.servers.scripted import Scripted, Turn, quickstart

__all__ = ["DEFAULT_MODELS", "OpenAIServer", "RecordedRequest", "main"]

DEFAULT_MODELS = ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "o4-mini")

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
    "if you're accessing the API from your browser and are prompted for a username and password. You "
    "can obtain an API key from https://platform.openai.com/account/api-keys."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
    "JSON. If you have trouble figuring out how to fix this, please contact us through our help "
    "center at help.openai.com.)"
)
_FAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    429: ("Rate limit reached for requests. Please try again in 1s.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


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


@dataclass
class _Fault:
    path_prefix: str
    status: int
    times: int
    body: Any
    retry_after: float | None

    def matches(self, path: str) -> bool:
        return path.startswith(self.path_prefix) or path.removeprefix("/v1").startswith(self.path_prefix)


@dataclass
class _StoredResponse:
    container_id: str | None
    response: dict[str, Any] | None = None


@dataclass
class _Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)  # name -> filename, type, data


class OpenAIServer:
    """A running OpenAI-compatible server on 127.0.0.1; fresh state per instance."""

    def __init__(
        self,
        responder: Responder | Callable[[dict[str, Any]], Turn] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        models: Sequence[str] | None = None,
        event_delay: float = 0.0,
        exec_timeout: float = 60.0,
    ) -> None:
        self.responder = responder
        self.api_key = api_key
        self.event_delay = event_delay
        self.requests: list[RecordedRequest] = []
        self.clock = Clock()
        self._root = Path(tempfile.mkdtemp(prefix="ci-openai-server-"))
        self.store = ContainerStore(self._root, self.clock, exec_timeout=exec_timeout)
        self._allowed_models: tuple[str, ...] | None = tuple(models) if models else None
        self._faults: list[_Fault] = []
        self._cut_after: int | None = None
        # File downloads without Content-Length (chunked), as a gateway may send them.
        self.hide_file_sizes = False
        self._responses: dict[str, _StoredResponse] = {}
        # Whether a previous_response_id whose container expired is refused (tests/servers/expiry.py).
        self.chain_expiry = ChainExpiry()
        self._lock = threading.Lock()
        self._httpd = QuietHTTPServer((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def responder(self) -> Responder:
        return self._responder

    @responder.setter
    def responder(self, value: Responder | Callable[[dict[str, Any]], Turn] | None) -> None:
        if value is None:
            value = Scripted(quickstart)
        elif not hasattr(value, "events"):
            value = Scripted(value)  # a function of the request JSON that returns a turn
        self._responder: Responder = value  # type: ignore[assignment]

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The ``base_url`` for the SDK, ending in ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIServer:
        # A short poll interval keeps stop() quick: shutdown() waits for the loop's next poll.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="openai-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self.store.close()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- knobs for tests -------------------------------------------------------------------

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock forward, e.g. past a container's idle expiry."""
        self.clock.advance(seconds)

    def expire(self, container_id: str) -> None:
        """Expire a container now: its files are deleted and its Python process is killed."""
        self.store.expire(container_id)

    def container_dir(self, container_id: str) -> Path:
        """The real folder that is the container's ``/mnt/data``."""
        return self.store.get(container_id).folder

    def container(self, container_id: str) -> Container:
        return self.store.get(container_id)

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

    def cut_stream_after(self, n_events: int) -> None:
        """Close the socket of the next streamed response after ``n_events`` events (no completion)."""
        self._cut_after = n_events

    def require_model(self, *models: str) -> None:
        """Only these models exist (404 ``model_not_found`` otherwise); no arguments lifts the rule."""
        self._allowed_models = tuple(models) or None

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        return [
            r
            for r in list(self.requests)
            if (r.path.startswith(path_prefix) or r.path.removeprefix("/v1").startswith(path_prefix))
            and (method is None or r.method == method)
        ]

    # -- dispatch (called from handler threads) -------------------------------------------

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _check_auth(self, headers: dict[str, str]) -> None:
        value = headers.get("authorization", "")
        if not value.startswith("Bearer ") or not value[len("Bearer ") :].strip():
            raise ApiError(401, _NO_KEY)
        key = value[len("Bearer ") :].strip()
        if self.api_key is not None and key != self.api_key:
            shown = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 7 else key
            raise ApiError(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    def _check_model(self, model: Any) -> None:
        if not isinstance(model, str) or not model:
            raise ApiError(
                400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        if self._allowed_models is not None and model not in self._allowed_models:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )

    def _models(self) -> dict[str, Any]:
        models = self._allowed_models or DEFAULT_MODELS
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1754425777, "owned_by": "system"} for m in models
            ],
        }

    def _resolve_container(self, body: dict[str, Any], previous: _StoredResponse | None) -> Container | None:
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise ApiError(400, "Invalid type for 'tools': expected an array.", param="tools")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "code_interpreter":
                continue
            spec = tool.get("container")
            if isinstance(spec, str):
                return self.store.usable(spec)
            if isinstance(spec, dict) and spec.get("type") == "auto":
                # OpenAI reuses the container of the previous response, hence "Container is expired."
                if previous is not None and previous.container_id is not None:
                    return self.store.usable(previous.container_id)
                created = self.store.create(
                    {
                        "name": "auto",
                        "memory_limit": spec.get("memory_limit"),
                        "file_ids": spec.get("file_ids"),
                    }
                )
                return self.store.usable(created.id)
            raise ApiError(
                400,
                f"Missing required parameter: 'tools[{index}].container'.",
                param=f"tools[{index}].container",
                code="missing_required_parameter",
            )
        return None

    def _start_response(self, body: Any) -> tuple[TurnContext, Iterator[SSEEvent]]:
        """Validate, pick the container, and pull the first event (so errors become HTTP errors)."""
        if not isinstance(body, dict):
            raise ApiError(400, _BAD_JSON)
        self._check_model(body.get("model"))
        previous_id = body.get("previous_response_id")
        previous = None
        if previous_id is not None:
            previous = self._responses.get(previous_id)
            if previous is None:
                raise ApiError(
                    400,
                    f"Previous response with id '{previous_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            self.chain_expiry.check(previous, self.store)
        container = self._resolve_container(body, previous)
        ctx = TurnContext(
            request=body,
            response_id=new_id("resp", 50),
            created_at=int(self.clock.now()),
            store=self.store,
            container=container,
        )
        events = self.responder.events(ctx)
        first = next(events)
        self._responses[ctx.response_id] = _StoredResponse(container.id if container else None)
        return ctx, _prepend(first, events)

    def _finish_response(self, ctx: TurnContext, final: dict[str, Any]) -> None:
        self._responses[ctx.response_id].response = final


def _prepend(first: SSEEvent, rest: Iterator[SSEEvent]) -> Iterator[SSEEvent]:
    yield first
    yield from rest


def _with_billing(response: dict[str, Any]) -> dict[str, Any]:
    """Non-streamed bodies carry ``billing`` right after ``background``, as recorded."""
    if "billing" in response:
        return response
    result: dict[str, Any] = {}
    for key, value in response.items():
        result[key] = value
        if key == "background":
            result["billing"] = {"payer": "developer"}
    return result


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern + r"\Z"), name)
    for method, pattern, name in [
        ("GET", r"/v1/models", "list_models"),
        ("POST", r"/v1/containers", "create_container"),
        ("GET", r"/v1/containers", "list_containers"),
        ("GET", r"/v1/containers/(?P<cid>[^/]+)", "get_container"),
        ("DELETE", r"/v1/containers/(?P<cid>[^/]+)", "delete_container"),
        ("POST", r"/v1/containers/(?P<cid>[^/]+)/files", "create_file"),
        ("GET", r"/v1/containers/(?P<cid>[^/]+)/files", "list_files"),
        ("GET", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)", "get_file"),
        ("DELETE", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)", "delete_file"),
        ("GET", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)/content", "file_content"),
        ("POST", r"/v1/responses", "create_response"),
        ("GET", r"/v1/responses/(?P<rid>[^/]+)", "get_response"),
    ]
]


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON; SSE uses chunked encoding
    server_version = "ci-magic-openai-test-server"
    owner: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # the SDK's own logging is enough
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = self._read_body()
        record = RecordedRequest(self.command, url.path, parse_qs(url.query), headers)
        self.record = record
        self.upload: _Upload | None = None  # handler objects live across keep-alive requests
        with self.owner._lock:
            self.owner.requests.append(record)
        try:
            if headers.get("content-type", "").startswith("application/json") and raw:
                try:
                    record.json = json.loads(raw)
                except ValueError:
                    record.json = None
                    if url.path.startswith("/v1/") and self.command == "POST":
                        self.owner._check_auth(headers)
                        raise ApiError(400, _BAD_JSON) from None
            elif headers.get("content-type", "").startswith("multipart/form-data"):
                upload = _parse_multipart(headers["content-type"], raw)
                record.multipart = {
                    "fields": upload.fields,
                    "files": [
                        {"field": name, "filename": f[0], "content_type": f[1], "size": len(f[2])}
                        for name, f in upload.files.items()
                    ],
                }
                self.upload = upload
            fault = self.owner._take_fault(url.path)
            if fault is not None:
                self._send_fault(fault)
                return
            self.owner._check_auth(headers)
            for method, pattern, name in _ROUTES:
                match = pattern.match(url.path)
                if match and method == self.command:
                    getattr(self, "_" + name)(**match.groupdict())
                    return
            raise ApiError(404, f"Invalid URL ({self.command} {url.path})")
        except ApiError as error:
            self._send_json(error.body(), error.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            traceback.print_exc()
            self._send_json(ApiError(500, _FAULT_ERRORS[500][0], type="server_error").body(), 500)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
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

    def _common_headers(self) -> None:
        self.send_header("openai-version", "2020-10-01")
        self.send_header("openai-processing-ms", "1")
        self.send_header("x-request-id", f"req_{secrets.token_hex(16)}")

    def _send_json(self, body: Any, status: int = 200, extra: dict[str, str] | None = None) -> None:
        payload = (body if isinstance(body, str) else dumps(body)).encode()
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self._common_headers()
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_fault(self, fault: _Fault) -> None:
        if fault.body is not None:
            body = fault.body
        else:
            message, kind, code = _FAULT_ERRORS.get(
                fault.status, (f"Injected failure {fault.status}.", "server_error", None)
            )
            body = ApiError(fault.status, message, type=kind, code=code).body()
        extra = {}
        if fault.retry_after is not None:
            extra["retry-after-ms"] = str(int(fault.retry_after * 1000))
            extra["retry-after"] = str(max(1, math.ceil(fault.retry_after)))
        self._send_json(body, fault.status, extra)

    def _send_stream(self, events: Iterator[SSEEvent], on_complete: Callable[[dict[str, Any]], None]) -> None:
        owner = self.owner
        cut, owner._cut_after = owner._cut_after, None
        self.record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self._common_headers()
        self.end_headers()
        sent = 0
        try:
            while True:
                if cut is not None and sent >= cut:
                    self._abort_connection()
                    return
                try:
                    event = next(events)
                except StopIteration:
                    break
                except Exception as exc:  # a responder bug: tell the client in-band, as OpenAI does
                    traceback.print_exc()
                    event = SSEEvent(
                        "error",
                        dumps(
                            {
                                "type": "error",
                                "sequence_number": sent,
                                "code": "server_error",
                                "message": str(exc),
                                "param": None,
                            }
                        ),
                    )
                    self._write_chunk(event.encode())
                    break
                if sent and owner.event_delay:
                    time.sleep(owner.event_delay)
                self._write_chunk(event.encode())
                sent += 1
                if event.type == "response.completed":
                    on_complete(event.json["response"])
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            events.close()  # type: ignore[attr-defined]

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort_connection(self) -> None:
        """Drop the connection mid-body: the client sees an incomplete chunked response."""
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)

    def _query(self, name: str, default: str | None = None) -> str | None:
        values = self.record.query.get(name)
        return values[-1] if values else default

    def _page_args(self) -> dict[str, Any]:
        limit = self._query("limit", "20")
        try:
            limit_value = int(limit or "20")
        except ValueError:
            raise ApiError(
                400, f"Invalid 'limit': expected an integer, got {limit!r}.", param="limit"
            ) from None
        return {"order": self._query("order", "desc"), "after": self._query("after"), "limit": limit_value}

    @staticmethod
    def _list_body(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
        return {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "has_more": has_more,
            "last_id": items[-1]["id"] if items else None,
        }

    # -- routes ----------------------------------------------------------------------------

    def _list_models(self) -> None:
        self._send_json(self.owner._models())

    def _create_container(self) -> None:
        body = self.record.json
        if not isinstance(body, dict):
            raise ApiError(400, _BAD_JSON)
        self._send_json(self.owner.store.create(body).to_json())

    def _list_containers(self) -> None:
        items, has_more = self.owner.store.list(name=self._query("name"), **self._page_args())
        self._send_json(self._list_body([c.to_json() for c in items], has_more))

    def _get_container(self, cid: str) -> None:
        self._send_json(self.owner.store.get(cid).to_json())

    def _delete_container(self, cid: str) -> None:
        self.owner.store.delete(cid)
        self._send_json({"id": cid, "object": "container.deleted", "deleted": True})

    def _create_file(self, cid: str) -> None:
        store = self.owner.store
        container = store.usable(cid)
        upload = self.upload
        if upload is None or "file" not in upload.files:
            file_id = (upload.fields.get("file_id") if upload else None) or (self.record.json or {}).get(
                "file_id"
            )
            if file_id:
                raise ApiError(404, f"No such File object: {file_id}", param="file_id")
            raise ApiError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        filename, _content_type, data = upload.files["file"]
        self._send_json(store.add_file(container, upload_path(filename or "upload"), data).to_json())

    def _list_files(self, cid: str) -> None:
        store = self.owner.store
        container = store.usable(cid)
        items, has_more = store.list_files(container, **self._page_args())
        self._send_json(self._list_body([f.to_json() for f in items], has_more))

    def _get_file(self, cid: str, fid: str) -> None:
        store = self.owner.store
        self._send_json(store.get_file(store.usable(cid), fid).to_json())

    def _delete_file(self, cid: str, fid: str) -> None:
        store = self.owner.store
        store.delete_file(store.usable(cid), fid)
        self._send_json({"id": fid, "object": "container.file.deleted", "deleted": True})

    def _file_content(self, cid: str, fid: str) -> None:
        store = self.owner.store
        stored, handle, size, content_type = store.open_file(store.usable(cid), fid)
        name = PurePosixPath(stored.relative).name
        # OpenAI sends a generic ASCII name plus the real one in RFC 5987 form (dotnet recording).
        disposition = (
            f"attachment; filename=\"file{PurePosixPath(name).suffix}\"; filename*=UTF-8''{quote(name)}"
        )
        with handle:
            self._send_file(handle, size, content_type, {"Content-Disposition": disposition})

    def _send_file(self, handle: BinaryIO, size: int, content_type: str, extra: dict[str, str]) -> None:
        """Stream a file in chunks; without Content-Length (chunked) when the owner hides file sizes."""
        chunked = self.owner.hide_file_sizes
        self.record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self._common_headers()
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            while block := handle.read(1 << 20):
                if chunked:
                    self._write_chunk(block)
                else:
                    self.wfile.write(block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading (e.g. at its size cap)

    def _create_response(self) -> None:
        body = self.record.json
        ctx, events = self.owner._start_response(body)
        finish = lambda final: self.owner._finish_response(ctx, final)  # noqa: E731
        if body.get("stream"):
            self._send_stream(events, finish)
            return
        final = None
        for event in events:
            if event.type == "response.completed":
                final = _with_billing(event.json["response"])
        if final is None:
            raise ApiError(500, "The response ended without completing.", type="server_error")
        finish(final)
        self._send_json(final)

    def _get_response(self, rid: str) -> None:
        stored = self.owner._responses.get(rid)
        if stored is None or stored.response is None:
            raise ApiError(404, f"Response with id '{rid}' not found.")
        self._send_json(_with_billing(stored.response))


def _parse_multipart(content_type: str, body: bytes) -> _Upload:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    upload = _Upload()
    if not message.is_multipart():
        raise ApiError(400, "Could not parse the multipart form body.")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            upload.fields[name] = data.decode("utf-8", errors="replace")
        else:
            upload.files[name] = (filename, part.get_content_type(), data)
    return upload


# -- command line --------------------------------------------------------------------------------


def _scenario(name: str) -> Responder:
    if name == "quickstart":
        return Scripted(quickstart)
    if name.startswith("replay:"):
        return Replay(name[len("replay:") :])
    raise SystemExit(f"unknown scenario {name!r}: use 'quickstart' or 'replay:<recording file>'")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.servers.openai_server",
        description="Run the OpenAI-compatible test server until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--scenario", default="quickstart", help="quickstart | replay:<recording file>")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--exec-timeout", type=float, default=60.0, help="seconds a code call may run")
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any Bearer key)")
    parser.add_argument("--model", action="append", default=None, help="allowed model (repeatable)")
    args = parser.parse_args(argv)
    server = OpenAIServer(
        _scenario(args.scenario),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        models=args.model,
        event_delay=args.event_delay,
        exec_timeout=args.exec_timeout,
    )
    serve_until_stopped(server)


def serve_until_stopped(server: OpenAIServer) -> None:
    """Start ``server``, print ``READY <url>`` for the parent process, serve until SIGTERM or Ctrl-C."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    print(f"READY {server.url}", flush=True)
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
