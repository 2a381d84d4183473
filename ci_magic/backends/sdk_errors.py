"""The one boundary where the openai SDK's exceptions become ours (``BackendError``, raised ``from`` them).

Both backends that speak through the SDK (the Responses API and any Chat Completions server) map
here: the SDK's class says what kind of failure it was (an HTTP status, a timeout, no
connection), the server's body says what it thought, and the caller's ``Service`` says who
answered and what the user can do about each kind.

    sdk_error(error, OPENAI, doing="creating a container")
    -> BackendError("OpenAI answered 401 while creating a container: Incorrect API key. Check ...")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import openai

from ci_magic.errors import BackendError
from ci_magic.redact import display_url

__all__ = ["OPENAI", "Service", "sdk_error", "server_message"]


@dataclass(frozen=True)
class Service:
    """Who answered, and the advice for each kind of failure."""

    who: str  # "OpenAI", "the model server at http://localhost:8080/v1" (capitalized where it starts)
    status_hints: Mapping[int, str] = field(default_factory=dict)  # by status; 500 stands for any 5xx
    timeout_hint: str = "Try again, or raise CodeInterpreter.request_timeout."
    connect_hint: str = "Check the network."
    # A service whose status errors need more than a hint words them whole: (status, message) -> text.
    status_text: Callable[[int, str], str | None] | None = None


OPENAI = Service(
    "OpenAI",
    {
        401: "Check OPENAI_API_KEY (or AZURE_OPENAI_API_KEY) in the kernel's environment, then %ci_reset.",
        403: "The key is not allowed to do this; check its project and permissions.",
        404: "Check the model name (%config CodeInterpreter.model = ...) and the base URL.",
        429: "The rate limit or quota was hit and the retries ran out; wait, or raise "
        "%config CodeInterpreter.max_retries.",
        500: "The service failed after the configured retries; try the cell again.",
    },
    connect_hint="Check the network and OPENAI_BASE_URL.",
)


def sdk_error(error: BaseException, service: Service, *, doing: str) -> BackendError:
    """Our one-paragraph error for an SDK exception, keeping the server's own words."""
    if isinstance(error, openai.APIStatusError):
        status, message = error.status_code, server_message(error).rstrip(".")
        text = service.status_text(status, message) if service.status_text is not None else None
        if text is None:
            hint = service.status_hints.get(status) or (
                service.status_hints.get(500) if status >= 500 else None
            )
            text = f"{_upper(service.who)} answered {status} while {doing}: {message}." + (
                f" {hint}" if hint else ""
            )
        return BackendError(text, status_code=status)
    if isinstance(error, openai.APITimeoutError):  # a subclass of APIConnectionError: first
        return BackendError(
            f"{_upper(service.who)} did not answer in time while {doing}. {service.timeout_hint}"
        )
    if isinstance(error, openai.APIConnectionError):
        url = getattr(getattr(error, "request", None), "url", None)
        cause = f" ({_without_url(str(error.__cause__), url)})" if str(error.__cause__ or "") else ""
        # Say where, once, and never with the URL's user, password or query (they may hold a secret).
        where = f" at {display_url(url)}" if url is not None and "://" not in service.who else ""
        return BackendError(
            f"Could not reach {service.who}{where}{cause} while {doing}. {service.connect_hint}"
        )
    if isinstance(error, openai.APIError):
        return BackendError(f"{_upper(service.who)} failed while {doing}: {server_message(error)}")
    return BackendError(f"{type(error).__name__} while {doing}: {error}")


def _without_url(text: str, url: object) -> str:
    """``text`` (an httpx message may quote the request URL) with that URL shown safely."""
    return text.replace(str(url), display_url(url)) if url is not None else text


def _upper(who: str) -> str:
    """``who`` at the start of a sentence ("the model server at ..." -> "The model server at ...")."""
    return who[:1].upper() + who[1:]


def server_message(error: openai.APIError) -> str:
    """The server's own words: OpenAI, vLLM, Ollama, llama.cpp and FastAPI shape errors differently."""
    body = error.body
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"].strip()
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(error.message)
