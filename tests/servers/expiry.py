"""How the test server treats a conversation whose container expired: OpenAI's two refusals.

OpenAI answers ``400 {"error": {"message": "Container is expired.", "type": "invalid_request_error",
...}}`` to a request that names an expired container (``ContainerStore.usable`` does that), and
users report the same 400 when ``previous_response_id`` chains to a response whose container
expired, even when the request names a live container. The second refusal is a switch, so a test
picks which behaviour it faces:

    server.chain_expiry.refuse = True      # a chain to an expired container is refused, as reported
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tests.servers.containers import ContainerStore
from tests.servers.http_base import ApiError

__all__ = ["CONTAINER_EXPIRED", "ChainExpiry"]

CONTAINER_EXPIRED = "Container is expired."


class _Previous(Protocol):
    container_id: str | None


@dataclass
class ChainExpiry:
    """``refuse``: answer a chain whose container expired (or was deleted) as OpenAI does."""

    refuse: bool = False
    refused: int = 0  # how many requests were refused this way

    def check(self, previous: _Previous | None, store: ContainerStore) -> None:
        if not self.refuse or previous is None or previous.container_id is None:
            return
        try:
            expired = store.get(previous.container_id).expired
        except ApiError:
            expired = True  # deleted: its conversation cannot continue either
        if expired:
            self.refused += 1
            raise ApiError(400, CONTAINER_EXPIRED)
