"""Settings: traitlets traits with environment-variable fallbacks.

Every trait is configurable the IPython way (``%config CodeInterpreter.model = "gpt-5"`` or
``c.CodeInterpreter.model`` in ipython_config.py); where a trait has an environment variable, the
variable supplies the default. Explicit configuration always wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, TraitType, Unicode, default, validate
from traitlets.config import Configurable
from traitlets.utils.text import indent

from ci_magic.errors import ConfigurationError
from ci_magic.redact import masked_url

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "MaskedHeaders",
    "MaskedText",
    "MaskedUrl",
    "SecretDict",
    "SecretUnicode",
    "Settings",
    "masked",
    "masked_url",
    "openai_key_configured",
    "output_dir_problem",
]

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


def _bad_env(variable: str, value: str, expected: str, setting: str, example: str) -> ConfigurationError:
    return ConfigurationError(
        f"The environment variable {variable} is {value!r}, but it must be {expected}. Fix or unset it "
        "in the environment the kernel starts from and restart the kernel, or set it for this session "
        f"with %config CodeInterpreter.{setting} = {example}"
    )


def _env_choice(variable: str, setting: str, choices: list[str], fallback: str) -> str:
    """An environment value that must be one of ``choices`` (case-insensitive)."""
    value = _env(variable)
    if value is None:
        return fallback
    if value.strip().lower() not in choices:
        allowed = [c for c in choices if c]
        expected = "one of " + ", ".join(repr(c) for c in allowed)
        raise _bad_env(variable, value, expected, setting, json.dumps(allowed[0]))
    return value.strip().lower()


def _env_int(
    variable: str,
    setting: str,
    fallback: int,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    unit: str = "a whole number",
) -> int:
    """An environment count within the setting's bounds, checked here so the error names the variable
    (the trait's own min/max would raise a TraitError naming only the setting; @validate never sees a
    default)."""
    text = _env(variable)
    if text is None:
        return fallback
    with contextlib.suppress(ValueError):
        value = int(text)  # 256_000_000 reads too
        if value >= minimum and (maximum is None or value <= maximum):
            return value
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
    raise _bad_env(variable, text, f"{unit} {bounds}", setting, str(fallback))


def _env_bytes(variable: str, setting: str, fallback: int) -> int:
    return _env_int(variable, setting, fallback, minimum=1, unit="a number of bytes")


def _env_text(setting: str, variable: str) -> Any:
    """The ``@default`` of a text setting: the environment variable's value, else empty."""
    return default(setting)(lambda _settings: _env(variable) or "")


def openai_key_configured() -> bool:
    return bool(_env("OPENAI_API_KEY") or (_env("AZURE_OPENAI_API_KEY") and _env("AZURE_OPENAI_ENDPOINT")))


def _parse_headers(text: str) -> dict[str, str]:
    """``{"x-model": "gpt-5"}`` as JSON, or ``x-model=gpt-5,x-other=1``."""
    text = text.strip()
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    pairs = (part.split("=", 1) for part in text.split(",") if "=" in part)
    return {key.strip(): value.strip() for key, value in pairs}


# ---- secrets: traits tagged ``secret=True`` never show their value -------------------------------
#
# A secret may be printed by ``%config CodeInterpreter`` (the help with "Current:" values), by
# ``%config CodeInterpreter.model_api_key`` (the value's repr becomes the cell's output), by a
# traitlets error about a bad value, or by our own messages. Each path goes through one of:
# ``Settings.class_get_trait_help`` (masks any trait tagged secret), the value types below (their
# repr is masked, so any display of the value is too), and the Secret* traits' error messages.


class MaskedText(str):
    """A secret string: works as the string, but its repr never shows it."""

    def __repr__(self) -> str:
        return "'<secret>'" if self else "''"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's display of Out[]
        printer.text(repr(self))


class MaskedHeaders(dict):  # type: ignore[type-arg]
    """Headers whose values may be credentials: the repr shows the names only."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: '<secret>'" for name in self) + "}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class MaskedUrl(str):
    """A URL setting: works as the URL, but its repr hides a password and credential query values."""

    def __repr__(self) -> str:
        return repr(masked_url(str(self)))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def masked(value: Any) -> str:
    """What a secret value shows instead of itself: whether it is set, never what it is."""
    if isinstance(value, dict):
        return repr(MaskedHeaders(value))
    if isinstance(value, str):
        return repr(MaskedText(value))
    return "'<secret>'" if value else repr(value)


def _secret_error(trait: TraitType[Any, Any], obj: Any, value: Any) -> TraitError:
    owner = type(obj).__name__ if obj is not None else "the settings"
    return TraitError(
        f"{owner}.{trait.name} expects {trait.info()}, not a value of type {type(value).__name__} "
        "(it is not shown because this setting holds a secret)."
    )


class SecretUnicode(Unicode):  # type: ignore[type-arg]
    """A string setting that is a secret (API key, token): used whole, shown as ``shown_as`` shows it."""

    marker = "secret"  # the trait metadata %config's listing reads
    shown_as: type[str] = MaskedText

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata[self.marker] = True

    def validate(self, obj: Any, value: Any) -> str:
        return self.shown_as(super().validate(obj, value))

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None) -> Any:
        raise _secret_error(self, obj, value)


class UrlUnicode(SecretUnicode):
    """A URL setting (model server, gateway): used whole, shown without its credentials."""

    marker = "url"
    shown_as = MaskedUrl


class SecretDict(Dict):  # type: ignore[type-arg]
    """A mapping setting whose values are secrets (HTTP headers may carry credentials)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata["secret"] = True

    def validate(self, obj: Any, value: Any) -> MaskedHeaders:
        return MaskedHeaders(super().validate(obj, value) or {})

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None) -> Any:
        raise _secret_error(self, obj, value)

    def element_error(self, obj: Any, element: Any, validator: Any, side: str = "Values") -> Any:
        raise _secret_error(self, obj, element)


# ---- output_dir: never where the notebook's Python imports from ---------------------------------


def _import_folders() -> list[Path]:
    """Folders the kernel imports from: every sys.path entry ('' is the working directory)."""
    folders = []
    for entry in sys.path:
        try:
            folders.append(Path(entry or os.getcwd()).resolve())
        except (OSError, RuntimeError):
            continue
    return folders


def _config_folders() -> list[tuple[str, Path]]:
    """Folders whose files Python, IPython or Jupyter read or run at start-up, with what they are."""
    home = Path.home()
    found: list[tuple[str, str | Path]] = [
        *((f"~/{name}", home / name) for name in (".ipython", ".jupyter", ".config", ".local")),
        ("XDG_CONFIG_HOME", os.environ.get("XDG_CONFIG_HOME", "")),
        ("IPYTHONDIR", os.environ.get("IPYTHONDIR", "")),
        ("sys.prefix", sys.prefix),
        ("sys.base_prefix", sys.base_prefix),
        ("sys.exec_prefix", sys.exec_prefix),
    ]
    with contextlib.suppress(Exception):
        import site

        found += [("site-packages", p) for p in site.getsitepackages()]
        found.append(("the user site-packages", site.getusersitepackages()))
    with contextlib.suppress(Exception):
        from IPython.paths import get_ipython_dir

        found.append(("the IPython folder", get_ipython_dir()))
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            found.append(("the IPython profile", shell.profile_dir.location))
    with contextlib.suppress(Exception):
        from jupyter_core import paths as jupyter_paths

        found += [("a Jupyter config folder", p) for p in jupyter_paths.jupyter_config_path()]
        found += [("a Jupyter data folder", p) for p in jupyter_paths.jupyter_path()]
        found.append(("the Jupyter runtime folder", jupyter_paths.jupyter_runtime_dir()))
    folders = []
    for what, entry in found:
        if not str(entry).strip():
            continue
        with contextlib.suppress(OSError, RuntimeError):
            folders.append((what, Path(entry).expanduser().resolve()))
    return folders


def _config_folder_problem(folder: Path) -> str | None:
    with contextlib.suppress(OSError, RuntimeError):
        # Home itself, or above it: a sub-folder the sandbox names (.ipython/profile_default/startup,
        # .bashrc, .config/autostart) would be a start-up file. A folder below home is fine.
        home = Path.home().resolve()
        if folder == home or folder in home.parents:
            where = "your home folder" if folder == home else "a parent of your home folder"
            return f"it is {where} ({home})"
    for what, location in _config_folders():
        if folder == location or folder in location.parents or location in folder.parents:
            return f"{what} ({location}) holds files that run or configure Python, IPython or Jupyter"
    return None


def output_dir_problem(output_dir: str | Path) -> str | None:
    """Why saving sandbox files into ``output_dir`` could run them in this kernel; None: it is safe.

    Files land in ``output_dir`` and in sub-folders the sandbox names, so the folder must not be
    the working directory, a folder on ``sys.path``, or a parent of either; nor a Python package;
    nor home, a parent of home, or a folder inside, equal to or above a start-up/config location
    (~/.ipython, ~/.jupyter, ~/.config, ~/.local, the IPython profile, Jupyter's config and data
    folders, site-packages, sys.prefix).
    """
    try:
        folder = Path(output_dir).expanduser().resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):
        return None  # cannot tell; the save itself will say what is wrong
    if not str(output_dir).strip():
        return "it is empty, which means the notebook's own folder"
    if folder == cwd or folder in cwd.parents:
        where = "the notebook's working directory" if folder == cwd else "a parent of the working directory"
        return f"it is {where} ({folder})"
    for entry in _import_folders():
        if folder == entry or folder in entry.parents:
            return f"Python imports modules from {entry}, which is {'it' if folder == entry else 'inside it'}"
    if (folder / "__init__.py").exists():
        return f"{folder} is a Python package"
    return _config_folder_problem(folder)


def output_dir_message(
    output_dir: str | Path, problem: str, *, outcome: str = "the setting was left as it was"
) -> str:
    return (
        f"CodeInterpreter.output_dir = {str(output_dir)!r} is refused: {problem}. Files the sandbox "
        "writes are saved there, so a file named like a module (seaborn.py, json.py) would run in this "
        "notebook the next time it is imported. Use a folder of its own, e.g. "
        '%config CodeInterpreter.output_dir = "ci_outputs" (the default) or a sub-folder such as '
        f'"results/ci"; {outcome}.'
    )


class Settings(Configurable):
    """The configurable part of ``CodeInterpreter`` (kept separate so it reads as a reference)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Read now, so a refused %config later rolls back to this value rather than to an unset one.
        # A refused CI_MAGIC_OUTPUT_DIR is reported where the folder is first used, like other settings.
        with contextlib.suppress(ConfigurationError):
            self.output_dir  # noqa: B018

    @classmethod
    def class_get_trait_help(
        cls, trait: TraitType[Any, Any], inst: Any = None, helptext: str | None = None
    ) -> str:
        """``%config CodeInterpreter`` prints this per trait, with "Current:" values: never a secret's."""
        secret, url = trait.metadata.get("secret"), trait.metadata.get("url")
        if not secret and not url:
            return super().class_get_trait_help(trait, inst, helptext)
        text = super().class_get_trait_help(trait, None, helptext)
        # The default may come from the environment (CI_MAGIC_MODEL_BASE_URL): not shown either.
        lines = [line for line in text.splitlines() if not line.strip().startswith("Default:")]
        if inst is not None:
            value = getattr(inst, trait.name or "")
            shown = masked(value) if secret else repr(MaskedUrl(value))
            lines.append(indent(f"Current: {shown}"))
        return "\n".join(lines)

    backend = Enum(
        ["openai", "local", "gateway"],
        help="Where code runs: 'openai' (Responses API + Containers), 'local' (a sandbox on this "
        "machine driven by any OpenAI-compatible chat model) or 'gateway' (kernels on Jupyter Kernel/"
        "Enterprise Gateway, same model side as local). Env: CI_MAGIC_BACKEND. Default: openai "
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

    extra_headers = SecretDict(
        value_trait=Unicode(),
        help="Extra HTTP headers on model requests (some Azure gateways need x-model). Env: "
        "CI_MAGIC_EXTRA_HEADERS as JSON or 'name=value,name=value'. Treated as secret (they may carry "
        "credentials): their values are never shown.",
    ).tag(config=True)

    # The static default matters: a refused %config rolls back to it when no value was read yet.
    output_dir = Unicode(
        "ci_outputs",
        help="Folder (relative to the notebook) where generated files are saved. Never the notebook's "
        "folder, a parent of it, or a folder on sys.path. Env: CI_MAGIC_OUTPUT_DIR.",
    ).tag(config=True)

    download_size_cap = Int(
        min=1,
        help="Largest container file (bytes) brought to this machine, by the automatic downloads and "
        "%ci_pull; checked before reading. Env: CI_MAGIC_DOWNLOAD_SIZE_CAP. Default: 256 MB.",
    ).tag(config=True)

    download_turn_budget = Int(
        min=1,
        help="Bytes all automatic downloads of one turn may take together. Env: "
        "CI_MAGIC_DOWNLOAD_TURN_BUDGET. Default: 1 GB.",
    ).tag(config=True)

    delete_container_on_exit = Bool(True, help="Delete the session's container when the kernel exits.").tag(
        config=True
    )

    restore_on_expiry = Enum(
        ["replay", "off"],
        "replay",
        help="When the container is replaced (expired, gone, or its state lost with a kernel restart): "
        "'replay' re-runs the code that ran successfully in the old one, in order, before the turn; "
        "'off' starts empty.",
    ).tag(config=True)

    restore_time_limit = Float(
        60.0,
        help="Seconds the recorded code may have taken for restore_on_expiry to re-run it; longer, and "
        "the state is not restored (a one-line note says so).",
    ).tag(config=True)

    prices = Dict(
        {},
        help="Prices for the cost shown with each turn, merged over ci_magic.costs.DEFAULT_PRICES: "
        '{"model": {"input": $ per 1M tokens, "output": $ per 1M tokens}, "container": {"1g": $ per '
        'minute, ..., "minimum_minutes": 5}}. Defaults: OpenAI\'s published prices (see the README).',
    ).tag(config=True)

    download_concurrency = Int(4, min=0, help="Files downloaded at once after a turn.").tag(config=True)

    max_retries = Int(2, min=0, help="Retries (with backoff) of 429, 5xx and connection errors.").tag(
        config=True
    )

    request_timeout = Float(600.0, help="Seconds before a model request times out.").tag(config=True)

    max_updates_per_second = Float(
        12.0,
        min=0.5,
        max=60.0,
        help="Upper bound on live display updates per second (each display's final redraw is extra).",
    ).tag(config=True)

    auto_push = Bool(
        True, help="Push data-like variables (DataFrames, arrays, figures...) named in the prompt."
    ).tag(config=True)

    always_push = List(Unicode(), help="Files or folders uploaded to every new container.").tag(config=True)

    upload_size_cap = Int(
        512 * 1024 * 1024, help="Largest file (bytes) pushed to a container; checked before upload."
    ).tag(config=True)

    pull_memory_cap = Int(
        1024 * 1024 * 1024,
        help="Largest object (bytes in memory) %ci_pull decodes a file into; estimated from the file's "
        "metadata before decoding, so a small compressed file that would expand past it is refused.",
    ).tag(config=True)

    model_base_url = UrlUnicode(
        help="local backend: base URL of an OpenAI-compatible Chat Completions server "
        "(e.g. http://localhost:11434/v1). Env: CI_MAGIC_MODEL_BASE_URL.",
    ).tag(config=True)

    model_api_key = SecretUnicode(
        help="local backend: API key for the model server, if it needs one. Env: CI_MAGIC_MODEL_API_KEY. "
        "Never shown.",
    ).tag(config=True)

    sandbox_python = Unicode(
        help="local backend: the Python interpreter of the sandbox (default: this kernel's).",
    ).tag(config=True)

    isolation = Enum(
        ["auto", "bwrap", "none"],
        help="local backend: how sandbox code is isolated. 'auto' (default) and 'bwrap' use bubblewrap "
        "and refuse to run code without it; 'none' runs the code as you, with your files, secrets and "
        "network (only for code you trust; every status line then says 'not isolated'). Env: "
        "CI_MAGIC_ISOLATION.",
    ).tag(config=True)

    execution_timeout = Float(120.0, help="local backend: seconds one code execution may run.").tag(
        config=True
    )

    disk_limit = Unicode(
        help="local backend: what a container's /mnt/data may hold, e.g. '2g' or '500m'; code that "
        "writes more is stopped with an error saying so. Default: twice the memory tier. Env: "
        "CI_MAGIC_DISK_LIMIT.",
    ).tag(config=True)

    pool_size = Int(1, min=0, help="local backend: containers kept warm so a new one is ready at once.").tag(
        config=True
    )

    max_steps = Int(12, min=0, help="local backend: tool calls the model may make in one turn.").tag(
        config=True
    )

    tool_choice = Enum(
        ["", "auto", "required", "named", "none"],
        default_value="",
        help="local/gateway: how the model is asked to use the python tool: 'auto', 'required' or "
        "'named' (forced on a turn's first step only), 'none'. Empty: what works with the model server "
        "found at model_base_url (llama-cpp-python: named; llama.cpp, vLLM, Ollama, LM Studio: auto). "
        "Env: CI_MAGIC_TOOL_CHOICE.",
    ).tag(config=True)

    max_tokens = Int(
        0,
        min=0,
        help="local/gateway: most tokens one model answer may have, sent on every request. 0: a quarter "
        "of the model's context, at most 4096. Env: CI_MAGIC_MAX_TOKENS.",
    ).tag(config=True)

    text_tool_calls = Bool(
        True,
        help="local/gateway: run code the model writes as text (a ```python block, or a Hermes "
        "<tool_call>) as a tool call, for models and servers without tool-call parsing.",
    ).tag(config=True)

    context_tokens = Int(
        8192,
        min=512,
        help="local/gateway: the model's context size in tokens, used when the server does not report "
        "it (llama.cpp, vLLM and LM Studio do). The conversation sent is kept within it. "
        "Env: CI_MAGIC_CONTEXT_TOKENS.",
    ).tag(config=True)

    @default("tool_choice")
    def _default_tool_choice(self) -> str:
        return _env_choice("CI_MAGIC_TOOL_CHOICE", "tool_choice", self._choices("tool_choice"), "")

    @default("max_tokens")
    def _default_max_tokens(self) -> int:
        return _env_int("CI_MAGIC_MAX_TOKENS", "max_tokens", 0)

    @default("context_tokens")
    def _default_context_tokens(self) -> int:
        return _env_int("CI_MAGIC_CONTEXT_TOKENS", "context_tokens", 8192, minimum=512)

    gateway_url = UrlUnicode(
        help="gateway backend: base URL of a Jupyter Kernel Gateway or Enterprise Gateway "
        "(e.g. http://gateway-host:8888). Env: CI_MAGIC_GATEWAY_URL.",
    ).tag(config=True)

    gateway_token = SecretUnicode(
        help="gateway backend: the gateway's auth token, sent as 'Authorization: token ...'. "
        "Env: CI_MAGIC_GATEWAY_TOKEN. Never shown.",
    ).tag(config=True)

    gateway_kernel_name = Unicode(
        help="gateway backend: the kernelspec to start (default: the gateway's default kernelspec). "
        "'ci-magic-sandbox' runs kernels in ci-magic's sandbox (see docs/gateway.md). "
        "Env: CI_MAGIC_GATEWAY_KERNEL_NAME.",
    ).tag(config=True)

    def _choices(self, name: str) -> list[str]:
        """The values an Enum setting allows."""
        return list(getattr(self.traits()[name], "values", None) or ())

    @default("backend")
    def _default_backend(self) -> str:
        fallback = "openai" if openai_key_configured() else "local"
        return _env_choice("CI_MAGIC_BACKEND", "backend", self._choices("backend"), fallback)

    _default_model = _env_text("model", "CI_MAGIC_MODEL")

    @default("memory_limit")
    def _default_memory_limit(self) -> str:
        return _env_choice("CI_MAGIC_MEMORY_LIMIT", "memory_limit", list(MEMORY_LIMITS), "1g")

    @default("expires_after_minutes")
    def _default_expiry(self) -> int:
        return _env_int("CI_MAGIC_EXPIRES_MINUTES", "expires_after_minutes", 20, minimum=1, maximum=24 * 60)

    @default("extra_headers")
    def _default_headers(self) -> dict[str, str]:
        text = _env("CI_MAGIC_EXTRA_HEADERS")
        return _parse_headers(text) if text else {}

    @default("output_dir")
    def _default_output_dir(self) -> str:
        chosen = _env("CI_MAGIC_OUTPUT_DIR") or "ci_outputs"
        problem = output_dir_problem(chosen)  # a default skips @validate: check it here too
        if problem is not None:
            raise ConfigurationError(
                output_dir_message(
                    chosen, problem, outcome="fix or unset CI_MAGIC_OUTPUT_DIR, where it came from"
                )
            )
        return chosen

    @default("download_size_cap")
    def _default_download_size_cap(self) -> int:
        return _env_bytes("CI_MAGIC_DOWNLOAD_SIZE_CAP", "download_size_cap", 256 * 1024 * 1024)

    @default("download_turn_budget")
    def _default_download_turn_budget(self) -> int:
        return _env_bytes("CI_MAGIC_DOWNLOAD_TURN_BUDGET", "download_turn_budget", 1024 * 1024 * 1024)

    @validate("output_dir")
    def _check_output_dir(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        problem = output_dir_problem(value)
        if problem is not None:
            raise TraitError(output_dir_message(value, problem))
        return value

    _default_model_base_url = _env_text("model_base_url", "CI_MAGIC_MODEL_BASE_URL")
    _default_model_api_key = _env_text("model_api_key", "CI_MAGIC_MODEL_API_KEY")

    @default("disk_limit")
    def _default_disk_limit(self) -> str:
        return (_env("CI_MAGIC_DISK_LIMIT") or "").strip()

    @validate("disk_limit")
    def _check_disk_limit(self, proposal: dict[str, Any]) -> str:
        from ci_magic.backends.local.budget import parse_size

        text = str(proposal["value"]).strip()
        if text:
            try:
                parse_size(text, what="disk_limit")
            except ConfigurationError as err:
                raise TraitError(str(err)) from None
        return text

    @default("isolation")
    def _default_isolation(self) -> str:
        return (_env("CI_MAGIC_ISOLATION") or "auto").strip().lower()

    _default_gateway_url = _env_text("gateway_url", "CI_MAGIC_GATEWAY_URL")
    _default_gateway_token = _env_text("gateway_token", "CI_MAGIC_GATEWAY_TOKEN")
    _default_gateway_kernel_name = _env_text("gateway_kernel_name", "CI_MAGIC_GATEWAY_KERNEL_NAME")

    @validate("expires_after_minutes")
    def _check_expiry(self, proposal: dict[str, Any]) -> int:
        minutes = int(proposal["value"])
        if not 1 <= minutes <= 24 * 60:
            raise TraitError(
                f"expires_after_minutes must be between 1 and 1440 (OpenAI allows 1-20), not {minutes}"
            )
        return minutes
