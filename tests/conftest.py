"""Shared fixtures. Each block is owned by the engineer who wrote it; append new blocks at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# ---- chat_server: the scripted OpenAI-compatible Chat Completions model (tests/servers/chat_server.py) ----


@pytest.fixture
def chat_server() -> Iterator[Callable[..., Any]]:
    """Start scripted chat servers with ``chat_server(script, **options)``; all stop after the test."""
    from tests.servers.chat_server import ChatServer

    started: list[ChatServer] = []

    def start(script: Any, **options: Any) -> ChatServer:
        server = ChatServer(script, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


# ---- end of chat_server ----


# ---- openai_server: the OpenAI-compatible Responses/Containers server (tests/servers/openai_server.py) ----


@pytest.fixture
def openai_server() -> Iterator[Any]:
    """A fresh ``OpenAIServer`` with the scripted ``quickstart`` model; set ``.responder`` to script turns.

    Its containers are local sandboxes: without a working bubblewrap the test is skipped, saying why."""
    from tests.servers.containers import sandbox_problem
    from tests.servers.openai_server import OpenAIServer

    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(f"the OpenAI test server runs code in local sandboxes, which cannot start: {problem}")
    server = OpenAIServer().start()
    yield server
    server.stop()


# ---- end of openai_server ----


# ---- runner: one event loop per test module for async code driven from sync tests ----


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


# ---- end of runner ----
