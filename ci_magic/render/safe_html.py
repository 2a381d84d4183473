"""Making model and sandbox output safe to show in the user's Jupyter origin.

Trusted notebook outputs run with the notebook's privileges (JupyterLab executes ``<script>`` and
event handlers in trusted HTML), so nothing the model or the sandbox produced may reach the page
as Markdown or HTML that we did not build and sanitize ourselves. Every HTML fragment made from
their text goes through ``nh3`` (the binding to Rust's ammonia, an HTML5 parser-based sanitizer),
never a hand-written filter:

- **Model text and sandbox ``text/markdown``**: rendered to HTML by our own mistune with raw HTML
  escaped, then cleaned with a text allow-list whose links may only be http(s), mailto or relative
  (our local file links) and whose images become links (``markdown_to_html``). It is never passed
  on as ``text/markdown``: JupyterLab, nbconvert and GitHub each parse Markdown differently (a code
  fence inside a list item, a link definition whose destination is on the next line, ``\\:``
  escapes), and any such difference turns escaped text back into live HTML. ``answer_bundle`` is
  the answer's bundle: HTML + plain text.
- **Sandbox ``text/html``** (DataFrames, styled tables): tables and basic formatting only, no
  style, no event attributes, no URLs, only the ``dataframe`` class (``sanitize_html``).
  Decision: sanitize rather than iframe, so a table sizes to its content, takes the notebook's
  styling and survives nbconvert and GitHub (both strip iframes).
- **SVG from the sandbox**: only ever an ``<img src="data:image/svg+xml;base64,...">``; browsers
  draw SVG images in a static mode with no scripts and no loads (``svg_image_html``).
- **Generated .html files**: whole documents, cleaned with a document allow-list and shown only
  inside ``<iframe sandbox="" srcdoc=...>`` (no ``allow-scripts``, no ``allow-same-origin``) with a
  Content-Security-Policy that blocks network loads (``sandboxed_iframe``), size-capped.
- **Rich bundles from the sandbox** keep only mime types that cannot carry code, each in a form we
  built (``safe_bundle``).
- **Everything leaving for the notebook** (``outgoing_bundle``, used by the Jupyter frontend) gets
  one last nh3 pass with the allow-list of what we build ourselves (our styled wrappers, our
  frames): a mistake anywhere upstream cannot put a script, a handler or a ``javascript:`` link on
  the page.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from functools import lru_cache
from typing import Any

import nh3

__all__ = [
    "DISPLAYED_MIMES",
    "IFRAME_MAX_BYTES",
    "IMAGE_MAX_PIXELS",
    "answer_bundle",
    "cap_display_text",
    "escape",
    "escape_markdown",
    "image_pixels",
    "markdown_to_html",
    "outgoing_bundle",
    "safe_bundle",
    "sandboxed_iframe",
    "sanitize_html",
    "strip_ansi",
    "svg_image_html",
]

IFRAME_MAX_BYTES = 2_000_000
SANITIZE_MAX_CHARS = 2_000_000
SVG_MAX_BYTES = 2_000_000
# A few kilobytes of PNG can declare billions of pixels, which the browser then allocates.
IMAGE_MAX_PIXELS = 40_000_000
# One sandbox display's budget, per mime type, so a display cannot carry what the 20 KB log cap
# keeps out of the notebook (a 20 MB text/plain or JSON would otherwise be saved whole).
DISPLAY_TEXT_KEEP_CHARS = 20_000  # text/plain: first and last 20 KB, as a call's logs
DISPLAY_JSON_MAX_CHARS = 200_000  # application/json, serialized: dropped whole above it
DISPLAY_HTML_MAX_CHARS = 1_000_000  # the HTML we built (from HTML, Markdown or SVG)
DISPLAY_IMAGE_MAX_BYTES = 2_000_000  # each raster image, decoded

# Escape sequences in their 7-bit (ESC ...) and 8-bit C1 forms: terminals that honour C1 in
# UTF-8 (xterm) read U+009B as CSI and U+009D as OSC (OSC 52 writes the clipboard).
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-9;?:<=>]*[ -/]*[@-~]"  # CSI
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[@-Z\\-_]"
)
# C0 (but tab, newline, carriage return), DEL, any C1 left over, and bidi controls, which make a
# terminal or a page show text in an order other than its bytes (a command that reads as harmless).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_HAS_SEQUENCE = re.compile(r"[\x1b\x90\x98\x9b\x9d\x9e\x9f]")


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def strip_ansi(text: str) -> str:
    """Text without terminal escape sequences (7- and 8-bit), control or bidi characters."""
    if _HAS_SEQUENCE.search(text):
        text = _ANSI.sub("", text)
    return _CONTROL.sub("", text)


# -- allow-lists ---------------------------------------------------------------------------------

_TEXT_TAGS = frozenset(
    {
        *("p", "br", "hr", "b", "i", "u", "s", "em", "strong", "del", "code", "pre", "small"),
        *("sub", "sup", "ul", "ol", "li", "dl", "dt", "dd", "blockquote", "div", "span"),
        *("h1", "h2", "h3", "h4", "h5", "h6"),
    }
)
_TABLE_TAGS = frozenset({"table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption", "colgroup", "col"})
# Removed together with everything inside them: their content is code, styling or a second
# parsing mode (mutation XSS lives in svg/math/style/template/noscript).
_DROPPED_WITH_CONTENT = frozenset(
    {
        *("script", "style", "svg", "math", "template", "noscript", "iframe", "frame", "frameset"),
        *("object", "embed", "applet", "title", "textarea", "select", "xmp", "noembed", "noframes"),
        *("plaintext", "audio", "video", "canvas", "head"),
    }
)
_CELL_ATTRIBUTES = frozenset({"colspan", "rowspan", "align", "valign"})
_LINK_SCHEMES = frozenset({"http", "https", "mailto"})


def _clean_sandbox_html(fragment: str) -> str:
    return nh3.clean(
        fragment,
        tags=set(_TEXT_TAGS | _TABLE_TAGS),
        clean_content_tags=set(_DROPPED_WITH_CONTENT),
        attributes={"table": {"border"}, "th": set(_CELL_ATTRIBUTES), "td": set(_CELL_ATTRIBUTES)},
        allowed_classes={"table": {"dataframe"}},
        url_schemes=set(),
        strip_comments=True,
        link_rel=None,
    )


def _clean_text_html(fragment: str) -> str:
    """The allow-list for HTML we rendered from Markdown: text, tables and safe links."""
    return nh3.clean(
        fragment,
        tags=set(_TEXT_TAGS | _TABLE_TAGS | {"a"}),
        clean_content_tags=set(_DROPPED_WITH_CONTENT),
        attributes={"a": {"href", "title"}, "ol": {"start"}, "th": {"colspan"}, "td": {"colspan"}},
        url_schemes=set(_LINK_SCHEMES),
        strip_comments=True,
        link_rel="noopener noreferrer nofollow",
    )


# What we build ourselves on top of sanitized pieces: styled wrappers, highlighted code
# (Pygments inline styles), collapsible logs, file links, SVG images, sandboxed frames.
_OWN_TAGS = _TEXT_TAGS | _TABLE_TAGS | {"a", "img", "details", "summary", "iframe"}
_OWN_STYLE_PROPERTIES = {
    *("color", "background", "background-color", "font-weight", "font-style", "font-size"),
    *("text-decoration", "text-align", "vertical-align", "white-space", "line-height"),
    *("border", "border-left", "border-radius", "padding", "margin", "width", "max-width"),
    *("height", "max-height", "overflow", "overflow-x", "resize", "cursor", "display"),
}
_IMAGE_DATA_URL = re.compile(r"data:image/(?:png|jpeg|gif|svg\+xml);base64,[A-Za-z0-9+/=]*")


# Browsers drop ASCII whitespace and C0 controls around a URL and tabs/newlines inside it, and read
# the scheme case-insensitively; the parser has already decoded entities. Checked on that form.
_URL_IGNORED = re.compile(r"[\x00-\x20\x7f]")
_URL_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):")


def _own_attribute(tag: str, attribute: str, value: str) -> str | None:
    # Images may only be data: images we encoded; links only http(s), mailto or relative.
    if tag == "img" and attribute == "src" and not _IMAGE_DATA_URL.fullmatch(value):
        return None
    if tag == "a" and attribute == "href":
        scheme = _URL_SCHEME.match(_URL_IGNORED.sub("", value).lower())
        if scheme is not None and scheme.group(1) not in _LINK_SCHEMES:
            return None
    return value


# ammonia's output quotes every attribute value with " and escapes " inside it, so a start tag is
# exactly this; a frame is ours only with sandbox="" (nh3 only checks that value when present).
_IFRAME = re.compile(r'<iframe((?:\s+[^\s"=>]+(?:="[^"]*")?)*)\s*>.*?</iframe>', re.DOTALL)
_EMPTY_SANDBOX = re.compile(r'\ssandbox=""(?=\s|$)')


def _drop_unsandboxed_frames(cleaned: str) -> str:
    if "<iframe" not in cleaned:
        return cleaned
    kept: list[str] = []
    start = 0
    for frame in _IFRAME.finditer(cleaned):
        # Fail closed: a start tag this pattern does not read (none expected) is left as text.
        kept.append(cleaned[start : frame.start()].replace("<iframe", "&lt;iframe"))
        kept.append(frame.group(0) if _EMPTY_SANDBOX.search(frame.group(1)) else "")
        start = frame.end()
    kept.append(cleaned[start:].replace("<iframe", "&lt;iframe"))
    return "".join(kept)


def _clean_own_html(fragment: str) -> str:
    return _drop_unsandboxed_frames(_nh3_own_html(fragment))


def _nh3_own_html(fragment: str) -> str:
    return nh3.clean(
        fragment,
        tags=set(_OWN_TAGS),
        clean_content_tags=set(_DROPPED_WITH_CONTENT - {"iframe"}),
        attributes={
            "*": {"style", "title"},
            "a": {"href", "target"},
            "img": {"src", "alt"},
            "iframe": {"srcdoc", "referrerpolicy", "loading"},
            "ol": {"start"},
            "table": {"border"},
            "th": set(_CELL_ATTRIBUTES),
            "td": set(_CELL_ATTRIBUTES),
        },
        # A frame is ours only if it allows nothing: sandbox="" exactly, and no src.
        tag_attribute_values={"iframe": {"sandbox": {""}}},
        allowed_classes={"table": {"dataframe"}},
        filter_style_properties=set(_OWN_STYLE_PROPERTIES),
        attribute_filter=_own_attribute,
        url_schemes=set(_LINK_SCHEMES | {"data"}),
        strip_comments=True,
        link_rel="noopener noreferrer",
    )


# -- Markdown from the model or the sandbox ------------------------------------------------------


@lru_cache(maxsize=1)
def _markdown() -> Any:
    import mistune

    class _Renderer(mistune.HTMLRenderer):
        def image(self, text: str, url: str, title: str | None = None) -> str:
            # An image would load a URL the text chose (a tracking beacon, a same-origin GET):
            # show it as a link the user may follow instead.
            return self.link(text or escape(url), url, title)

    return mistune.create_markdown(
        escape=True, renderer=_Renderer(escape=True), plugins=["strikethrough", "table", "url"]
    )


def markdown_to_html(text: str) -> str:
    """Markdown as sanitized HTML: raw HTML shown as text, links only http(s)/mailto/relative."""
    if len(text) > SANITIZE_MAX_CHARS:
        text = text[:SANITIZE_MAX_CHARS]
    return _clean_text_html(str(_markdown()(strip_ansi(text))))


def answer_bundle(text: str) -> dict[str, object]:
    """The model's answer (untrusted: data it read can steer it) as HTML we rendered + plain text."""
    return {"text/html": f"<div>{markdown_to_html(text)}</div>", "text/plain": strip_ansi(text)}


# Every ASCII character that can start or end a Markdown construct (HTML, links, definitions,
# code spans and fences, entities, math, emphasis, tables): escaped, none of them can.
_MARKDOWN_ACTIVE = re.compile(r"([\\`*_{}\[\]()<>#+!|~&$^\"'=:-])")


def escape_markdown(text: str) -> str:
    """Markdown that any CommonMark/GFM parser shows as the literal ``text``: nothing in it is active.

    Prefer ``answer_bundle`` (no ``text/markdown`` at all); this is for a frontend that can only
    take Markdown. Every ASCII punctuation character that Markdown gives meaning to is
    backslash-escaped, so there is no fence, code span, link, HTML or entity for parsers to
    disagree about.
    """
    return _MARKDOWN_ACTIVE.sub(r"\\\1", strip_ansi(text))


# -- sandbox HTML ---------------------------------------------------------------------------------


def sanitize_html(fragment: str) -> str:
    """An allow-listed copy of sandbox HTML (empty when nothing displayable is left, or too big)."""
    if len(fragment) > SANITIZE_MAX_CHARS:
        return ""
    return _clean_sandbox_html(fragment)


# -- whole documents and images -------------------------------------------------------------------

_CSP = (
    '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
    "img-src data:; style-src 'unsafe-inline'; font-src data:\">"
)
_DOCUMENT_TAGS = frozenset(
    nh3.ALLOWED_TAGS | _TEXT_TAGS | _TABLE_TAGS | {"style", "section", "main", "label", "font"}
)


def _clean_document(document: str) -> str:
    # Inside a frame that allows nothing, under a CSP that loads nothing: styling may stay, code
    # and anything that loads or navigates may not.
    return nh3.clean(
        document,
        tags=set(_DOCUMENT_TAGS - {"img", "area", "map"}),
        clean_content_tags=set(_DROPPED_WITH_CONTENT - {"style", "head"}),
        attributes={"*": {"style", "class", "id", "title", "colspan", "rowspan", "align"}, "a": {"href"}},
        url_schemes=set(_LINK_SCHEMES),
        strip_comments=True,
        link_rel="noopener noreferrer",
    )


def sandboxed_iframe(document: str, *, title: str, height: int = 420) -> str:
    """A generated HTML document, cleaned, inside a frame that can neither script nor load anything."""
    cleaned = "<!DOCTYPE html>" + _CSP + _clean_document(document)
    return (
        f'<iframe sandbox="" referrerpolicy="no-referrer" loading="lazy" title="{escape(title)}" '
        f'srcdoc="{escape(cleaned)}" '
        f'style="width:100%;height:{int(height)}px;resize:vertical;border:1px solid #ccc;background:#fff">'
        "</iframe>"
    )


def svg_image_html(svg: bytes, *, alt: str) -> str:
    """SVG as an image: browsers draw it in static mode (no scripts, no loads, no handlers)."""
    data = base64.b64encode(svg).decode("ascii")
    return f'<img src="data:image/svg+xml;base64,{data}" style="max-width:100%" alt="{escape(alt)}">'


# -- rich outputs from the sandbox ----------------------------------------------------------------

_TAGS = re.compile(r"<[^>]*>")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]*")
_RASTER = ("image/png", "image/jpeg", "image/gif")
DISPLAYED_MIMES = frozenset({*_RASTER, "application/json", "text/html", "text/markdown", "image/svg+xml"})
"""The sandbox mime types ``safe_bundle`` shows (in some safe form) besides ``text/plain``."""


def _base64_image(value: object) -> str | None:
    """The image as clean base64, or None when it is not base64 at all (a string meant to break out)."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str) and _BASE64.fullmatch(value):
        compact = re.sub(r"\s", "", value)
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            return None
        return compact
    return None


def image_pixels(data: bytes) -> int | None:
    """The pixel count an image's header declares (None: not an image Pillow knows)."""
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as image:  # the header only
            width, height = image.size
    except PILImage.DecompressionBombError as error:
        # Pillow refuses before saying the size; its message has the count ("Image size (N pixels)").
        declared = re.search(r"\((\d+) pixels\)", str(error))
        return int(declared.group(1)) if declared else IMAGE_MAX_PIXELS + 1
    except Exception:
        return None
    return int(width) * int(height)


def cap_display_text(text: str, keep: int = DISPLAY_TEXT_KEEP_CHARS) -> str:
    """``text`` with only its first and last ``keep`` characters when longer (a note in between)."""
    if len(text) <= 2 * keep:
        return text
    omitted = len(text) - 2 * keep
    return f"{text[:keep]}\n[... {omitted:,} characters not shown ...]\n{text[-keep:]}"


def _json_size(value: object) -> int:
    """The serialized size of a JSON value (the budget's unit), or a huge number when unserializable."""
    import json

    try:
        return len(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError, RecursionError):
        return DISPLAY_JSON_MAX_CHARS + 1


def safe_bundle(bundle: dict[str, object]) -> dict[str, object]:
    """The parts of a sandbox mime bundle that are safe to display here, in forms we built.

    JavaScript, widget views (their model lives in the sandbox), LaTeX and vendor types that
    execute code (bokeh's exec mime type, for one) are dropped. HTML is sanitized; Markdown is
    rendered by us and sanitized, never passed on as Markdown; SVG becomes an image. Every result
    has a ``text/plain``.
    """
    safe: dict[str, object] = {}
    notes: list[str] = []
    for mime in _RASTER:
        image = _base64_image(bundle.get(mime))
        if image is None:
            continue
        # Decoded size from the base64 length, before decoding anything.
        decoded = len(image) * 3 // 4
        if decoded > DISPLAY_IMAGE_MAX_BYTES:
            notes.append(f"[image not shown: {decoded:,} bytes, over the {DISPLAY_IMAGE_MAX_BYTES:,} cap]")
            continue
        pixels = image_pixels(base64.b64decode(image))
        if pixels is not None and pixels > IMAGE_MAX_PIXELS:
            notes.append(f"[image not shown: it declares {pixels:,} pixels]")
            continue
        safe[mime] = image
    if "application/json" in bundle and bundle["application/json"] is not None:
        size = _json_size(bundle["application/json"])
        if size <= DISPLAY_JSON_MAX_CHARS:
            safe["application/json"] = bundle["application/json"]
        else:
            notes.append(f"[JSON not shown: {size:,} characters, over the {DISPLAY_JSON_MAX_CHARS:,} cap]")
    raw_html, markdown, svg = (
        bundle.get("text/html"),
        bundle.get("text/markdown"),
        bundle.get("image/svg+xml"),
    )
    shown = ""
    if isinstance(raw_html, str):
        shown = sanitize_html(raw_html)
        # Script-only HTML (Plotly, Bokeh) sanitizes to empty tags: fall back to the other types.
        if not _TAGS.sub("", shown).strip():
            shown = ""
    if not shown and isinstance(markdown, str):
        shown = markdown_to_html(markdown)
    if not shown and isinstance(svg, (str, bytes)) and len(svg) <= SVG_MAX_BYTES:
        shown = svg_image_html(svg.encode("utf-8") if isinstance(svg, str) else svg, alt="SVG output")
    if len(shown) > DISPLAY_HTML_MAX_CHARS:
        notes.append(f"[HTML not shown: {len(shown):,} characters, over the {DISPLAY_HTML_MAX_CHARS:,} cap]")
        shown = ""
    if shown:
        safe["text/html"] = shown
    plain = bundle.get("text/plain")
    skipped = " ".join(notes)
    if isinstance(plain, str):
        text = cap_display_text(strip_ansi(plain))
        safe["text/plain"] = f"{skipped} {text}" if skipped else text
    elif isinstance(markdown, str):
        text = cap_display_text(strip_ansi(markdown))
        safe["text/plain"] = f"{skipped} {text}" if skipped else text
    else:
        kinds = ", ".join(sorted(bundle)) or "empty"
        safe["text/plain"] = skipped or f"[display output: {kinds}]"
    return safe


# -- the last step before the notebook ------------------------------------------------------------


def outgoing_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """A bundle as it may reach the notebook: HTML cleaned with the allow-list of what we build.

    Its ``text/plain`` (what a console or a notebook's plain view shows) loses any escape
    sequence, control or bidi character. Idempotent and cheap for our own output (ammonia is fast).
    """
    value, plain = bundle.get("text/html"), bundle.get("text/plain")
    cleaned = dict(bundle)
    if isinstance(value, str):
        cleaned["text/html"] = _clean_own_html(value)
    if isinstance(plain, str):
        cleaned["text/plain"] = strip_ansi(plain)
    return cleaned
