"""What an attacker puts where the notebook shows sandbox or model output (issue 9, class 1).

Each payload sets ``window.__pwned`` to a different value if it ever runs, so a failure names the
payload. Most are parser differentials: text that one Markdown parser (ours) reads as harmless and
another (JupyterLab's marked, nbconvert's mistune, GitHub's) reads as raw HTML or a live link.
"""

from __future__ import annotations

__all__ = ["CANARY_FILE", "MARKDOWN_PAYLOADS", "SVG_PAYLOAD", "pwned_values", "sandbox_display_code"]

MARKDOWN_PAYLOADS: dict[str, str] = {
    # JupyterLab closes the fence when the list ends: the next line is raw HTML there.
    "fence opened in a list item": "1. x\n   ```\n<img src=x onerror='window.__pwned=101'>\n",
    "fence opened in a block quote": "> ```\n> quoted\n<img src=x onerror='window.__pwned=102'>\n",
    "indented code, then an HTML block": (
        "    indented code\n<div><img src=x onerror='window.__pwned=103'></div>\n"
    ),
    "HTML block": '<details open ontoggle="window.__pwned=104"><summary>x</summary>y</details>\n',
    "reference definition, destination on the next line": (
        "[read the report][r]\n\n[r]:\n    javascript:window.__pwned=105\n"
    ),
    "escaped colon in a link target": "[report](javascript\\:window.__pwned=106)",
    "entity-encoded scheme": "[report](&#106;avascript:window.__pwned=107)",
    "entity-encoded tab in the scheme": "[report](java&#x09;script:window.__pwned=108)",
    "autolink": "<javascript:window.__pwned=109>",
    "svg with a script": "<svg><script>window.__pwned=110</script></svg>",
    "math/style mutation": (
        "<math><mtext><table><mglyph><style><img src=x onerror='window.__pwned=111'></style></mglyph></table>"
    ),
    "style mutation": "<style><img src=x onerror='window.__pwned=112'></style>",
    "noscript mutation": "<noscript><p title=\"</noscript><img src=x onerror='window.__pwned=113'>\">",
    "comment mutation": "<!--><img src=x onerror='window.__pwned=114'>-->",
    "data URL links": (
        "[d](data:text/html;base64,PHNjcmlwdD50b3AuX19wd25lZD0xMTU8L3NjcmlwdD4=) "
        "![i](data:image/svg+xml,<svg%20onload='window.__pwned=116'>)"
    ),
    "nested Markdown in a table cell": (
        "| a | b |\n|---|---|\n"
        "| <img src=x onerror='window.__pwned=117'> | [l](javascript:window.__pwned=118) |\n"
        "| `x` ```<img src=x onerror='window.__pwned=119'>``` "
        "| <a href='javascript:window.__pwned=120'>a</a> |\n"
    ),
    "entities that decode to markup": "&lt;img src=x onerror='window.__pwned=121'&gt; &#60;script&#62;",
    "iframe with srcdoc": '<iframe srcdoc="<script>parent.__pwned=122</script>"></iframe>',
    # The chain from the issue: a handler that writes a file on the host with the page's XSRF cookie.
    "handler chained to the contents API": (
        "1. y\n   ```\n<img src=x onerror=\"window.__pwned=124;fetch('/api/contents/' + 'pwned.txt', "
        "{method: 'PUT', headers: {'X-XSRFToken': (document.cookie.match(/_xsrf=([^;]+)/) || [])[1] || ''}, "
        "body: JSON.stringify({type: 'file', format: 'text', content: 'pwned'})})\">\n"
    ),
    "form and base": (
        '<base href="javascript:/"><form action="javascript:window.__pwned=123"><button>go</button></form>'
    ),
}

CANARY_FILE = "pwned.txt"
"""What the contents-API payload writes next to the notebook if it ever runs."""

SVG_PAYLOAD = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="60" height="20" onload="top.__pwned=130">'
    '<script>top.__pwned=131</script><rect width="60" height="20" fill="#c33"/></svg>'
)


def pwned_values() -> set[int]:
    """Every value a payload here would write to ``window.__pwned``."""
    import re

    text = "\n".join([*MARKDOWN_PAYLOADS.values(), SVG_PAYLOAD])
    return {int(v) for v in re.findall(r"__pwned=(\d+)", text)}


def sandbox_display_code(table_name: str = "<b onmouseover='window.__pwned=153'>notes<b>.csv") -> str:
    """Sandbox code that shows every payload the three ways a display can, and writes hostile files.

    Each payload goes out as a Markdown-only display, as Markdown beside HTML that sanitizes to
    nothing (the case that got through), and as HTML; then an SVG with scripts, a "PNG" that tries
    to break out of its attribute, a table whose cells and header are payloads, an HTML report.
    """
    import json

    return f"""
import csv
import json
from IPython.display import display
payloads = json.loads({json.dumps(MARKDOWN_PAYLOADS)!r})
for name, text in payloads.items():
    display({{"text/markdown": text, "text/plain": name}}, raw=True)
    display({{"text/html": "<script>window.__pwned=1</script>", "text/markdown": text}}, raw=True)
    display({{"text/html": text, "text/plain": name}}, raw=True)
display({{"image/svg+xml": {SVG_PAYLOAD!r}, "text/plain": "svg"}}, raw=True)
display({{"image/png": 'iVBORw0KGgo=" onerror="window.__pwned=140', "text/plain": "png"}}, raw=True)
with open({table_name!r}, "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["name", "<b onmouseover='window.__pwned=151'>note</b>"])
    rows.writerows(payloads.items())
with open("report.html", "w") as f:
    f.write("<h1>Q1</h1><script>top.__pwned=152</script>" + "".join(payloads.values()))
with open("drawing.svg", "w") as f:
    f.write({SVG_PAYLOAD!r})
print("<script>window.__pwned=160</script> done")
"""
