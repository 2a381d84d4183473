"""The HTTP layer both test servers share: one fault design, exercised through the real SDK."""

from __future__ import annotations

import time

import openai
import pytest

from tests.servers.chat_server import ChatServer
from tests.servers.http_base import TestServer


def test_the_chat_server_takes_scripted_http_errors_then_answers() -> None:
    with ChatServer(["Hello there."]) as server:
        server.fail_next("/chat/completions", 429, times=1, retry_after=0.01)
        server.fail_next("/chat/completions", 500, times=1)
        with openai.OpenAI(base_url=server.url, api_key="test", max_retries=2) as client:
            stream = client.chat.completions.create(
                model="scripted-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello there."
    assert [r.status for r in server.requests_to("/chat/completions", "POST")] == [429, 500, 200]


def test_the_chat_server_cuts_a_stream_mid_way_and_slows_one_down() -> None:
    with ChatServer(["one two three four five six", "slow answer here"]) as server:
        server.cut_stream_after(3)
        with openai.OpenAI(base_url=server.url, api_key="test", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="scripted-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            received = []
            with pytest.raises(openai.APIConnectionError):
                for chunk in stream:
                    received.append(chunk)
            assert len(received) == 3
            server.event_delay = 0.05
            started = time.monotonic()
            stream = client.chat.completions.create(
                model="scripted-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = list(stream)
    assert time.monotonic() - started >= 0.05 * (len(chunks) - 1)


def test_every_request_is_recorded_with_its_answer_status() -> None:
    with ChatServer(["ok"], api_key="right") as server:
        client = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
        with client, pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert [(r.method, r.path, r.status) for r in server.requests] == [("GET", "/v1/models", 401)]
        assert isinstance(server, TestServer)
