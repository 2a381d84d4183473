"""The openai backend: OpenAI's (or Azure OpenAI's) Responses API with the code_interpreter tool.

Containers and container files map one to one onto the Containers API. A turn is one streamed
``responses.create`` whose SSE events ``ResponsesTranslator`` turns into our typed events.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai

from ci_magic import events
from ci_magic.backends.base import (
    DOWNLOAD_CHUNK_BYTES,
    ContainerFile,
    ContainerInfo,
    MemoryLimit,
    TurnRequest,
    check_reported_size,
    discard_download,
    open_download_target,
    stream_past_cap,
)
from ci_magic.backends.sdk_errors import OPENAI, sdk_error
from ci_magic.backends.sse import aiter_events
from ci_magic.errors import BackendError, ConfigurationError, StreamError

__all__ = ["NO_KEY_MESSAGE", "OpenAIBackend", "ResponsesTranslator", "make_client"]

NO_KEY_MESSAGE = (
    "No OpenAI API key is configured, so the openai backend cannot run. To use OpenAI, set "
    "OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible gateway) in the environment the kernel "
    "starts from; for Azure OpenAI set AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and, for the "
    "versioned API, OPENAI_API_VERSION. To keep everything on this machine instead, use the local "
    'backend: %config CodeInterpreter.backend = "local" and point it at any OpenAI-compatible chat '
    'server with %config CodeInterpreter.model_base_url = "http://localhost:11434/v1" (or '
    "CI_MAGIC_MODEL_BASE_URL), then restart with %ci_reset."
)

MAX_LISTED_FILES = 20_000  # as the local sandbox's scan: a listing is bounded like every download


def make_client(*, max_retries: int, timeout: float, headers: dict[str, str]) -> openai.AsyncOpenAI:
    """An async client from the standard OpenAI / Azure OpenAI environment variables."""
    azure_endpoint = os.environ.get("AZURE_OPENAI_ENDPOINT")
    azure_key = os.environ.get("AZURE_OPENAI_API_KEY")
    common: dict[str, Any] = {"max_retries": max_retries, "timeout": timeout, "default_headers": headers}
    if os.environ.get("OPENAI_API_KEY"):
        return openai.AsyncOpenAI(**common)
    if azure_endpoint and azure_key:
        version = os.environ.get("OPENAI_API_VERSION")
        if version:
            return openai.AsyncAzureOpenAI(
                azure_endpoint=azure_endpoint, api_key=azure_key, api_version=version, **common
            )
        # Azure's v1 routes take the plain OpenAI client.
        return openai.AsyncOpenAI(
            base_url=f"{azure_endpoint.rstrip('/')}/openai/v1/", api_key=azure_key, **common
        )
    raise ConfigurationError(NO_KEY_MESSAGE)


def _container_info(obj: Any) -> ContainerInfo:
    expires = getattr(obj, "expires_after", None)
    return ContainerInfo(
        id=obj.id,
        name=getattr(obj, "name", "") or "",
        status=getattr(obj, "status", "") or "",
        created_at=int(getattr(obj, "created_at", 0) or 0),
        last_active_at=getattr(obj, "last_active_at", None),
        expires_after_minutes=getattr(expires, "minutes", None) if expires else None,
        memory_limit=getattr(obj, "memory_limit", None),
    )


def _container_file(obj: Any, container_id: str) -> ContainerFile:
    return ContainerFile(
        id=obj.id,
        container_id=getattr(obj, "container_id", None) or container_id,
        path=obj.path,
        bytes=obj.bytes,
        created_at=int(obj.created_at or 0),
        source=obj.source or "",
    )


def _decode_data_url(url: str) -> tuple[bytes, str] | None:
    if not url.startswith("data:") or "," not in url:
        return None
    header, payload = url.split(",", 1)
    mime = header[5:].split(";", 1)[0] or "image/png"
    if ";base64" not in header:
        return None
    return base64.b64decode(payload), mime


class ResponsesTranslator:
    """Responses API stream payloads (the JSON of each SSE event) -> our events. Pure, one per turn.

    Reads only the fields it needs; those the API may omit or null are read with ``.get``, and
    new event types and fields pass through unnoticed, as with the SDK's models.
    """

    def __init__(self) -> None:
        self.response_id: str | None = None
        self.container_id: str | None = None
        self.finished = False
        # Images the calls' outputs carried and no zero-length citation has claimed yet.
        self._images_unclaimed = 0

    def translate(self, event: Mapping[str, Any]) -> list[events.Event]:
        kind = event.get("type")
        if kind == "response.code_interpreter_call_code.delta":
            return [events.CodeDelta(event["item_id"], event["delta"])]
        if kind == "response.output_text.delta":
            return [events.TextDelta(event["delta"])]
        if kind == "response.created":
            response = event["response"]
            self.response_id = response["id"]
            return [events.TurnStarted(response_id=response["id"], model=response.get("model") or "")]
        if kind == "response.output_item.added" and event["item"].get("type") == "code_interpreter_call":
            item = event["item"]
            self.container_id = item.get("container_id") or self.container_id
            return [
                events.CallStarted(item["id"], item.get("container_id")),
                events.CallStatus(item["id"], "writing"),
            ]
        if kind == "response.code_interpreter_call_code.done":
            return [events.CodeDone(event["item_id"], event["code"])]
        if kind == "response.code_interpreter_call.interpreting":
            return [events.CallStatus(event["item_id"], "running")]
        if kind == "response.output_item.done" and event["item"].get("type") == "code_interpreter_call":
            return self._call_done(event["item"])
        if kind == "response.output_text.annotation.added":
            return self._annotation(event["annotation"])
        if kind == "response.output_text.done":
            return [events.TextDone(event["text"])]
        if kind == "response.completed":
            self.finished = True
            response = event["response"]
            return [events.Completed(response["id"], self.container_id, _usage(response.get("usage")))]
        if kind in ("response.failed", "response.incomplete"):
            self.finished = True
            return [
                events.Failed(
                    _response_problem(event["response"]),
                    kind="limit" if kind == "response.incomplete" else "api",
                )
            ]
        if kind == "error" or isinstance(event.get("error"), Mapping):
            self.finished = True
            return [
                events.Failed(f"OpenAI reported an error mid-stream: {_error_message(event)}", kind="api")
            ]
        return []

    def _call_done(self, item: Mapping[str, Any]) -> list[events.Event]:
        emitted: list[events.Event] = []
        if item.get("code") is not None:
            emitted.append(events.CodeDone(item["id"], item["code"]))
        for output in item.get("outputs") or []:
            if output.get("type") == "logs":
                emitted.append(events.Logs(item["id"], output.get("logs") or ""))
            elif output.get("type") == "image":
                decoded = _decode_data_url(output.get("url") or "")
                if decoded is not None:
                    emitted.append(events.Image(item["id"], decoded[0], decoded[1]))
                    self._images_unclaimed += 1
        emitted.append(
            events.CallStatus(item["id"], "completed" if item.get("status") == "completed" else "failed")
        )
        return emitted

    def _annotation(self, annotation: Mapping[str, Any]) -> list[events.Event]:
        if annotation.get("type") != "container_file_citation":
            return []
        start, end = int(annotation.get("start_index") or 0), int(annotation.get("end_index") or 0)
        # OpenAI cites each plt.show() image as a zero-length citation of /mnt/data/cfile_*.png. When
        # the call's outputs carried that image it is on screen already; without them (a request
        # without `include`, some gateways) the cited file is the only copy, to fetch and show.
        displayed = start == end == 0 and self._images_unclaimed > 0
        if displayed:
            self._images_unclaimed -= 1
        return [
            events.FileCited(
                container_id=annotation["container_id"],
                file_id=annotation["file_id"],
                filename=annotation["filename"],
                start_index=start,
                end_index=end,
                displayed=displayed,
            )
        ]


def _usage(usage: Mapping[str, Any] | None) -> events.Usage:
    if not usage:
        return events.Usage()
    return events.Usage(
        usage.get("input_tokens") or 0, usage.get("output_tokens") or 0, usage.get("total_tokens") or 0
    )


def _response_problem(response: Mapping[str, Any]) -> str:
    error = response.get("error")
    if error:
        return f"The response failed: {error.get('message')} ({error.get('code')})."
    reason = (response.get("incomplete_details") or {}).get("reason") or "unknown reason"
    return f"The response stopped early ({reason}); what arrived is shown above."


def _error_message(event: Mapping[str, Any]) -> str:
    """An ``error`` event's message: Responses sends it at the top level, some gateways nest it."""
    nested = event.get("error")
    source = nested if isinstance(nested, Mapping) else event
    return str(source.get("message") or source.get("code") or "no details were given")


def _stream_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"an event was not valid JSON: {error}"
    if isinstance(error, KeyError):
        return f"an event lacked its {error} field"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


EXEC_PROMPT = (
    "Run the following Python code exactly as written with the code interpreter, without changing it, "
    "then reply with one short sentence.\n\n```python\n{code}\n```"
)


class OpenAIBackend:
    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client

    async def create_container(
        self, *, name: str, memory_limit: MemoryLimit, expires_after_minutes: int
    ) -> ContainerInfo:
        if not 1 <= expires_after_minutes <= 20:
            raise ConfigurationError(
                f"OpenAI containers expire after 1 to 20 idle minutes; expires_after_minutes is "
                f"{expires_after_minutes}. Set %config CodeInterpreter.expires_after_minutes = 20."
            )
        try:
            container = await self.client.containers.create(
                name=name,
                expires_after={"anchor": "last_active_at", "minutes": expires_after_minutes},
                memory_limit=memory_limit,
            )
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing="creating a container") from error
        return _container_info(container)

    async def get_container(self, container_id: str) -> ContainerInfo | None:
        try:
            container = await self.client.containers.retrieve(container_id)
        except openai.NotFoundError:
            return None
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing="checking the container") from error
        return _container_info(container)

    async def delete_container(self, container_id: str) -> None:
        try:
            await self.client.containers.delete(container_id)
        except openai.NotFoundError:
            return
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing="deleting the container") from error

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        data = source.read_bytes() if isinstance(source, Path) else source
        try:
            created = await self.client.containers.files.create(container_id, file=(filename, data))
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing=f"uploading {filename}") from error
        return _container_file(created, container_id)

    async def list_files(self, container_id: str) -> list[ContainerFile]:
        """The container's files, at most MAX_LISTED_FILES of them (code can write millions)."""
        files: list[ContainerFile] = []
        try:
            async for item in self.client.containers.files.list(container_id, limit=100):
                files.append(_container_file(item, container_id))
                if len(files) >= MAX_LISTED_FILES:
                    break
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing="listing the container's files") from error
        return files

    async def download_file(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        """Stream the content into ``dest``: refused on its Content-Length, cut at ``max_bytes``."""
        what = f"Container file {file_id}"
        out = -1
        try:
            # identity: a compressed body would be decoded (and grow) past the Content-Length checked.
            async with self.client.containers.files.content.with_streaming_response.retrieve(
                file_id, container_id=container_id, extra_headers={"Accept-Encoding": "identity"}
            ) as response:
                length = response.headers.get("content-length", "")
                check_reported_size(what, int(length) if length.isdigit() else None, max_bytes=max_bytes)
                out = open_download_target(dest)
                written = 0
                async for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise stream_past_cap(what, max_bytes)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
                return written
        except BaseException as error:
            if out >= 0:
                os.close(out)
                out = -1
                discard_download(dest)
            if isinstance(error, openai.OpenAIError):
                raise sdk_error(error, OPENAI, doing=f"downloading {file_id}") from error
            if isinstance(error, httpx.HTTPError):
                raise BackendError(
                    f"The download of {file_id} broke mid-way ({type(error).__name__}); nothing was saved. "
                    "Run the cell again, or fetch the file with %ci_pull."
                ) from error
            raise
        finally:
            if out >= 0:
                os.close(out)

    async def delete_file(self, container_id: str, file_id: str) -> None:
        try:
            await self.client.containers.files.delete(file_id, container_id=container_id)
        except openai.NotFoundError:
            return
        except openai.OpenAIError as error:
            raise sdk_error(error, OPENAI, doing=f"deleting {file_id}") from error

    async def stream(self, request: TurnRequest) -> AsyncIterator[events.Event]:
        params: dict[str, Any] = {
            "model": request.model,
            "instructions": request.instructions,
            "tools": [{"type": "code_interpreter", "container": request.container_id}],
            "include": ["code_interpreter_call.outputs"],
            "stream": True,
        }
        if request.exec_code is not None:
            params["input"] = EXEC_PROMPT.format(code=request.exec_code)
            params["tool_choice"] = {"type": "code_interpreter"}
        else:
            params["input"] = request.user_text()
        if request.conversation.previous_response_id:
            params["previous_response_id"] = request.conversation.previous_response_id
        elif request.conversation.messages:
            # No server-side chain (it was refused, or the kernel restarted after it expired): the
            # session's own record of the conversation goes first, as plain input messages.
            params["input"] = [*request.conversation.messages, {"role": "user", "content": params["input"]}]
        if request.extra_headers:
            params["extra_headers"] = request.extra_headers

        translator = ResponsesTranslator()
        async with contextlib.AsyncExitStack() as stack:
            try:
                # The raw streaming response: the SDK sends, authenticates, retries and raises HTTP
                # errors; the events are decoded by ci_magic.backends.sse (which says why).
                response = await stack.enter_async_context(
                    self.client.responses.with_streaming_response.create(**params)
                )
            except openai.OpenAIError as error:
                raise sdk_error(error, OPENAI, doing="starting the response") from error
            try:
                if request.exec_code is not None:
                    yield events.Notice(
                        "On the openai backend, %%ci_exec asks the model to run the code verbatim."
                    )
                async for sse in aiter_events(response.iter_bytes()):
                    if sse.data.startswith("[DONE]"):
                        break
                    for event in translator.translate(json.loads(sse.data)):
                        if isinstance(event, events.Completed):
                            request.conversation.previous_response_id = event.response_id
                            request.conversation.notes.clear()
                            request.conversation.messages.clear()  # the chain holds them now
                        yield event
            except Exception as error:
                raise StreamError(
                    f"The response stream broke mid-way ({_stream_problem(error)}). What arrived is shown "
                    "above; the container and the conversation are intact, so run the cell again."
                ) from error
        if not translator.finished:
            raise StreamError(
                "The response stream ended before the response completed. What arrived is shown above; the "
                "container and the conversation are intact, so run the cell again."
            )

    async def aclose(self) -> None:
        await self.client.close()
