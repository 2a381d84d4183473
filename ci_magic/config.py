"""Settings: traitlets traits with environment-variable fallbacks.

Every trait is configurable the IPython way (``%config CodeInterpreter.model = "gpt-5"`` or
``c.CodeInterpreter.model`` in ipython_config.py); where a trait has an environment variable, the
variable supplies the default. Explicit configuration always wins.
"""

from __future__ import annotations

import json
import os
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

__all__ = ["DEFAULT_INSTRUCTIONS", "Settings", "openai_key_configured"]

DEFAULT_INSTRUCTIONS = """\
You are a careful data analyst working in a Python sandbox from a Jupyter notebook.
- Files live in /mnt/data (the working directory). Files the user sent are described below the prompt;
  read them from there, and save every output file (tables, charts, reports) in /mnt/data.
- Link every file you save as a Markdown link whose target is sandbox:/mnt/data/<name>.
- Explore data before assuming its shape: check columns, dtypes and a few rows unless a schema card
  already tells you.
- When code fails, read the error, fix the code and run it again.
- Show charts with matplotlib (plt.show()); keep printed output short.
- Finish with a concise answer in Markdown: what you did, the key numbers, and the files you made."""

MEMORY_LIMITS = ("1g", "4g", "16g", "64g")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def openai_key_configured() -> bool:
    return bool(_env("OPENAI_API_KEY") or (_env("AZURE_OPENAI_API_KEY") and _env("AZURE_OPENAI_ENDPOINT")))


def _parse_headers(text: str) -> dict[str, str]:
    """``{"x-model": "gpt-5"}`` as JSON, or ``x-model=gpt-5,x-other=1``."""
    text = text.strip()
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    pairs = (part.split("=", 1) for part in text.split(",") if "=" in part)
    return {key.strip(): value.strip() for key, value in pairs}


class Settings(Configurable):
    """The configurable part of ``CodeInterpreter`` (kept separate so it reads as a reference)."""

    backend = Enum(
        ["openai", "local"],
        help="Where code runs: 'openai' (Responses API + Containers) or 'local' (a sandbox on this "
        "machine driven by any OpenAI-compatible chat model). Env: CI_MAGIC_BACKEND. Default: openai "
        "when an OpenAI/Azure key is configured, else local.",
    ).tag(config=True)

    model = Unicode(
        help="Model name. Env: CI_MAGIC_MODEL. Default: gpt-5-mini on openai; on local the model "
        "server's first model.",
    ).tag(config=True)

    memory_limit = Enum(list(MEMORY_LIMITS), help="Container memory tier. Env: CI_MAGIC_MEMORY_LIMIT.").tag(
        config=True
    )

    expires_after_minutes = Int(
        help="Idle minutes before the container expires (1-20 on OpenAI). Env: CI_MAGIC_EXPIRES_MINUTES.",
    ).tag(config=True)

    instructions = Unicode(DEFAULT_INSTRUCTIONS, help="System instructions sent with every turn.").tag(
        config=True
    )

    extra_headers = Dict(
        value_trait=Unicode(),
        help="Extra HTTP headers on model requests (some Azure gateways need x-model). Env: "
        "CI_MAGIC_EXTRA_HEADERS as JSON or 'name=value,name=value'.",
    ).tag(config=True)

    output_dir = Unicode(
        help="Folder (relative to the notebook) where generated files are saved. Env: CI_MAGIC_OUTPUT_DIR.",
    ).tag(config=True)

    delete_container_on_exit = Bool(True, help="Delete the session's container when the kernel exits.").tag(
        config=True
    )

    download_concurrency = Int(4, help="Files downloaded at once after a turn.").tag(config=True)

    max_retries = Int(2, help="Retries (with backoff) of 429, 5xx and connection errors.").tag(config=True)

    request_timeout = Float(600.0, help="Seconds before a model request times out.").tag(config=True)

    max_updates_per_second = Float(
        12.0,
        help="Upper bound on live display updates per second (each display's final redraw is extra).",
    ).tag(config=True)

    auto_push = Bool(
        True, help="Push data-like variables (DataFrames, arrays, figures...) named in the prompt."
    ).tag(config=True)

    always_push = List(Unicode(), help="Files or folders uploaded to every new container.").tag(config=True)

    upload_size_cap = Int(
        512 * 1024 * 1024, help="Largest file (bytes) pushed to a container; checked before upload."
    ).tag(config=True)

    model_base_url = Unicode(
        help="local backend: base URL of an OpenAI-compatible Chat Completions server "
        "(e.g. http://localhost:11434/v1). Env: CI_MAGIC_MODEL_BASE_URL.",
    ).tag(config=True)

    model_api_key = Unicode(
        help="local backend: API key for the model server, if it needs one. Env: CI_MAGIC_MODEL_API_KEY.",
    ).tag(config=True)

    sandbox_python = Unicode(
        help="local backend: the Python interpreter of the sandbox (default: this kernel's).",
    ).tag(config=True)

    execution_timeout = Float(120.0, help="local backend: seconds one code execution may run.").tag(
        config=True
    )

    pool_size = Int(1, help="local backend: containers kept warm so a new one is ready at once.").tag(
        config=True
    )

    max_steps = Int(12, help="local backend: tool calls the model may make in one turn.").tag(config=True)

    @default("backend")
    def _default_backend(self) -> str:
        chosen = _env("CI_MAGIC_BACKEND")
        if chosen:
            return chosen.lower()
        return "openai" if openai_key_configured() else "local"

    @default("model")
    def _default_model(self) -> str:
        return _env("CI_MAGIC_MODEL") or ""

    @default("memory_limit")
    def _default_memory_limit(self) -> str:
        return (_env("CI_MAGIC_MEMORY_LIMIT") or "1g").lower()

    @default("expires_after_minutes")
    def _default_expiry(self) -> int:
        return int(_env("CI_MAGIC_EXPIRES_MINUTES") or 20)

    @default("extra_headers")
    def _default_headers(self) -> dict[str, str]:
        text = _env("CI_MAGIC_EXTRA_HEADERS")
        return _parse_headers(text) if text else {}

    @default("output_dir")
    def _default_output_dir(self) -> str:
        return _env("CI_MAGIC_OUTPUT_DIR") or "ci_outputs"

    @default("model_base_url")
    def _default_model_base_url(self) -> str:
        return _env("CI_MAGIC_MODEL_BASE_URL") or ""

    @default("model_api_key")
    def _default_model_api_key(self) -> str:
        return _env("CI_MAGIC_MODEL_API_KEY") or ""

    @validate("expires_after_minutes")
    def _check_expiry(self, proposal: dict[str, Any]) -> int:
        minutes = int(proposal["value"])
        if not 1 <= minutes <= 24 * 60:
            raise TraitError(
                f"expires_after_minutes must be between 1 and 1440 (OpenAI allows 1-20), not {minutes}"
            )
        return minutes

    @validate("download_concurrency", "pool_size", "max_steps", "max_retries")
    def _check_non_negative(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} cannot be negative ({value})")
        return value

    @validate("max_updates_per_second")
    def _check_rate(self, proposal: dict[str, Any]) -> float:
        rate = float(proposal["value"])
        if not 0.5 <= rate <= 60:
            raise TraitError(f"max_updates_per_second must be between 0.5 and 60, not {rate}")
        return rate
