"""The attacker every sandbox test runs as: once as root, once as nobody (``USERS``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.sandbox_support import USERS, Attacker, attacker_as


@pytest.fixture(params=USERS)
def attacker(request: pytest.FixtureRequest) -> Iterator[Attacker]:
    with attacker_as(request.param) as found:
        yield found
