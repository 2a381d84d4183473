"""Jupyter kernel messages as ci-magic events: the translation every kernel-driving backend shares.

Pure functions over message dicts (``header``, ``parent_header``, ``content``), whichever way the
message arrived: zmq through jupyter_client (the local sandbox) or a gateway's WebSocket channels.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Literal

from ci_magic.events import Event, ExecutionError, Image, Logs, RichOutput

__all__ = ["ANSI", "MAX_TEXT", "bounded_text", "events_from_message", "idle_after"]

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Characters of one event: a longer stream message becomes several events, a longer traceback is
# cut (head and tail kept). The renderer shows 20 KB of a call's logs anyway, the model reads less.
MAX_TEXT = 2 << 20


def bounded_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` with its middle cut out when longer than ``limit`` (head and tail kept)."""
    if not isinstance(text, str):
        text = str(text)
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}\n[... {len(text) - 2 * keep:,} characters cut ...]\n{text[-keep:]}"


def events_from_message(msg: dict[str, Any], call_id: str) -> list[Event]:
    """One iopub message as events (status, execute_input and clear_output carry none)."""
    kind = msg["header"]["msg_type"]
    content = msg.get("content", {})
    if kind == "stream":
        # Nothing printed is cut here (a fast loop fills one message with megabytes): the message's
        # size is bounded by the socket (MAXMSGSIZE), a call's log in memory by ``LogText``.
        text = content.get("text", "")
        text = text if isinstance(text, str) else str(text)
        stream: Literal["stdout", "stderr"] = "stderr" if content.get("name") == "stderr" else "stdout"
        return [
            Logs(call_id=call_id, text=text[start : start + MAX_TEXT], stream=stream)
            for start in range(0, max(len(text), 1), MAX_TEXT)
        ]
    if kind in ("display_data", "execute_result", "update_display_data"):
        data = dict(content.get("data") or {})
        if not data:
            return []
        display_id = (content.get("transient") or {}).get("display_id")
        update = kind == "update_display_data"
        png = data.get("image/png")
        if isinstance(png, str) and display_id is None:
            # A plain figure: the image itself; its text/plain is only "<Figure size ...>".
            return [Image(call_id=call_id, data=base64.b64decode(png), mime="image/png")]
        return [RichOutput(call_id=call_id, bundle=data, display_id=display_id, update=update)]
    if kind == "error":
        traceback = ANSI.sub("", bounded_text("\n".join(map(str, content.get("traceback") or []))))
        return [
            ExecutionError(
                call_id=call_id,
                name=bounded_text(content.get("ename", "Error"), 200),
                value=bounded_text(content.get("evalue", ""), 1 << 16),
                traceback=traceback,
            )
        ]
    return []


def idle_after(msg: dict[str, Any], msg_id: str) -> bool:
    """True for the status message that ends request ``msg_id`` (its outputs all came before it)."""
    return (
        msg["parent_header"].get("msg_id") == msg_id
        and msg["header"]["msg_type"] == "status"
        and msg["content"].get("execution_state") == "idle"
    )
