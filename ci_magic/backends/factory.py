"""Building a backend from settings: the one place that knows which class each ``backend`` name means.

Each backend registers a builder under its name; ``build_backend(settings)`` looks the configured
name up and calls it. Builders import their backend lazily, so choosing ``local`` never imports the
OpenAI SDK's Responses machinery and loading the extension stays fast. A new backend adds a
function and one ``register`` call here (and its name to ``Settings.backend``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ci_magic.errors import ConfigurationError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ci_magic.backends.base import Backend
    from ci_magic.config import Settings

__all__ = ["BACKEND_SETTINGS", "BackendBuilder", "backend_names", "build_backend", "register"]

# Settings a backend is built from: changing one means building it again (the next cell, %ci_reset).
BACKEND_SETTINGS = (
    "backend",
    "model_base_url",
    "model_api_key",
    "sandbox_python",
    "isolation",
    "pool_size",
    "max_retries",
    "request_timeout",
    "execution_timeout",
    "disk_limit",
    "max_steps",
    "extra_headers",
    "gateway_url",
    "gateway_token",
    "gateway_kernel_name",
)

BackendBuilder = Callable[["Settings"], "Backend"]

_BUILDERS: dict[str, BackendBuilder] = {}


def register(name: str, builder: BackendBuilder) -> None:
    """Make ``CodeInterpreter.backend = name`` build its backend with ``builder(settings)``."""
    _BUILDERS[name] = builder


def backend_names() -> list[str]:
    return sorted(_BUILDERS)


def build_backend(settings: Settings) -> Backend:
    """A new backend for ``settings.backend``, configured from the rest of ``settings``.

    Reads the environment (API keys) at call time: building again after a key changed picks it up.
    """
    builder = _BUILDERS.get(settings.backend)
    if builder is None:
        raise ConfigurationError(
            f"There is no backend named {settings.backend!r}; the choices are {', '.join(backend_names())}."
        )
    return builder(settings)


def _build_openai(settings: Settings) -> Backend:
    from ci_magic.backends.openai_backend import OpenAIBackend, make_client

    client = make_client(
        max_retries=settings.max_retries,
        timeout=settings.request_timeout,
        headers=dict(settings.extra_headers),
    )
    return OpenAIBackend(client)


def _chat_model_client(settings: Settings) -> AsyncOpenAI | None:
    """The Chat Completions client of the local and gateway backends (None: no model server set)."""
    if not settings.model_base_url:
        return None
    import openai  # the SDK takes ~0.5 s to import: only when a backend is built

    return openai.AsyncOpenAI(
        base_url=settings.model_base_url,
        api_key=settings.model_api_key or "not-needed",
        max_retries=settings.max_retries,
        timeout=settings.request_timeout,
        default_headers=dict(settings.extra_headers),
    )


def _build_local(settings: Settings) -> Backend:
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.sandbox import SandboxManager
    from ci_magic.backends.local.servers import loop_options

    sandbox = SandboxManager(
        python=settings.sandbox_python or None,
        pool_size=settings.pool_size,
        execution_timeout=settings.execution_timeout,
        disk_limit=settings.disk_limit or None,
        isolation=settings.isolation,
    )
    return LocalBackend(
        sandbox,
        model_client=_chat_model_client(settings),
        model=settings.model or "",
        max_steps=settings.max_steps,
        loop_options=loop_options(settings),
    )


def _build_gateway(settings: Settings) -> Backend:
    from ci_magic.backends.gateway.backend import GatewayBackend
    from ci_magic.backends.gateway.client import GatewayClient
    from ci_magic.backends.local.servers import loop_options

    return GatewayBackend(
        GatewayClient(settings.gateway_url, token=settings.gateway_token, timeout=settings.request_timeout),
        kernel_name=settings.gateway_kernel_name,
        model_client=_chat_model_client(settings),
        model=settings.model or "",
        max_steps=settings.max_steps,
        loop_options=loop_options(settings),
        execution_timeout=settings.execution_timeout,
        upload_size_cap=settings.upload_size_cap,
    )


register("openai", _build_openai)
register("local", _build_local)
register("gateway", _build_gateway)
