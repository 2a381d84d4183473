"""What a turn is estimated to cost: tokens at the model's price, plus OpenAI's container fee.

Prices are US dollars. Token prices are per million tokens, from OpenAI's pricing page
(https://developers.openai.com/api/docs/pricing, as published on 2026-11-05, looked up on
2026-12-01). The container fee follows OpenAI's changelog: since 2026-06-02 a container session
is billed per minute with a 5-minute minimum, at the per-minute rate of the earlier 20-minute
session price ($0.03 for 1 GB, $0.12 for 4 GB, $0.48 for 16 GB, $1.92 for 64 GB). Both tables
are overridable with ``%config CodeInterpreter.prices = {...}`` (merged over these defaults)::

    {"my-model": {"input": 0.5, "output": 1.5},          # $ per 1M tokens
     "container": {"1g": 0.002, "minimum_minutes": 5}}   # $ per minute of a container's life

A container is billed from its creation to the end of the latest turn that used it (at least the
minimum); the idle tail before it expires is not counted (ci-magic deletes it at exit), so the
fee is an estimate from below. Only the openai backend pays a container fee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ci_magic.events import Usage

__all__ = [
    "CONTAINER_KEY",
    "DEFAULT_PRICES",
    "PRICES_SOURCE",
    "CostLedger",
    "TurnCost",
    "merged_prices",
    "model_price",
    "token_cost",
]

CONTAINER_KEY = "container"
PRICES_SOURCE = (
    "OpenAI pricing page (developers.openai.com/api/docs/pricing, 2026-11-05) and changelog "
    "(container sessions billed per minute, 5-minute minimum, from 2026-06-02); looked up 2026-12-01"
)
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # model: $ per 1M input / output tokens
    "gpt-5": {"input": 1.25, "output": 10.0},
    "gpt-5-mini": {"input": 0.25, "output": 2.0},
    "gpt-5-nano": {"input": 0.05, "output": 0.40},
    "gpt-5.1": {"input": 1.25, "output": 10.0},
    "gpt-5.2": {"input": 1.75, "output": 14.0},
    "gpt-5.4-mini": {"input": 0.75, "output": 4.50},
    "gpt-5.4-nano": {"input": 0.20, "output": 1.25},
    "gpt-4.1": {"input": 2.0, "output": 8.0},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-4o": {"input": 2.50, "output": 10.0},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "o3": {"input": 2.0, "output": 8.0},
    "o4-mini": {"input": 1.10, "output": 4.40},
    # $ per minute of a container session, by memory limit (the 20-minute price / 20)
    CONTAINER_KEY: {"1g": 0.0015, "4g": 0.006, "16g": 0.024, "64g": 0.096, "minimum_minutes": 5},
}
BILLED_BACKENDS = frozenset({"openai"})  # whose containers cost money (local and gateway: free)


def merged_prices(overrides: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The defaults with ``overrides`` merged in, entry by entry (a model's entry replaces fields)."""
    prices = {name: dict(entry) for name, entry in DEFAULT_PRICES.items()}
    for name, entry in (overrides or {}).items():
        if isinstance(entry, Mapping):
            prices.setdefault(str(name), {}).update(
                {str(k): float(v) for k, v in entry.items() if isinstance(v, (int, float))}
            )
    return prices


def model_price(model: str | None, prices: Mapping[str, Mapping[str, float]]) -> Mapping[str, float] | None:
    """The price entry of ``model``: exact, else the longest name it extends (``gpt-5-mini-2025-08-07``
    -> ``gpt-5-mini``); None when the table has none."""
    if not model:
        return None
    if model in prices and model != CONTAINER_KEY:
        return prices[model]
    known = [name for name in prices if name != CONTAINER_KEY and model.startswith(name + "-")]
    return prices[max(known, key=len)] if known else None


def token_cost(model: str | None, usage: Usage, prices: Mapping[str, Mapping[str, float]]) -> float | None:
    """Dollars for ``usage`` at ``model``'s price; None when the price is unknown (and tokens were used)."""
    if not usage.input_tokens and not usage.output_tokens:
        return 0.0
    price = model_price(model, prices)
    if price is None or "input" not in price or "output" not in price:
        return None
    return (usage.input_tokens * price["input"] + usage.output_tokens * price["output"]) / 1_000_000


@dataclass(frozen=True)
class TurnCost:
    """One turn's estimate. ``tokens`` is None when the model's price is unknown."""

    model: str | None
    tokens: float | None
    container: float = 0.0
    container_minutes: float = 0.0  # minutes of container life this turn added to the bill

    @property
    def total(self) -> float | None:
        return None if self.tokens is None else self.tokens + self.container

    def to_json(self) -> dict[str, Any]:
        return {
            "currency": "USD",
            "tokens": _rounded(self.tokens),
            "container": _rounded(self.container),
            "container_minutes": round(self.container_minutes, 3),
            "total": _rounded(self.total),
            "estimate": True,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 8)


@dataclass
class CostLedger:
    """The session's running bill: each turn is charged once; containers by their minutes so far."""

    prices: dict[str, dict[str, float]] = field(default_factory=lambda: merged_prices(None))
    tokens: float = 0.0
    container: float = 0.0
    unpriced_turns: int = 0  # turns whose model has no price: the total leaves them out
    model_seconds: float = 0.0
    code_seconds: float = 0.0
    _billed_minutes: dict[str, float] = field(default_factory=dict)  # container id -> minutes billed

    def set_prices(self, overrides: Mapping[str, Any] | None) -> None:
        self.prices = merged_prices(overrides)

    def charge(
        self,
        *,
        backend: str,
        model: str | None,
        usage: Usage,
        container_id: str | None,
        memory_limit: str,
        container_created_at: float,
        now: float,
    ) -> TurnCost:
        """Charge one turn ended at ``now`` (epoch seconds) in ``container_id``."""
        tokens = token_cost(model, usage, self.prices)
        fee, minutes = 0.0, 0.0
        if backend in BILLED_BACKENDS and container_id:
            table = self.prices.get(CONTAINER_KEY, {})
            rate = table.get(memory_limit, table.get("1g", 0.0))
            lived = max(table.get("minimum_minutes", 0.0), max(0.0, now - container_created_at) / 60)
            minutes = max(0.0, lived - self._billed_minutes.get(container_id, 0.0))
            self._billed_minutes[container_id] = max(lived, self._billed_minutes.get(container_id, 0.0))
            fee = minutes * rate
        if tokens is None:
            self.unpriced_turns += 1
        else:
            self.tokens += tokens
        self.container += fee
        return TurnCost(model, tokens, fee, minutes)

    def add_times(self, *, model_seconds: float, code_seconds: float) -> None:
        self.model_seconds += model_seconds
        self.code_seconds += code_seconds

    @property
    def total(self) -> float:
        return self.tokens + self.container


def dollars(amount: float | None) -> str:
    """``$0.0123`` with enough digits to show small amounts; ``price unknown`` for None."""
    if amount is None:
        return "price unknown"
    if amount == 0:
        return "$0"
    if amount < 0.01:
        return f"${amount:.4f}"
    return f"${amount:.2f}" if amount >= 1 else f"${amount:.3f}"
