"""Which model server answers at ``model_base_url``, and the settings that work with it.

Chat Completions servers share one API but differ in what they accept. :func:`identify` reads the
server's own ``GET /v1/models`` answer (asked once per backend) and returns a :class:`ServerProfile`:
its kind, its models, its context size when it says, and the defaults ci-magic uses with it.

What each server says about itself, and why its defaults are what they are:

================  ==============================================  =========================================
server            ``GET /v1/models``                              defaults
================  ==============================================  =========================================
llama.cpp         ``owned_by: "llamacpp"``, ``meta.n_ctx``        ``tool_choice: "auto"``; it ignores the
(llama-server)                                                    named form and its ``"required"`` lets a
                                                                  model write unbounded text before a call
llama-cpp-python  ``owned_by: "me"``, ``permissions: []``         the named form on a turn's first step,
                                                                  ``"none"`` after: it uses a tool only when
                                                                  named, and ``"auto"`` while streaming
                                                                  fails inside the server (an empty 200)
vLLM              ``owned_by: "vllm"``, ``max_model_len``         ``"auto"`` (served with
                                                                  ``--enable-auto-tool-choice``)
Ollama            ``owned_by: "library"`` (or the namespace),     ``"auto"``; Ollama ignores ``tool_choice``,
                  ``name:tag`` ids                                so it is not sent
LM Studio         ``owned_by: "organization_owner"``              ``"auto"``
anything else     —                                               ``"auto"``
================  ==============================================  =========================================

``max_tokens`` is sent on every request: a quarter of the context, at most 4096, so an answer that
runs on can never fill the context by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "TOOL_CHOICES",
    "ServerProfile",
    "ToolChoice",
    "default_max_tokens",
    "identify",
    "loop_options",
    "tool_choice_param",
]

ToolChoice = Literal["auto", "required", "named", "none"]
TOOL_CHOICES: tuple[ToolChoice, ...] = ("auto", "required", "named", "none")

ServerKind = Literal["llama.cpp", "llama-cpp-python", "vllm", "ollama", "lmstudio", "unknown"]

_MAX_TOKENS_CAP = 4096
_MIN_MAX_TOKENS = 256


@dataclass(frozen=True)
class ServerProfile:
    """What one model server is and how ci-magic talks to it."""

    kind: ServerKind
    models: tuple[str, ...] = ()
    context_tokens: int | None = None  # the server's own context size, when it reports one
    tool_choice: ToolChoice = "auto"  # the default when CodeInterpreter.tool_choice is not set
    after_forced: ToolChoice = "auto"  # later steps of a turn whose first step forced the call
    sends_tool_choice: bool = True  # False: the server ignores the field (Ollama)
    named_works: bool = True  # False: the named form is ignored (llama.cpp); "required" is sent

    @property
    def label(self) -> str:
        return {
            "llama.cpp": "llama.cpp (llama-server)",
            "llama-cpp-python": "llama-cpp-python",
            "vllm": "vLLM",
            "ollama": "Ollama",
            "lmstudio": "LM Studio",
            "unknown": "an OpenAI-compatible server",
        }[self.kind]


def identify(listing: Any) -> ServerProfile:
    """The profile of the server whose ``GET /v1/models`` JSON body is ``listing``."""
    entries = [
        e for e in (listing.get("data") if isinstance(listing, dict) else None) or () if isinstance(e, dict)
    ]
    models = tuple(str(e["id"]) for e in entries if isinstance(e.get("id"), str))
    owners = {e.get("owned_by") for e in entries}
    if "llamacpp" in owners or any(isinstance(e.get("meta"), dict) and "n_ctx" in e["meta"] for e in entries):
        contexts = [e["meta"].get("n_ctx") for e in entries if isinstance(e.get("meta"), dict)]
        return ServerProfile("llama.cpp", models, _positive(contexts), named_works=False)
    if "vllm" in owners:
        return ServerProfile("vllm", models, _positive([e.get("max_model_len") for e in entries]))
    if owners == {"me"} and all("permissions" in e for e in entries):
        return ServerProfile("llama-cpp-python", models, None, tool_choice="named", after_forced="none")
    if owners == {"organization_owner"}:
        return ServerProfile("lmstudio", models, _positive([e.get("max_context_length") for e in entries]))
    if entries and ("library" in owners or all(":" in name for name in models)):
        return ServerProfile("ollama", models, None, sends_tool_choice=False)
    return ServerProfile("unknown", models)


def tool_choice_param(
    choice: ToolChoice, profile: ServerProfile, tool_name: str
) -> str | dict[str, Any] | None:
    """``tool_choice`` as ``profile``'s server expects it; None: leave the field out."""
    if not profile.sends_tool_choice:
        return None
    if choice == "named":
        if not profile.named_works:
            return "required"
        return {"type": "function", "function": {"name": tool_name}}
    return choice


def loop_options(settings: Any) -> dict[str, Any]:
    """ChatModelLoop's keyword arguments from ``CodeInterpreter`` settings (any backend that drives a
    Chat Completions model: local, gateway); importing this module does not import the OpenAI SDK."""
    return {
        "tool_choice": settings.tool_choice,
        "max_tokens": settings.max_tokens,
        "text_tool_calls": settings.text_tool_calls,
        "context_tokens": settings.context_tokens,
    }


def default_max_tokens(context_tokens: int) -> int:
    """A quarter of the context, within [256, 4096]."""
    return max(_MIN_MAX_TOKENS, min(_MAX_TOKENS_CAP, context_tokens // 4))


def _positive(values: list[Any]) -> int | None:
    sizes = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(sizes) if sizes else None
