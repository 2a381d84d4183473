"""LocalBackend: the Backend protocol on local sandboxes, with any Chat Completions model.

Containers and files go straight to :class:`SandboxManager`. A turn either runs the user's code
verbatim (``%%ci_exec``, no model involved) or hands the prompt to the model loop
(``model_loop.ChatModelLoop``), giving it the sandbox as its code runner.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ci_magic import events
from ci_magic.backends.base import ContainerFile, ContainerInfo, MemoryLimit, TurnRequest
from ci_magic.backends.local.sandbox import SandboxManager
from ci_magic.errors import ConfigurationError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ci_magic.backends.local.model_loop import ChatModelLoop

__all__ = ["NO_MODEL_MESSAGE", "LocalBackend"]

NO_MODEL_MESSAGE = (
    "The local backend needs a model server for prompts, and none is configured. Point it at any "
    "OpenAI-compatible Chat Completions server, e.g. "
    '`%config CodeInterpreter.model_base_url = "http://localhost:11434/v1"` (Ollama) and '
    '`%config CodeInterpreter.model = "qwen2.5-coder"`, or set the environment variables '
    "CI_MAGIC_MODEL_BASE_URL and CI_MAGIC_MODEL (plus CI_MAGIC_MODEL_API_KEY if the server wants a "
    "key) before loading the extension. %%ci_exec runs code in the local sandbox without a model."
)


class LocalBackend:
    name = "local"

    def __init__(
        self,
        sandbox: SandboxManager,
        *,
        model_client: AsyncOpenAI | None,
        model: str,
        max_steps: int = 12,
        loop_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``loop_options``: ChatModelLoop's other settings (tool_choice, max_tokens, text_tool_calls,
        context_tokens; see ``model_loop.loop_options``)."""
        self.sandbox = sandbox
        self.model_client = model_client
        self.model = model
        self.max_steps = max_steps
        self.loop_options = dict(loop_options or {})
        self._loop: ChatModelLoop | None = None  # one per backend: the server is identified once

    async def create_container(
        self, *, name: str, memory_limit: MemoryLimit, expires_after_minutes: int
    ) -> ContainerInfo:
        return await self.sandbox.create(
            name=name, memory_limit=memory_limit, expires_after_minutes=expires_after_minutes
        )

    async def get_container(self, container_id: str) -> ContainerInfo | None:
        return await self.sandbox.get(container_id)

    async def delete_container(self, container_id: str) -> None:
        await self.sandbox.delete(container_id)

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> ContainerFile:
        return await self.sandbox.upload(container_id, filename, source)

    async def list_files(self, container_id: str) -> list[ContainerFile]:
        return await self.sandbox.list_files(container_id)

    async def download_file(self, container_id: str, file_id: str, dest: Path, *, max_bytes: int) -> int:
        return await self.sandbox.download(container_id, file_id, dest, max_bytes=max_bytes)

    async def delete_file(self, container_id: str, file_id: str) -> None:
        await self.sandbox.delete_file(container_id, file_id)

    def stream(self, request: TurnRequest) -> AsyncIterator[events.Event]:
        if request.exec_code is not None:
            return self._run_code(request, request.exec_code)
        return self._run_model(request)

    async def _run_code(self, request: TurnRequest, code: str) -> AsyncIterator[events.Event]:
        """%%ci_exec: the code as one call, exactly as the model loop would run it."""
        call_id = _call_id()
        container_id = request.container_id
        yield events.TurnStarted()
        for notice in self._turn_notices():
            yield notice
        yield events.CallStarted(call_id=call_id, container_id=container_id)
        yield events.CodeDone(call_id=call_id, code=code)
        yield events.CallStatus(call_id=call_id, status="running")
        outputs = self.sandbox.execute(container_id, code, call_id=call_id)
        async with contextlib.aclosing(outputs):  # Ctrl-C: stop the sandbox code at once
            async for event in outputs:
                yield event
        yield events.Completed(container_id=container_id)

    async def _run_model(self, request: TurnRequest) -> AsyncIterator[events.Event]:
        if self.model_client is None:
            raise ConfigurationError(NO_MODEL_MESSAGE)
        # Imported here: the model loop is optional for code-only use and pulls in the OpenAI SDK.
        from ci_magic.backends.local.model_loop import ChatModelLoop

        if self._loop is None:
            self._loop = ChatModelLoop(
                self.model_client, model=self.model, max_steps=self.max_steps, **self.loop_options
            )
        loop = self._loop  # the cell's --model (request.model) wins over the configured one
        container_id = request.container_id

        def run(code: str, call_id: str) -> AsyncIterator[events.Event]:
            return self.sandbox.execute(container_id, code, call_id=call_id)

        notices = self._turn_notices()
        async for event in loop.run(request, run):
            yield event
            # After the loop's first event (TurnStarted), so the turn's shape stays intact.
            for notice in notices:
                yield notice
            notices = []

    def _turn_notices(self) -> list[events.Notice]:
        """The sandbox's one-time warnings, then what every status line of this turn must carry."""
        notices = self.sandbox.take_notices()
        isolation = self.sandbox.isolation
        if isolation is not None and isolation.label:
            notices.append(events.Notice(isolation.label, "warning", kind="status"))
        return notices

    async def warm(self) -> None:
        """Start the sandbox's warm pool now (the extension calls this when it loads)."""
        await self.sandbox.warm()

    async def aclose(self) -> None:
        await self.sandbox.aclose()


def _call_id() -> str:
    return "ci_" + secrets.token_hex(12)
