"""An OpenAI-compatible HTTP server that serves any ``Backend``: for tests, demos and benchmarks.

It speaks the REST shapes of OpenAI's Containers API, container files, ``/v1/models`` and
``/v1/responses`` (streamed as SSE or not), so the real ``openai`` SDK (or any OpenAI client)
works against it through ``base_url``. Containers, files and code run on a
``ci_magic.backends.base.Backend`` (``containers.py``): by default the local backend, so code
runs in a real sandbox kernel. What a response contains comes from a *responder*: ``Replay`` of
a genuine recording, or the ``Scripted`` model, whose turns are our typed events encoded as the
Responses stream (``responses_stream.ResponseEvents.encode``).

    with OpenAIServer(Scripted([[Call("x = 41"), Text("Set x.")]])) as server:
        client = OpenAI(base_url=server.url, api_key="test")

Knobs for tests: ``advance_clock``, ``expire``, ``fail_next``, ``cut_stream_after``,
``require_model``, ``event_delay``; every request is kept in ``server.requests``.

As a process (prints ``READY <url>`` once listening)::

    python -m tests.servers.openai_server --port 0 --scenario quickstart --event-delay 0.02
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

from ci_magic.backends.base import Backend, ContainerInfo
from tests.servers.containers import (
    DEFAULT_EXEC_TIMEOUT,
    BackendRunner,
    Clock,
    Container,
    ContainerStore,
    local_backend,
    new_id,
    shared_local_backend,
    upload_path,
)
from tests.servers.expiry import ChainExpiry
from tests.servers.http_base import (
    BAD_JSON,
    ApiError,
    Exchange,
    RecordedRequest,
    Route,
    TestServer,
    command_line,
    serve_until_stopped,
    server_options,
)
from tests.servers.replay import Replay
from tests.servers.responses_stream import Responder, SSEEvent, TurnContext, dumps
from tests.servers.scripted import Scripted, Turn, quickstart

__all__ = ["DEFAULT_MODELS", "OpenAIServer", "RecordedRequest", "main", "serve_until_stopped"]

T = TypeVar("T")
DEFAULT_MODELS = ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "o4-mini")

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
    "if you're accessing the API from your browser and are prompted for a username and password. You "
    "can obtain an API key from https://platform.openai.com/account/api-keys."
)


@dataclass
class _StoredResponse:
    container_id: str | None
    response: dict[str, Any] | None = None


class OpenAIServer(TestServer):
    """A running OpenAI-compatible server on 127.0.0.1; fresh state per instance."""

    thread_name = "openai-test-server"
    server_version = "ci-magic-openai-test-server"

    def __init__(
        self,
        responder: Responder | Callable[[dict[str, Any]], Turn] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        models: Sequence[str] | None = None,
        event_delay: float = 0.0,
        exec_timeout: float = DEFAULT_EXEC_TIMEOUT,
        backend: Backend | None = None,
    ) -> None:
        """``backend``: what runs containers, files and code (the server closes it when it stops);
        default: a ``LocalBackend`` (a real sandbox per container), shared by the process's
        servers when ``exec_timeout`` is the default."""
        super().__init__(host=host, port=port, event_delay=event_delay)
        self.responder = responder
        self.api_key = api_key
        self.clock = Clock()
        shared = backend is None and exec_timeout == DEFAULT_EXEC_TIMEOUT
        if shared:
            runner = shared_local_backend()
        elif backend is None:  # its own timeout: its own sandboxes, gone when the server stops
            runner = local_backend(exec_timeout)
        else:
            runner = BackendRunner(backend)
        self._own_runner = not shared
        self.store = ContainerStore(runner, self.clock)
        self._allowed_models: tuple[str, ...] | None = tuple(models) if models else None
        # File downloads without Content-Length (chunked), as a gateway may send them.
        self.hide_file_sizes = False
        self._responses: dict[str, _StoredResponse] = {}
        # Whether a previous_response_id whose container expired is refused (tests/servers/expiry.py).
        self.chain_expiry = ChainExpiry()

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

    def stop(self) -> None:
        super().stop()
        self.store.close()
        if self._own_runner:
            self.store.runner.close()

    # -- knobs for tests -------------------------------------------------------------------

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock forward, e.g. past a container's idle expiry."""
        self.clock.advance(seconds)

    def expire(self, container_id: str) -> None:
        """Expire a container now: its backend container (kernel and files) is deleted."""
        self.store.expire(container_id)

    @property
    def backend(self) -> Backend:
        return self.store.backend

    def backend_container(self, container_id: str) -> ContainerInfo | None:
        """The backend's container behind ``container_id`` (None: never started, or gone)."""
        backend_id = self.store.get(container_id).backend_id
        return None if backend_id is None else self.store.runner.run(self.backend.get_container(backend_id))

    def run_on_backend(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await a backend coroutine on the backend's event loop, e.g. ``backend.list_files(id)``."""
        return self.store.runner.run(coroutine)

    def container(self, container_id: str) -> Container:
        return self.store.get(container_id)

    def require_model(self, *models: str) -> None:
        """Only these models exist (404 ``model_not_found`` otherwise); no arguments lifts the rule."""
        self._allowed_models = tuple(models) or None

    # -- routes (called from handler threads) ----------------------------------------------

    def routes(self) -> list[Route]:
        routes: list[tuple[str, str, Callable[..., None]]] = [
            ("GET", r"/v1/models", self._list_models),
            ("POST", r"/v1/containers", self._create_container),
            ("GET", r"/v1/containers", self._list_containers),
            ("GET", r"/v1/containers/(?P<cid>[^/]+)", self._get_container),
            ("DELETE", r"/v1/containers/(?P<cid>[^/]+)", self._delete_container),
            ("POST", r"/v1/containers/(?P<cid>[^/]+)/files", self._create_file),
            ("GET", r"/v1/containers/(?P<cid>[^/]+)/files", self._list_files),
            ("GET", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)", self._get_file),
            ("DELETE", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)", self._delete_file),
            ("GET", r"/v1/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)/content", self._file_content),
            ("POST", r"/v1/responses", self._create_response),
            ("GET", r"/v1/responses/(?P<rid>[^/]+)", self._get_response),
        ]
        return [(method, re.compile(pattern), function) for method, pattern, function in routes]

    def response_headers(self) -> dict[str, str]:
        return {
            "openai-version": "2020-10-01",
            "openai-processing-ms": "1",
            "x-request-id": f"req_{secrets.token_hex(16)}",
        }

    def check_auth(self, request: RecordedRequest) -> None:
        value = request.headers.get("authorization", "")
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
            raise ApiError(400, BAD_JSON)
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

    def _list_models(self, exchange: Exchange) -> None:
        exchange.send_json(self._models())

    def _create_container(self, exchange: Exchange) -> None:
        body = exchange.record.json
        if not isinstance(body, dict):
            raise ApiError(400, BAD_JSON)
        exchange.send_json(self.store.create(body).to_json())

    def _list_containers(self, exchange: Exchange) -> None:
        items, has_more = self.store.all(name=exchange.query("name"), **_page_args(exchange))
        exchange.send_json(_list_body([c.to_json() for c in items], has_more))

    def _get_container(self, exchange: Exchange, cid: str) -> None:
        exchange.send_json(self.store.get(cid).to_json())

    def _delete_container(self, exchange: Exchange, cid: str) -> None:
        self.store.delete(cid)
        exchange.send_json({"id": cid, "object": "container.deleted", "deleted": True})

    def _create_file(self, exchange: Exchange, cid: str) -> None:
        store = self.store
        container = store.usable(cid)
        upload = exchange.upload
        if upload is None or "file" not in upload.files:
            file_id = (upload.fields.get("file_id") if upload else None) or (exchange.record.json or {}).get(
                "file_id"
            )
            if file_id:
                raise ApiError(404, f"No such File object: {file_id}", param="file_id")
            raise ApiError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        filename, _content_type, data = upload.files["file"]
        exchange.send_json(store.add_file(container, upload_path(filename or "upload"), data).to_json())

    def _list_files(self, exchange: Exchange, cid: str) -> None:
        store = self.store
        container = store.usable(cid)
        items, has_more = store.list_files(container, **_page_args(exchange))
        exchange.send_json(_list_body([f.to_json() for f in items], has_more))

    def _get_file(self, exchange: Exchange, cid: str, fid: str) -> None:
        store = self.store
        exchange.send_json(store.get_file(store.usable(cid), fid).to_json())

    def _delete_file(self, exchange: Exchange, cid: str, fid: str) -> None:
        store = self.store
        store.delete_file(store.usable(cid), fid)
        exchange.send_json({"id": fid, "object": "container.file.deleted", "deleted": True})

    def _file_content(self, exchange: Exchange, cid: str, fid: str) -> None:
        store = self.store
        stored, handle, size, content_type = store.open_file(store.usable(cid), fid)
        name = PurePosixPath(stored.relative).name
        # OpenAI sends a generic ASCII name plus the real one in RFC 5987 form (dotnet recording).
        disposition = (
            f"attachment; filename=\"file{PurePosixPath(name).suffix}\"; filename*=UTF-8''{quote(name)}"
        )
        with handle:
            exchange.send_file(
                handle,
                size,
                content_type,
                {"Content-Disposition": disposition},
                chunked=self.hide_file_sizes,  # no Content-Length, as a gateway may send it
            )

    def _create_response(self, exchange: Exchange) -> None:
        body = exchange.record.json
        ctx, events = self._start_response(body)
        finish = lambda final: self._finish_response(ctx, final)  # noqa: E731
        if body.get("stream"):
            exchange.send_stream(_completing(events, finish), on_error=_stream_error)
            return
        final = None
        for event in events:
            if event.type == "response.completed":
                final = _with_billing(event.json["response"])
        if final is None:
            raise ApiError(500, "The response ended without completing.", type="server_error")
        finish(final)
        exchange.send_json(final)

    def _get_response(self, exchange: Exchange, rid: str) -> None:
        stored = self._responses.get(rid)
        if stored is None or stored.response is None:
            raise ApiError(404, f"Response with id '{rid}' not found.")
        exchange.send_json(_with_billing(stored.response))


def _prepend(first: SSEEvent, rest: Iterator[SSEEvent]) -> Iterator[SSEEvent]:
    yield first
    yield from rest


def _completing(events: Iterator[SSEEvent], finish: Callable[[dict[str, Any]], None]) -> Iterator[bytes]:
    """The events as bytes; the stored response is kept once ``response.completed`` goes out."""
    try:
        for event in events:
            yield event.encode()
            if event.type == "response.completed":
                finish(event.json["response"])
    finally:
        events.close()  # type: ignore[attr-defined]


def _stream_error(exc: Exception, sequence_number: int) -> bytes:
    """A responder bug mid-stream: told to the client in-band, as OpenAI does."""
    error = {"type": "error", "sequence_number": sequence_number, "code": "server_error", "message": str(exc)}
    return SSEEvent("error", dumps({**error, "param": None})).encode()


def _page_args(exchange: Exchange) -> dict[str, Any]:
    limit = exchange.query("limit", "20")
    try:
        limit_value = int(limit or "20")
    except ValueError:
        raise ApiError(400, f"Invalid 'limit': expected an integer, got {limit!r}.", param="limit") from None
    return {"order": exchange.query("order", "desc"), "after": exchange.query("after"), "limit": limit_value}


def _list_body(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "has_more": has_more,
        "last_id": items[-1]["id"] if items else None,
    }


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


# -- command line --------------------------------------------------------------------------------


def _scenario(name: str) -> Responder:
    if name == "quickstart":
        return Scripted(quickstart)
    if name.startswith("replay:"):
        return Replay(name[len("replay:") :])
    raise SystemExit(f"unknown scenario {name!r}: use 'quickstart' or 'replay:<recording file>'")


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_line(
        "python -m tests.servers.openai_server", "Run the OpenAI-compatible test server until interrupted."
    )
    parser.add_argument("--scenario", default="quickstart", help="quickstart | replay:<recording file>")
    parser.add_argument(
        "--exec-timeout", type=float, default=DEFAULT_EXEC_TIMEOUT, help="seconds a code call may run"
    )
    parser.add_argument("--model", action="append", default=None, help="allowed model (repeatable)")
    args = parser.parse_args(argv)
    server = OpenAIServer(
        _scenario(args.scenario), models=args.model, exec_timeout=args.exec_timeout, **server_options(args)
    )
    serve_until_stopped(server)


if __name__ == "__main__":
    main(sys.argv[1:])
