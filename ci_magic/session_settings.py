"""SessionSettings: what a ``Session`` follows of the configuration, as one typed value.

:mod:`~ci_magic.lifecycle` builds it from the ``CodeInterpreter`` settings before each use and hands
it to ``Session.apply``, so a ``%config`` change takes effect at the next cell without a restart.
Its own module so that the session and :mod:`~ci_magic.continuity` (which reads the container's
settings) can both name it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci_magic.backends.base import DEFAULT_DOWNLOAD_SIZE_CAP
from ci_magic.downloads import DEFAULT_DOWNLOAD_TURN_BUDGET
from ci_magic.variables.transfer import DEFAULT_PULL_MEMORY_CAP, DEFAULT_SIZE_CAP

__all__ = ["SessionSettings"]


@dataclass(frozen=True)
class SessionSettings:
    """The settings in force for a session's next turn, push or pull (``CodeInterpreter``'s names)."""

    memory_limit: str  # of each new container
    expires_after_minutes: int  # idle minutes before a container expires
    output_dir: Path  # where the model's files, figures and long logs are saved
    download_concurrency: int = 4  # files fetched (and pushed) at once; at least 1
    download_size_cap: int = DEFAULT_DOWNLOAD_SIZE_CAP  # per file
    download_turn_budget: int = DEFAULT_DOWNLOAD_TURN_BUDGET  # all automatic downloads of one turn
    upload_size_cap: int = DEFAULT_SIZE_CAP  # per pushed file
    pull_memory_cap: int = DEFAULT_PULL_MEMORY_CAP  # decoded size %ci_pull loads without asking
    always_push: tuple[str, ...] = ()  # files and folders sent to every new container
    restore_on_expiry: str = "replay"  # "replay": a replacement container re-runs the old one's code
    restore_time_limit: float = 60.0  # seconds the code to re-run may have taken
    prices: Mapping[str, Any] = field(default_factory=dict)  # overrides of costs.DEFAULT_PRICES
