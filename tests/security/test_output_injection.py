"""Issue 9, class 1: script in the user's Jupyter page, tried as the attacker would.

The attacker controls what the sandbox displays (``display(..., raw=True)`` bundles with
``text/markdown``, ``text/html``, SVG), the names and contents of the files it writes, and, through
the data the model reads, the model's Markdown answer. Each payload goes in where the backends put
it: as events fed to the renderer (as the session does), and through a real notebook (nbclient,
the local backend, a scripted model), whose saved copy is also exported with nbconvert.

For every output the notebook receives: no ``text/markdown`` made from untrusted text reaches it
(another parser would read that text differently), its HTML is a fixed point of a second nh3 pass,
and an HTML parser finds no script, event handler, style element, foreign-content element, or URL
with a scheme other than http(s)/mailto (images: only data: images we encoded); frames only with
``sandbox=""`` and a sanitized ``srcdoc``. The real browser run of the same payloads is in
``tests/test_jupyterlab_browser.py``.
"""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from ci_magic import events
from ci_magic.render.files import file_bundle
from ci_magic.render.live import TurnView
from ci_magic.render.safe_html import outgoing_bundle
from ci_magic.result import SavedFile
from tests.render_support import FakeClock, RecordingFrontend, chunked, play
from tests.security.output_payloads import MARKDOWN_PAYLOADS, SVG_PAYLOAD, sandbox_display_code

SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
URL_ATTRIBUTES = frozenset(
    {
        *("href", "src", "action", "formaction", "xlink:href", "background", "poster", "data"),
        *("cite", "srcset", "ping", "longdesc", "usemap", "codebase", "lowsrc", "dynsrc", "manifest"),
    }
)
# Elements that run code, load or navigate, or switch the parser into another mode.
FORBIDDEN_TAGS = frozenset(
    {
        *("script", "style", "svg", "math", "object", "embed", "applet", "form", "base", "meta"),
        *("link", "frame", "frameset", "template", "noscript", "input", "button", "textarea"),
        *("select", "video", "audio", "source", "portal", "xmp", "noembed", "iframe"),
    }
)
IMAGE_DATA_URL = re.compile(r"data:image/(png|jpeg|gif|svg\+xml);base64,[A-Za-z0-9+/=]*")
SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")
PAYLOAD_IDS = list(MARKDOWN_PAYLOADS)


# -- what the page must never receive ---------------------------------------------------------------


class _Findings(HTMLParser):
    """Every executable construct in a piece of HTML (``document``: a sandboxed frame's srcdoc)."""

    def __init__(self, *, document: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.document = document
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "iframe" and not self.document:
            if values.get("sandbox") != "" or "src" in values:
                self.problems.append(f"a frame that allows something: {attrs}")
            self.problems += [f"in a frame's srcdoc: {p}" for p in findings(values.get("srcdoc", ""), True)]
        elif self.document and tag == "style":
            pass  # a sandboxed frame's own CSS, under a CSP that loads nothing
        elif self.document and tag == "meta" and values.get("http-equiv") == "Content-Security-Policy":
            pass  # ours
        elif tag in FORBIDDEN_TAGS:
            self.problems.append(f"<{tag}>")
        for name, value in values.items():
            if name.startswith("on"):
                self.problems.append(f"handler {tag}[{name}]")
            elif name == "srcdoc" and tag != "iframe":
                self.problems.append(f"srcdoc on <{tag}>")
            elif name in URL_ATTRIBUTES:
                self._check_url(tag, name, value)
            elif name == "style" and re.search(r"url\(|expression|javascript|@import|behavior", value, re.I):
                self.problems.append(f"active style on <{tag}>: {value}")

    handle_startendtag = handle_starttag

    def _check_url(self, tag: str, name: str, value: str) -> None:
        # What a browser sees: whitespace and control characters inside a scheme are ignored.
        url = re.sub(r"[\x00-\x20]", "", value).lower()
        scheme = SCHEME.match(url)
        if scheme is None or scheme.group(1) in SAFE_SCHEMES:
            return
        if tag == "img" and name == "src" and IMAGE_DATA_URL.fullmatch(re.sub(r"\s", "", value)):
            return
        self.problems.append(f"{tag}[{name}] = {value[:80]!r}")


def findings(markup: str, document: bool = False) -> list[str]:
    parser = _Findings(document=document)
    parser.feed(markup)
    parser.close()
    return parser.problems


def assert_inert(markup: str, where: str) -> None:
    problems = findings(markup)
    assert not problems, f"{where}: {problems}\n{markup[:3000]}"


def second_nh3_pass(markup: str) -> str:
    """nh3 with what a notebook output may hold (our own styled wrappers and sandboxed frames included)."""
    import nh3

    return nh3.clean(
        markup,
        tags=set(NOTEBOOK_TAGS),
        clean_content_tags={"script", "style", "svg", "math", "template", "noscript", "object", "embed"},
        attributes={
            "*": {"style", "title"},
            "a": {"href", "target", "rel"},
            "img": {"src", "alt"},
            "iframe": {"sandbox", "srcdoc", "referrerpolicy", "loading"},
            "table": {"border", "class"},
            "th": {"colspan", "rowspan", "align", "valign"},
            "td": {"colspan", "rowspan", "align", "valign"},
            "ol": {"start"},
        },
        url_schemes={"http", "https", "mailto", "data"},
        link_rel=None,
    )


NOTEBOOK_TAGS = frozenset(
    {
        *("div", "span", "p", "br", "hr", "b", "i", "u", "s", "em", "strong", "del", "code", "pre"),
        *("small", "sub", "sup", "ul", "ol", "li", "dl", "dt", "dd", "blockquote", "a", "img"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "details", "summary", "iframe"),
        *("table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption", "colgroup", "col"),
    }
)


def assert_final_html_is_clean(markup: str, where: str) -> None:
    """HTML as the notebook holds it: inert, and already what a second nh3 pass leaves."""
    assert_inert(markup, where)
    again = second_nh3_pass(markup)
    assert again == markup, (
        f"{where}: a second nh3 pass changed the HTML, so no first pass ran\n{markup[:2000]}"
    )


def assert_markdown_inert(markdown: str, where: str) -> None:
    """Markdown that every parser we can run shows as text: no HTML, no links, no images."""
    import mistune
    from markdown_it import MarkdownIt
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    for parser, rendered in (
        ("CommonMark (markdown-it, GFM tables)", MarkdownIt("commonmark").enable("table").render(markdown)),
        ("mistune with raw HTML", str(mistune.html(markdown))),
        ("nbconvert", markdown2html_mistune(markdown)),
    ):
        assert_inert(rendered, f"{where}, as {parser} renders its text/markdown")
        tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", rendered))
        assert tags <= {"p", "br", "pre", "code", "ol", "ul", "li", "h1", "h2", "h3", "hr", "em", "strong"}, (
            f"{where}: the text/markdown copy has markup in {parser}: {tags}\n{rendered[:2000]}"
        )


def assert_no_untrusted_markdown(bundle: dict[str, Any], where: str) -> None:
    assert "text/markdown" not in bundle, (
        f"{where}: sandbox text reached the notebook as text/markdown: {bundle.get('text/markdown')!r}"
    )


# -- through the renderer, as the session feeds it ------------------------------------------------


def render(
    collected: list[events.Event], tmp_path: Path, files: tuple[SavedFile, ...] | list[SavedFile] = ()
) -> RecordingFrontend:
    clock = FakeClock()
    frontend = RecordingFrontend(clock)
    view = TurnView(frontend, clock=clock)
    result = play([*collected, events.Completed()], view, clock)
    result.files = list(files)
    view.finish(result, link_base=tmp_path)
    return frontend


def check_page(frontend: RecordingFrontend, where: str) -> None:
    """Every display and every live update the page received, before and after the last door."""
    for slot in frontend.slots:
        for bundle in [*slot.history, slot.bundle]:
            if slot.role == "text":  # the model's answer: see test_the_models_answer_...
                continue
            assert_no_untrusted_markdown(bundle, where)
            markup = bundle.get("text/html")
            if isinstance(markup, str):
                assert_inert(markup, where)
                assert_final_html_is_clean(outgoing_bundle(bundle)["text/html"], where)


def sandbox_call(*outputs: events.Event) -> list[events.Event]:
    return [
        events.CallStarted("c1"),
        events.CodeDone("c1", "display(payload)"),
        events.CallStatus("c1", "running"),
        *outputs,
    ]


@pytest.mark.parametrize("name", PAYLOAD_IDS)
def test_a_sandbox_markdown_display_reaches_the_page_only_as_html_we_rendered(
    name: str, tmp_path: Path
) -> None:
    payload = MARKDOWN_PAYLOADS[name]
    collected = sandbox_call(
        events.RichOutput("c1", {"text/markdown": payload, "text/plain": "md"}),
        # HTML that sanitizes to nothing: the Markdown copy must not take its place as Markdown.
        events.RichOutput("c1", {"text/html": "<script>window.__pwned=1</script>", "text/markdown": payload}),
        events.RichOutput("c1", {"text/html": payload, "text/markdown": payload, "text/plain": "both"}),
        events.RichOutput("c1", {"text/markdown": "## progress 1", "text/plain": "p"}, display_id="d"),
        events.RichOutput("c1", {"text/markdown": payload, "text/plain": "p"}, display_id="d", update=True),
        events.Logs("c1", payload, "stdout"),
    )
    frontend = render(collected, tmp_path)
    check_page(frontend, name)
    shown = [b for b in frontend.bundles() if b.get("text/plain") == "md"]
    assert shown and "text/html" in shown[0], "a Markdown display is still shown, as HTML we rendered"


@pytest.mark.parametrize("name", PAYLOAD_IDS)
def test_the_models_answer_cannot_carry_markup_into_the_notebook(name: str, tmp_path: Path) -> None:
    link = "Saved [report.csv](sandbox:/mnt/data/report.csv)."
    answer = f"Here is the summary.\n\n{MARKDOWN_PAYLOADS[name]}\n\n{link}"
    collected: list[events.Event] = [events.TextDelta(piece) for piece in chunked(answer, 5)] + [
        events.TextDone(answer)
    ]
    frontend = render(collected, tmp_path)
    texts = [slot for slot in frontend.slots if slot.role == "text"]
    assert texts
    for slot in texts:
        for bundle in [*slot.history, slot.bundle]:
            assert_inert(bundle["text/html"], f"{name}: the answer")
            assert_final_html_is_clean(outgoing_bundle(bundle)["text/html"], f"{name}: the answer")
            if "text/markdown" in bundle:
                assert_markdown_inert(bundle["text/markdown"], f"{name}: the answer")
    assert "Here is the summary." in texts[-1].bundle["text/html"]


def test_svg_and_image_displays_are_images_that_cannot_script(tmp_path: Path) -> None:
    broken_out = 'iVBORw0KGgo=" onerror="window.__pwned=140'
    collected = sandbox_call(
        events.RichOutput("c1", {"image/svg+xml": SVG_PAYLOAD, "text/plain": "<Figure>"}),
        events.RichOutput("c1", {"image/png": broken_out, "text/plain": "png"}),
        events.Image("c1", SVG_PAYLOAD.encode(), "image/svg+xml"),
    )
    frontend = render(collected, tmp_path)
    check_page(frontend, "svg and png displays")
    everything = json.dumps(frontend.bundles())
    assert "onerror" not in everything and "image/svg+xml" not in {m for b in frontend.bundles() for m in b}
    shown = "\n".join(str(b.get("text/html", "")) for b in frontend.bundles())
    svg_images = re.findall(r'<img src="data:image/svg\+xml;base64,', shown)
    assert len(svg_images) == 2, "both SVGs are shown, as images"


HOSTILE_NAME = "<img src=x onerror=window.__pwned=150>[x](javascript:alert(1)).csv"


def _save(folder: Path, name: str, data: bytes) -> SavedFile:
    path = folder / name
    path.write_bytes(data)
    return SavedFile(name, path, f"/mnt/data/{name}", "", len(data), True)


def test_file_names_cells_and_documents_from_the_sandbox_stay_inert(tmp_path: Path) -> None:
    out = tmp_path / "ci_outputs"
    out.mkdir()
    cells = [payload.replace("\n", " ").replace('"', "'") for payload in MARKDOWN_PAYLOADS.values()]
    csv = '"<b onmouseover=window.__pwned=151>col</b>",other\n' + "".join(f'"{c}",1\n' for c in cells)
    report = (
        "<!doctype html><html><head><style>h1{color:red}</style></head><body><h1>Q1</h1>"
        "<script>top.__pwned=152</script><img src=x onerror='top.__pwned=153'>"
        "<a href='javascript:top.__pwned=154'>more</a>"
        + "".join(MARKDOWN_PAYLOADS.values())
        + "</body></html>"
    )
    files = [
        _save(out, HOSTILE_NAME, csv.encode()),
        _save(out, "report.html", report.encode()),
        _save(out, "drawing.svg", SVG_PAYLOAD.encode()),
        _save(out, "cells.json", json.dumps({"<script>x</script>": cells}).encode()),
        _save(out, "<svg onload=window.__pwned=155>.bin", b"\0"),
    ]
    frontend = render(sandbox_call(events.Logs("c1", "wrote files\n", "stdout")), tmp_path, files)
    check_page(frontend, "file previews")
    for saved in files:
        bundle = file_bundle(saved, link_base=tmp_path)
        assert_no_untrusted_markdown(bundle, saved.name)
        assert_final_html_is_clean(outgoing_bundle(bundle)["text/html"], saved.name)
    preview = file_bundle(files[0], link_base=tmp_path)["text/html"]
    visible = html.unescape(re.sub(r"<[^>]+>", "", preview))
    assert HOSTILE_NAME in visible, "the hostile file name is still shown, as text"


# -- through a real notebook ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_notebook_and_its_nbconvert_export_hold_no_live_markup(chat_server, tmp_path: Path) -> None:
    from nbconvert import HTMLExporter

    from tests.notebook_support import kernel_env, local_env, output_text, run_cells
    from tests.servers.chat_server import Reply

    answer = "\n\n".join(
        ["I made the report.", *MARKDOWN_PAYLOADS.values(), "[report](sandbox:/mnt/data/report.html)"]
    )
    code = sandbox_display_code()
    server = chat_server([Reply.calls(code), Reply(text=answer)])
    env = local_env(CI_MAGIC_MODEL_BASE_URL=server.base_url, CI_MAGIC_MODEL=None, CI_MAGIC_OUTPUT_DIR=None)
    with kernel_env(**env):
        notebook = run_cells(
            ["%load_ext ci_magic", "%%ci\nSummarize the pasted web page."],
            tmp_path,
            timeout=180,
            save_as="saved.ipynb",
        )
    cell = notebook.cells[1]
    assert not [o for o in cell.outputs if o.output_type == "error"], output_text(cell)
    assert "done" in output_text(cell) and "I made the report." in output_text(cell)
    assert "── error ──" not in output_text(cell), "the attacker's code ran to its end: " + output_text(cell)
    saved = json.loads((tmp_path / "saved.ipynb").read_text())["cells"][1]["outputs"]
    answers = [o for o in saved if "I made the report." in "".join(o.get("data", {}).get("text/plain", ""))]
    assert len(answers) == 1
    displays = 0
    for output in saved:
        data = {mime: "".join(v) if isinstance(v, list) else v for mime, v in output.get("data", {}).items()}
        where = f"saved output {data.get('text/plain', '')[:60]!r}"
        if data.get("text/plain") in {*MARKDOWN_PAYLOADS, *MARKDOWN_PAYLOADS.values()}:
            displays += 1  # one of the sandbox's display() calls
            assert_no_untrusted_markdown(data, where)
        if "text/markdown" in data:  # the answer's copy, if any: nothing in it may be active
            assert_markdown_inert(data["text/markdown"], where)
        if "text/html" in data:
            assert_final_html_is_clean(data["text/html"], where)
    assert displays == 3 * len(MARKDOWN_PAYLOADS), "every display() of the sandbox reached the notebook"
    shown = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in saved)
    assert "ontoggle" in shown and "data:image/svg+xml;base64," in shown, (
        "the payloads are shown, as text and images"
    )

    exported, _ = HTMLExporter(template_name="basic").from_filename(str(tmp_path / "saved.ipynb"))
    # The basic template adds no markup of its own: whatever is live in the export came from us.
    problems = findings(exported)
    assert not problems, f"nbconvert's HTML export has live markup: {problems}"
    assert "<script" not in exported, "no script in the export"
