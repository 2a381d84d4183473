"""URLs as they may be shown: in errors, logs, status lines and saved notebooks.

A base URL can carry a secret (``http://user:token@host/v1``, ``...?api-key=...``); the request
still uses it whole, but every message shows ``display_url(url)``: scheme, host, port and path.

    display_url("http://me:s3cret@models.local:8080/v1?api-key=k") -> "http://models.local:8080/v1"
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["display_url"]


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
