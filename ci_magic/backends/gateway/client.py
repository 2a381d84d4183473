"""Talking to Jupyter Kernel Gateway / Enterprise Gateway: kernels over REST, messages over WebSocket.

:class:`GatewayClient` wraps the REST API (``/api/kernels``, ``/api/kernelspecs``) with httpx and
maps every failure to one of our errors at this boundary. :class:`KernelChannels` is one kernel's
``/api/kernels/{id}/channels`` WebSocket (tornado's client, already a dependency through ipykernel)
speaking the Jupyter messaging protocol, with messages built and dated by jupyter_client's
:class:`~jupyter_client.session.Session`.

The gateway token travels only in the ``Authorization`` header. It is never formatted into a
message, a repr or a log line, and URLs are shown without their query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from jupyter_client.session import Session as MessageSession
from jupyter_client.session import json_default
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from ci_magic.errors import BackendError, ConfigurationError
from ci_magic.redact import display_url

__all__ = [
    "ChannelClosed",
    "GatewayClient",
    "KernelChannels",
    "KernelGone",
    "KernelModel",
    "public_url",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one WebSocket message; our own file chunks are far smaller
CONNECT_TIMEOUT = 20.0
RECONNECT_WINDOW = 10.0  # seconds a dropped socket may take to come back (a network blip, a proxy restart)


public_url = display_url  # ``url`` without credentials or a query string, fit for messages


class KernelGone(BackendError):
    """The kernel no longer exists on the gateway (culled, deleted, or the gateway restarted)."""


class ChannelClosed(Exception):
    """The WebSocket closed while a request was waiting for messages (internal, never shown)."""


@dataclass(frozen=True)
class KernelModel:
    """A kernel as the gateway describes it."""

    id: str
    name: str
    execution_state: str
    last_activity: str


def _model(data: Any) -> KernelModel:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise BackendError("The gateway answered with something that is not a kernel description.")
    return KernelModel(
        id=data["id"],
        name=str(data.get("name", "")),
        execution_state=str(data.get("execution_state", "")),
        last_activity=str(data.get("last_activity", "")),
    )


class GatewayClient:
    """The gateway's REST API: start, look up, interrupt and delete kernels; list kernelspecs."""

    def __init__(self, url: str, *, token: str = "", timeout: float = 60.0) -> None:
        if not url:
            raise ConfigurationError(
                "The gateway backend needs the gateway's address: "
                '`%config CodeInterpreter.gateway_url = "http://gateway-host:8888"` '
                "(or the CI_MAGIC_GATEWAY_URL environment variable)."
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"The gateway address {public_url(url)!r} is not an http(s) URL; set gateway_url to "
                "something like http://gateway-host:8888."
            )
        self.base_url = url.rstrip("/")
        self.shown_url = public_url(self.base_url)
        self._token = token
        headers = {"Authorization": f"token {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"GatewayClient({self.shown_url!r})"

    @property
    def ws_base(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path, "", ""))

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self._token}"} if self._token else {}

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as err:
            raise BackendError(
                f"The gateway at {self.shown_url} did not answer in time ({method} {path}). Check that it "
                "is running and not overloaded."
            ) from err
        except httpx.HTTPError as err:
            raise BackendError(
                f"Could not reach the gateway at {self.shown_url} ({type(err).__name__}). Start it, or set "
                'the right address with `%config CodeInterpreter.gateway_url = "http://host:port"`.'
            ) from err
        if response.status_code in (401, 403):
            raise self.refused(response.status_code)
        return response

    def refused(self, status: int) -> ConfigurationError:
        said = "no token" if not self._token else "the configured token"
        return ConfigurationError(
            f"The gateway at {self.shown_url} refused {said} (HTTP {status}). Set the token it was "
            'started with: `%config CodeInterpreter.gateway_token = "..."` or the CI_MAGIC_GATEWAY_TOKEN '
            "environment variable (it is sent as `Authorization: token ...` and never shown)."
        )

    def _failed(self, response: httpx.Response, doing: str) -> BackendError:
        message = ""
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict):
                message = str(body.get("message") or body.get("reason") or "")[:300]
        detail = f": {message}" if message else ""
        return BackendError(
            f"The gateway at {self.shown_url} could not {doing} (HTTP {response.status_code}{detail}).",
            status_code=response.status_code,
        )

    async def default_kernel_name(self) -> str:
        response = await self._request("GET", "/api/kernelspecs")
        if response.status_code != 200:
            raise self._failed(response, "list its kernelspecs")
        body = response.json()
        name = body.get("default") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise BackendError(f"The gateway at {self.shown_url} names no default kernelspec.")
        return name

    async def start_kernel(self, name: str, env: dict[str, str]) -> KernelModel:
        response = await self._request("POST", "/api/kernels", json={"name": name, "env": env})
        if response.status_code == 404 or (response.status_code >= 400 and "No such kernel" in response.text):
            raise ConfigurationError(
                f"The gateway at {self.shown_url} has no kernelspec named {name!r}. Choose one it serves "
                "(GET /api/kernelspecs lists them) with `%config CodeInterpreter.gateway_kernel_name`."
            )
        if response.status_code not in (200, 201):
            raise self._failed(response, f"start a {name!r} kernel")
        return _model(response.json())

    async def get_kernel(self, kernel_id: str) -> KernelModel | None:
        response = await self._request("GET", f"/api/kernels/{kernel_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._failed(response, "look up a kernel")
        return _model(response.json())

    async def interrupt_kernel(self, kernel_id: str) -> None:
        response = await self._request("POST", f"/api/kernels/{kernel_id}/interrupt")
        if response.status_code == 404:
            raise KernelGone(f"The kernel {kernel_id} is gone from the gateway at {self.shown_url}.")
        if response.status_code not in (200, 204):
            raise self._failed(response, "interrupt a kernel")

    async def restart_kernel(self, kernel_id: str) -> None:
        response = await self._request("POST", f"/api/kernels/{kernel_id}/restart")
        if response.status_code == 404:
            raise KernelGone(f"The kernel {kernel_id} is gone from the gateway at {self.shown_url}.")
        if response.status_code != 200:
            raise self._failed(response, "restart a kernel")

    async def delete_kernel(self, kernel_id: str) -> None:
        response = await self._request("DELETE", f"/api/kernels/{kernel_id}")
        if response.status_code not in (200, 204, 404):
            raise self._failed(response, "delete a kernel")

    async def aclose(self) -> None:
        await self._http.aclose()


class KernelChannels:
    """One kernel's WebSocket: send requests, receive each request's messages on its own queue.

    The gateway keeps a kernel's messages while no client is connected and replays them when a
    client with the same session id connects again; :meth:`reconnect` relies on that, so a socket
    cut mid-execution loses nothing that the kernel produced meanwhile.
    """

    def __init__(self, client: GatewayClient, kernel_id: str) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self.session = MessageSession(username="ci-magic")
        self._ws: WebSocketClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queues: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self.reconnects = 0

    @property
    def url(self) -> str:
        return (
            f"{self.client.ws_base}/api/kernels/{self.kernel_id}/channels?session_id={self.session.session}"
        )

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    async def connect(self, *, timeout: float = CONNECT_TIMEOUT) -> None:
        """Open the socket; the gateway answers once the kernel replies, so a new kernel needs longer."""
        request = HTTPRequest(
            self.url,
            headers=self.client.auth_headers(),
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=timeout,
        )
        try:
            ws = await websocket_connect(request, max_message_size=MAX_MESSAGE_BYTES)
        except HTTPClientError as err:
            if err.code in (401, 403):
                raise self.client.refused(err.code) from None
            if err.code == 404:
                raise KernelGone(
                    f"The kernel {self.kernel_id} is gone from the gateway at {self.client.shown_url}."
                ) from None
            if err.code == 599:  # tornado's own: a timeout or a connection that failed
                raise BackendError(
                    f"The kernel's WebSocket on the gateway at {self.client.shown_url} did not open within "
                    f"{timeout:g} s ({str(err)[:200]}); the kernel may have failed to start (see the "
                    "gateway's log)."
                ) from None
            raise BackendError(
                f"The gateway at {self.client.shown_url} refused the kernel's WebSocket (HTTP {err.code})."
            ) from None
        except (OSError, asyncio.TimeoutError) as err:
            raise BackendError(
                f"Could not open the kernel's WebSocket on the gateway at {self.client.shown_url} "
                f"({type(err).__name__})."
            ) from None

        self._ws = ws
        self._reader = asyncio.ensure_future(self._read(ws))

    async def reconnect(self) -> None:
        """Connect again with the same session id, trying for RECONNECT_WINDOW seconds.

        A kernel that is gone (404) or a refused token ends the attempts at once.
        """
        await self._drop()
        self.reconnects += 1
        deadline = time.monotonic() + RECONNECT_WINDOW
        pause = 0.1
        while True:
            try:
                await self.connect()
                return
            except (KernelGone, ConfigurationError):
                raise
            except BackendError:
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        reader, self._reader = self._reader, None
        if ws is not None:
            ws.close()
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _read(self, ws: WebSocketClientConnection) -> None:
        try:
            while True:
                raw = await ws.read_message()
                if raw is None:
                    break
                try:
                    msg = _decode(raw)
                except (ValueError, KeyError, TypeError, struct.error):
                    log.debug("ci-magic: skipped an undecodable gateway message")
                    continue
                if msg["header"].get("msg_type") == "shutdown_reply":
                    # The kernel was shut down (deleted, culled): the gateway keeps the socket open but
                    # silent, so close it; the next request reconnects and learns whether it is gone.
                    ws.close()
                    break
                parent = msg.get("parent_header") or {}
                queue = self._queues.get(parent.get("msg_id", ""))
                if queue is not None:
                    queue.put_nowait(msg)
        finally:
            for queue in self._queues.values():
                queue.put_nowait(None)  # wake every waiter: the socket is closed

    def send(
        self, channel: str, msg_type: str, content: dict[str, Any], metadata: dict[str, Any] | None = None
    ) -> str:
        """Send a request; its replies and outputs arrive through :meth:`next_message`."""
        if self._ws is None:
            raise ChannelClosed
        msg = self.session.msg(msg_type, content, metadata=metadata)
        msg_id: str = msg["header"]["msg_id"]
        self._queues[msg_id] = asyncio.Queue()
        msg["channel"] = channel
        try:
            self._ws.write_message(json.dumps(msg, default=json_default))
        except WebSocketClosedError:
            self._queues.pop(msg_id, None)
            raise ChannelClosed from None
        return msg_id

    async def next_message(self, msg_id: str, timeout: float) -> dict[str, Any] | None:
        """The next message of request ``msg_id``; None on timeout. Raises ChannelClosed."""
        queue = self._queues.get(msg_id)
        if queue is None:
            raise ChannelClosed
        if queue.empty() and not self.connected:
            raise ChannelClosed
        try:
            msg = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if msg is None:
            raise ChannelClosed
        return msg

    def forget(self, msg_id: str) -> None:
        self._queues.pop(msg_id, None)

    async def close(self) -> None:
        await self._drop()
        self._queues.clear()


def _decode(raw: str | bytes) -> dict[str, Any]:
    """A channels message: JSON text, or the binary form (offsets, JSON, then buffers) with buffers."""
    if isinstance(raw, str):
        msg = json.loads(raw)
    else:
        count = struct.unpack("!I", raw[:4])[0]
        offsets = [struct.unpack("!I", raw[4 * (i + 1) : 4 * (i + 2)])[0] for i in range(count)]
        end = offsets[1] if count > 1 else len(raw)
        msg = json.loads(raw[offsets[0] : end].decode("utf-8"))
    if not isinstance(msg, dict) or not isinstance(msg.get("header"), dict):
        raise ValueError("not a Jupyter message")
    msg.setdefault("parent_header", {})
    msg.setdefault("content", {})
    return msg
