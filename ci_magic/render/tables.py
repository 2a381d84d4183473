"""Small key/value and row tables as mime bundles (``%ci_status``, ``%ci_files``)."""

from __future__ import annotations

import html
from collections.abc import Sequence

__all__ = ["rows_bundle"]


def rows_bundle(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> dict[str, str]:
    """A table as text/html (escaped) and aligned text/plain, so every frontend shows it."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    lines = [title]
    if any(header):
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    head = (
        "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header) if any(header) else ""
    )
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in cells
    )
    table = (
        f"<div><strong>{html.escape(title)}</strong>"
        f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table></div>"
    )
    return {"text/plain": "\n".join(lines), "text/html": table}
