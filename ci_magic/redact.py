"""URLs as they may be shown: in errors, logs, status lines and saved notebooks.

A base URL can carry a secret (``http://user:token@host/v1``, ``...?api-key=...``); the request
still uses it whole, but every message shows ``display_url(url)``: scheme, host, port and path;
a setting's own display (``%config``) shows ``masked_url(url)``, the same URL with its secrets masked.

    display_url("http://me:s3cret@models.local:8080/v1?api-key=k") -> "http://models.local:8080/v1"
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["display_url", "masked_url"]


def display_url(url: object) -> str:
    """``url`` without user, password, query or fragment (anything that may hold a secret)."""
    text = str(url)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a malformed port or bracket: show nothing that could be a secret
        return "<unparseable URL>"
    if not parts.netloc:  # not a full URL ("user:pass@host/v1"): drop userinfo, query, fragment
        return text.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal: brackets back on
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# Query parameters that carry credentials (Azure's api-key, SAS sig, token=, key=, ...).
_SECRET_QUERY_KEY = re.compile(r"key|token|sig|secret|pass|auth|credential|session", re.IGNORECASE)


def masked_url(url: str) -> str:
    """``url`` as it may be shown: a userinfo password (or a lone user, often a token) and
    credential-like query values become ``<secret>``; scheme, host, port and path stay readable."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<secret>" if url else ""
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _password = userinfo.partition(":")
        netloc = f"{user}:<secret>@{host}" if has_password else f"<secret>@{host}"
    query = "&".join(
        f"{name}=<secret>" if sep and _SECRET_QUERY_KEY.search(unquote(name)) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    )
    fragment = "<secret>" if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", fragment))
