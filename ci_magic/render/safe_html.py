"""Making model and sandbox output safe to show in the user's Jupyter origin.

Trusted notebook outputs run with the notebook's privileges (JupyterLab executes ``<script>`` in
trusted HTML), so nothing the model or the sandbox produced may reach the page as live HTML:

- **Model text** (Markdown): rendered with mistune with raw HTML escaped and link targets limited
  to http(s)/mailto/tel/relative paths; the ``text/markdown`` copy gets its raw HTML escaped too
  (``escape_markdown``), because some frontends render that instead of ``text/html``.
- **Sandbox ``text/html``** (DataFrames, styled tables): a strict allow-list sanitizer built on
  ``html.parser`` (``sanitize_html``). Decision: sanitize rather than iframe, because a table then
  sizes to its content, takes the notebook's styling and survives nbconvert and GitHub (both
  strip iframes). It keeps table and text-formatting tags, drops every attribute except a few
  numeric/class ones, drops ``script``/``style``/``iframe``/``svg``... with their content, and
  lets no URL through, so the result can neither run nor load anything.
- **Generated .html/.svg files**: whole documents, shown only inside
  ``<iframe sandbox="" srcdoc=...>`` (no ``allow-scripts``, no ``allow-same-origin``) with a
  Content-Security-Policy that blocks network loads (``sandboxed_iframe``), size-capped.
- **Rich bundles from the sandbox** keep only mime types that cannot carry code (``safe_bundle``).
"""

from __future__ import annotations

import base64
import html
import re
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any

__all__ = [
    "DISPLAYED_MIMES",
    "IFRAME_MAX_BYTES",
    "escape",
    "escape_markdown",
    "markdown_to_html",
    "safe_bundle",
    "sandboxed_iframe",
    "sanitize_html",
    "strip_ansi",
]

IFRAME_MAX_BYTES = 2_000_000
SANITIZE_MAX_CHARS = 2_000_000

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def strip_ansi(text: str) -> str:
    """Text without terminal escape sequences or stray control characters (tracebacks, tqdm)."""
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    return _CONTROL.sub("", text)


# -- model Markdown ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _markdown() -> Any:
    import mistune

    return mistune.create_markdown(escape=True, plugins=["strikethrough", "table", "url"])


def markdown_to_html(text: str) -> str:
    """Markdown as HTML with any raw HTML shown as text and unsafe link targets neutralised."""
    return str(_markdown()(text))


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_SAFE_SCHEMES = ("http", "https", "mailto", "tel")
# A link destination may hold balanced parentheses: javascript:alert(1)
_INLINE_TARGET = re.compile(r"(\]\(\s*)([^\s()]*(?:\([^\s()]*\)[^\s()]*)*)")
_REFERENCE_TARGET = re.compile(r"^( {0,3}\[[^\]]+\]:\s*)(\S+)", re.MULTILINE)
_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")


def escape_markdown(text: str) -> str:
    """Markdown source with raw HTML escaped (outside fenced code) and unsafe link targets replaced.

    Code inside fences stays verbatim; everywhere else ``<`` becomes ``&lt;``, which Markdown shows
    as a literal ``<`` (inline code spans then show the entity: a cosmetic cost accepted for safety,
    since guessing span boundaries wrong would let HTML through).
    """
    out: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None:
            # A backtick fence's info string may not contain backticks (CommonMark 4.5).
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                fence = match.group(1)
                out.append(line.replace("<", "&lt;"))
            else:
                out.append(_neutralise_targets(line.replace("<", "&lt;")))
        else:
            closes = match is not None and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
            if closes and not match.group(2).strip():
                fence = None
            out.append(line)
    return "\n".join(out)


def _neutralise_targets(line: str) -> str:
    def check(match: re.Match[str]) -> str:
        target = html.unescape(match.group(2)).strip().lower()
        target = re.sub(r"[\s\x00-\x1f]", "", target)
        scheme = _SCHEME.match(target)
        if scheme is not None and scheme.group(1) not in _SAFE_SCHEMES:
            return match.group(1) + "#harmful-link"
        return match.group(0)

    return _REFERENCE_TARGET.sub(check, _INLINE_TARGET.sub(check, line))


# -- sandbox HTML ---------------------------------------------------------------------------------

_ALLOWED_TAGS = frozenset(
    {
        "table",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "th",
        "td",
        "caption",
        "colgroup",
        "col",
        "div",
        "span",
        "p",
        "br",
        "hr",
        "b",
        "i",
        "u",
        "em",
        "strong",
        "code",
        "pre",
        "small",
        "sub",
        "sup",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "blockquote",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
    }
)
_VOID_TAGS = frozenset({"br", "hr", "col"})
# Dropped together with everything inside them.
_DROP_TAGS = frozenset(
    {
        "script",
        "style",
        "iframe",
        "frame",
        "frameset",
        "object",
        "embed",
        "applet",
        "svg",
        "math",
        "template",
        "noscript",
        "textarea",
        "select",
        "title",
        "head",
        "audio",
        "video",
        "canvas",
        "xmp",
        "noembed",
        "noframes",
        "plaintext",
    }
)
_ATTRIBUTE_RULES: dict[str, re.Pattern[str]] = {
    "colspan": re.compile(r"\d{1,3}"),
    "rowspan": re.compile(r"\d{1,3}"),
    "border": re.compile(r"\d{1,2}"),
    "class": re.compile(r"[A-Za-z0-9_\- ]{1,100}"),
    "align": re.compile(r"left|right|center|justify", re.IGNORECASE),
    "valign": re.compile(r"top|middle|bottom|baseline", re.IGNORECASE),
}


class _Sanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []  # allowed tags emitted and not yet closed
        self.skipping: list[str] = []  # dropped elements we are inside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_TAGS:
            self.skipping.append(tag)
            return
        if self.skipping or tag not in _ALLOWED_TAGS:
            return
        kept = []
        for name, value in attrs:
            rule = _ATTRIBUTE_RULES.get(name)
            if rule is not None and value is not None and rule.fullmatch(value):
                kept.append(f' {name}="{escape(value)}"')
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in _VOID_TAGS:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_TAGS:
            return
        self.handle_starttag(tag, attrs)
        if tag in self.open and self.open[-1] == tag and tag not in _VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skipping:
            if tag == self.skipping[-1]:
                self.skipping.pop()
            return
        if tag not in self.open:
            return
        # Close anything left open inside it, so the output is always balanced.
        while self.open:
            top = self.open.pop()
            self.out.append(f"</{top}>")
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(html.escape(data, quote=False))

    def result(self) -> str:
        self.close()
        self.out.extend(f"</{tag}>" for tag in reversed(self.open))
        self.open.clear()
        return "".join(self.out)


def sanitize_html(fragment: str) -> str:
    """An allow-listed copy of sandbox HTML (empty when nothing displayable is left, or too big)."""
    if len(fragment) > SANITIZE_MAX_CHARS:
        return ""
    parser = _Sanitizer()
    parser.feed(fragment)
    return parser.result()


# -- whole documents -------------------------------------------------------------------------------

_CSP = (
    '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
    "img-src data:; style-src 'unsafe-inline'; font-src data:\">"
)
_DOCTYPE = re.compile(r"^\s*<!doctype[^>]*>", re.IGNORECASE)


def sandboxed_iframe(document: str, *, title: str, height: int = 420) -> str:
    """A generated HTML/SVG document inside an iframe that can neither script nor reach the origin."""
    doctype = _DOCTYPE.match(document)
    if doctype is not None:
        document = document[: doctype.end()] + _CSP + document[doctype.end() :]
    else:
        document = _CSP + document
    return (
        f'<iframe sandbox="" referrerpolicy="no-referrer" loading="lazy" title="{escape(title)}" '
        f'srcdoc="{escape(document)}" '
        f'style="width:100%;height:{int(height)}px;resize:vertical;border:1px solid #ccc;background:#fff">'
        "</iframe>"
    )


# -- rich outputs from the sandbox ----------------------------------------------------------------

_TAGS = re.compile(r"<[^>]*>")
_PASSTHROUGH = ("image/png", "image/jpeg", "image/gif", "application/json")
DISPLAYED_MIMES = frozenset({*_PASSTHROUGH, "text/html", "text/markdown", "image/svg+xml"})
"""The sandbox mime types ``safe_bundle`` shows (in some safe form) besides ``text/plain``."""


def safe_bundle(bundle: dict[str, object]) -> dict[str, object]:
    """The parts of a sandbox mime bundle that are safe to display here.

    JavaScript, widget views (their model lives in the sandbox) and vendor types that execute
    code (bokeh's exec mime type, for one) are dropped; HTML is sanitized, Markdown escaped, SVG
    shown in a sandboxed iframe. Every result has a ``text/plain``.
    """
    safe: dict[str, object] = {}
    for mime in _PASSTHROUGH:
        value = bundle.get(mime)
        if isinstance(value, str) and mime.startswith("image/"):
            safe[mime] = value.replace("\n", "")
        elif isinstance(value, (bytes, bytearray)) and mime.startswith("image/"):
            safe[mime] = base64.b64encode(value).decode("ascii")
        elif value is not None and mime == "application/json":
            safe[mime] = value
    markdown = bundle.get("text/markdown")
    if isinstance(markdown, str):
        safe["text/markdown"] = escape_markdown(markdown)
    raw_html = bundle.get("text/html")
    if isinstance(raw_html, str):
        clean = sanitize_html(raw_html)
        # Script-only HTML (Plotly, Bokeh) sanitizes to empty tags: fall back to the other types.
        if _TAGS.sub("", clean).strip():
            safe["text/html"] = clean
    elif isinstance(markdown, str):
        safe["text/html"] = markdown_to_html(markdown)
    svg = bundle.get("image/svg+xml")
    if isinstance(svg, str) and "text/html" not in safe and len(svg) <= IFRAME_MAX_BYTES:
        safe["text/html"] = sandboxed_iframe(svg, title="SVG output", height=360)
    plain = bundle.get("text/plain")
    if isinstance(plain, str):
        safe["text/plain"] = strip_ansi(plain)
    else:
        kinds = ", ".join(sorted(bundle)) or "empty"
        safe["text/plain"] = f"[display output: {kinds}]"
    return safe
