"""A person opens the quickstart in JupyterLab (headless Chromium) and watches a %%ci cell.

One visit drives the page like a person would (click a cell, Shift+Enter, Ctrl+S, reload) against
the scripted model server, slowed so streaming is visible, and records what the page showed; each
test then checks one thing the person would notice. Screenshots go to ``test-artifacts/browser/``;
with ``CI_MAGIC_UPDATE_SCREENSHOT=1`` the finished quickstart cell is also copied to
``docs/quickstart.png`` for the README.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell

from tests.browser.lab import CellView, LabPage, browser_missing, make_driver
from tests.browser.processes import JupyterLab, ModelServer
from tests.security.output_payloads import CANARY_FILE, MARKDOWN_PAYLOADS, sandbox_display_code

MISSING = browser_missing()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=f"the JupyterLab browser test needs {MISSING}"),
]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
README_SCREENSHOT = REPO / "docs" / "quickstart.png"
EVENT_DELAY = 0.04  # ~230 events: about 9 s of streaming, time for two screenshots on a busy machine
CELL_TIMEOUT = 120
HOSTILE_PROMPT = "%%ci\nMake me an untrusted page: a small report with a script in it."
# The sandbox's own displays (display_data bundles) exist on the local backend: a second notebook
# runs the payloads there with %%ci_exec, no model involved.
DISPLAYS_NOTEBOOK = "displays.ipynb"
DISPLAYS_CELLS = [
    '%load_ext ci_magic\n%config CodeInterpreter.backend = "local"',
    "%%ci_exec\n" + sandbox_display_code(),
]
MAX_FRAME_LATENCY_MS = 1000


@dataclass(frozen=True)
class Sample:
    """The quickstart cell as seen at one moment while it ran."""

    seconds: float
    status: str
    code_chars: int
    frame_latency_ms: float
    executed: bool


@dataclass(frozen=True)
class Drawn:
    """One state of the quickstart cell the page drew, as the page itself recorded it frame by frame."""

    seconds: float
    status: str
    code_chars: int
    executed: bool


@dataclass
class Visit:
    notebook: Path
    code_cells: list[int]
    quickstart_index: int
    hostile_index: int
    samples: list[Sample] = field(default_factory=list)
    drawn: list[Drawn] = field(default_factory=list)  # every state drawn, however slow the sampling
    streaming_shots: list[tuple[Path, int]] = field(default_factory=list)  # screenshot, code chars then
    quickstart: CellView | None = None
    hostile: CellView | None = None
    pwned_after_run: Any = None
    saved: Any = None  # the .ipynb as written to disk by Ctrl+S
    reloaded_quickstart: CellView | None = None
    reloaded_hostile: CellView | None = None
    pwned_after_reload: Any = None
    trusted: dict[str, bool | None] = field(default_factory=dict)  # the hostile cell's trust, by moment
    chart_boxes: dict[str, Any] = field(default_factory=dict)  # where the images sit in the screenshot
    displays: CellView | None = None  # the local sandbox's display() payloads
    displays_reloaded: CellView | None = None
    displays_pwned: dict[str, Any] = field(default_factory=dict)  # window.__pwned, by moment


def quickstart_notebook(path: Path) -> list[int]:
    """The quickstart's cells up to its first %%ci cell, then a cell whose answer is hostile content.

    Returns the indices of the code cells (the quickstart's %%ci cell is the last but one).
    """
    quickstart = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    first_ci = next(i for i, c in enumerate(quickstart.cells) if c.source.startswith("%%ci"))
    cells = list(quickstart.cells[: first_ci + 1])
    cells.append(new_markdown_cell("## A model that answers with scripts"))
    cells.append(new_code_cell(HOSTILE_PROMPT))
    notebook = nbformat.v4.new_notebook(cells=cells, metadata=quickstart.metadata)
    nbformat.write(notebook, path)
    return [i for i, c in enumerate(cells) if c.cell_type == "code"]


def watch_streaming(page: LabPage, index: int, visit: Visit) -> None:
    """Sample the running cell every ~0.2 s; screenshot it twice, a second apart, while code streams in."""
    start = time.monotonic()
    last_shot = float("-inf")
    while time.monotonic() < start + CELL_TIMEOUT:
        view = page.read_cell(index)
        now = time.monotonic() - start
        latency = page.frame_latency_ms()
        visit.samples.append(Sample(now, view.status, view.code_chars, latency, view.executed))
        if view.executed:
            return
        shots = visit.streaming_shots
        shown = shots[-1][1] if shots else 0
        growing = view.status.startswith("ci · writing code") and view.code_chars > shown
        if len(shots) < 2 and growing and now - last_shot >= 1.0:
            shots.append((page.cell_screenshot(index, f"streaming-{len(shots) + 1}"), view.code_chars))
            last_shot = now
        time.sleep(0.2)
    raise AssertionError(f"the quickstart cell was still running after {CELL_TIMEOUT} s")


@pytest.fixture(scope="module")
def visit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Visit]:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    root = tmp_path_factory.mktemp("lab-root")
    state = tmp_path_factory.mktemp("lab-state")
    notebook = root / "quickstart.ipynb"
    code_cells = quickstart_notebook(notebook)
    displays = nbformat.v4.new_notebook(
        cells=[new_code_cell(c) for c in DISPLAYS_CELLS],
        metadata=nbformat.read(notebook, as_version=4).metadata,
    )
    nbformat.write(displays, root / DISPLAYS_NOTEBOOK)
    result = Visit(notebook, code_cells, quickstart_index=code_cells[-2], hostile_index=code_cells[-1])
    model = ModelServer(ARTIFACTS, event_delay=EVENT_DELAY)
    lab = driver = None
    try:
        lab = JupyterLab(
            root,
            state,
            logs=ARTIFACTS,
            kernel_env={
                "OPENAI_API_KEY": "test",
                # The kernel imports ci_magic from this checkout, whatever else is installed.
                "PYTHONPATH": str(REPO),
                "OPENAI_BASE_URL": model.url,
                "CI_MAGIC_BACKEND": None,
                "CI_MAGIC_OUTPUT_DIR": None,
                "CI_MAGIC_MODEL": None,
                "AZURE_OPENAI_API_KEY": None,
                "AZURE_OPENAI_ENDPOINT": None,
            },
        )
        driver = make_driver(state / "chromium-profile")
        page = LabPage(driver, ARTIFACTS)
        try:
            visit_notebook(page, lab, result)
        except BaseException:
            page.screenshot("failure")
            raise
        yield result
    finally:
        if driver is not None:
            driver.quit()
        if lab is not None:
            lab.stop()
        model.stop()


def visit_notebook(page: LabPage, lab: JupyterLab, visit: Visit) -> None:
    page.open_notebook(lab.notebook_url(visit.notebook.name))
    for index in visit.code_cells[:-2]:  # %load_ext ci_magic and %ci_status
        page.run_cell_and_wait(index, timeout=CELL_TIMEOUT)
    page.record_cell(visit.quickstart_index)
    page.run_cell(visit.quickstart_index)
    watch_streaming(page, visit.quickstart_index, visit)
    visit.drawn = [
        Drawn(shown["seconds"], shown["status"], shown["codeChars"], shown["executed"])
        for shown in page.recorded(visit.quickstart_index)
    ]
    timeline = {
        "sampled": [dataclasses.asdict(sample) for sample in visit.samples],
        "drawn": [dataclasses.asdict(drawn) for drawn in visit.drawn],
    }
    (ARTIFACTS / "quickstart-timeline.json").write_text(json.dumps(timeline, indent=1, ensure_ascii=False))
    visit.quickstart = page.wait_until_executed(visit.quickstart_index, timeout=CELL_TIMEOUT)
    shot = page.cell_screenshot(visit.quickstart_index, "quickstart-output")
    visit.chart_boxes = page.image_boxes(visit.quickstart_index)
    if os.environ.get("CI_MAGIC_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)
    page.screenshot("finished")

    visit.hostile = page.run_cell_and_wait(visit.hostile_index, timeout=CELL_TIMEOUT)
    visit.pwned_after_run = page.pwned()
    visit.trusted["after running"] = page.cell_trusted(visit.hostile_index)
    page.cell_screenshot(visit.hostile_index, "hostile-output")

    page.save()
    visit.saved = nbformat.read(visit.notebook, as_version=4)
    page.reload()
    visit.reloaded_quickstart = page.wait_until_executed(visit.quickstart_index)
    visit.reloaded_hostile = page.wait_until_executed(visit.hostile_index)
    # Images decode asynchronously after a reload: give them a moment before reading again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(i["shown"] for i in visit.reloaded_quickstart.images):
        time.sleep(0.2)
        visit.reloaded_quickstart = page.read_cell(visit.quickstart_index)
    visit.pwned_after_reload = page.pwned()
    visit.trusted["after reloading the saved notebook"] = page.cell_trusted(visit.hostile_index)
    page.screenshot("reloaded")

    page.open_notebook(lab.notebook_url(DISPLAYS_NOTEBOOK))
    page.run_cell_and_wait(0, timeout=CELL_TIMEOUT)
    visit.displays = page.run_cell_and_wait(1, timeout=CELL_TIMEOUT)
    visit.displays_pwned["after running"] = page.pwned()
    page.screenshot("displays")
    page.save()
    page.reload()
    visit.displays_reloaded = page.wait_until_executed(1)
    time.sleep(1)  # handlers of reloaded images fire when they fail to load
    visit.displays_pwned["after reloading the saved notebook"] = page.pwned()


def phase(status: str) -> str:
    """``ci · running call 1 · 3 s`` -> ``running call 1``; the final line keeps its first words."""
    text = status.removeprefix("ci · ")
    return re.sub(r" · \d+ s$", "", text).split(" · ")[0]


def describe(view: CellView | None) -> str:
    return "(cell not read)" if view is None else view.text[-3000:]


# -- while it streams --------------------------------------------------------------------------------


def test_code_grows_on_screen_while_the_cell_streams(visit: Visit) -> None:
    assert len(visit.streaming_shots) == 2, f"two mid-stream screenshots, got {visit.streaming_shots}"
    (first, first_chars), (second, second_chars) = visit.streaming_shots
    assert second_chars > first_chars, "the code view had grown between the two screenshots"
    assert first.read_bytes() != second.read_bytes(), "the two mid-stream screenshots look the same"
    running = [d for d in visit.drawn if not d.executed]
    assert len({d.code_chars for d in running}) >= 5, "the code appeared in several steps, not all at once"


def test_status_line_follows_the_turn_and_ends_with_a_summary(visit: Visit) -> None:
    phases = [phase(d.status) for d in visit.drawn if d.status.startswith("ci ·")]
    distinct = list(dict.fromkeys(phases))
    assert any(p.startswith("writing code") for p in distinct), distinct
    assert any(p.startswith("running call") for p in distinct), distinct
    assert any(p.startswith("writing the answer") for p in distinct), distinct
    assert len(distinct) >= 4, distinct
    assert visit.quickstart is not None
    assert re.match(r"ci · done in \d+\.\d s · 2 calls · [\d,]+ tokens", visit.quickstart.status), (
        visit.quickstart.status
    )


def test_page_stays_responsive_while_streaming(visit: Visit) -> None:
    latencies = [s.frame_latency_ms for s in visit.samples if not s.executed]
    assert len(latencies) >= 10, "the cell streamed long enough to be sampled"
    assert max(latencies) < MAX_FRAME_LATENCY_MS, f"frames + a task took up to {max(latencies):.0f} ms"


# -- when it is done ---------------------------------------------------------------------------------


def test_finished_cell_shows_code_logs_chart_table_link_and_answer(visit: Visit) -> None:
    view = visit.quickstart
    assert view is not None
    text = view.text
    assert 'df["square"] = df["n"] ** 2' in text and "plt.show()" in text, describe(view)
    assert "saved 100 rows to /mnt/data/squares.csv" in text, "the second call's log"
    charts = [i for i in view.images if i["shown"] and i["width"] >= 300]
    assert len(charts) == 1, f"one chart drawn on the page: {view.images}"
    previews = [t for t in view.tables if t["header"][:2] == ["n", "square"]]
    assert previews and previews[0]["rows"] >= 11, f"squares.csv previewed as a table: {view.tables}"
    assert "Rows: 100 (n from 1 to 100)" in view.list_items, f"the answer's Markdown list: {view.list_items}"
    assert "- Rows:" not in text and "[Download" not in text, "Markdown is rendered, not shown as source"
    file_links = [a for a in view.links if a["text"] == "squares.csv"]
    assert file_links and "ci_outputs/squares.csv" in file_links[0]["href"], view.links
    answer_links = [a for a in view.links if a["text"] == "Download squares.csv"]
    assert answer_links and "ci_outputs/squares.csv" in answer_links[0]["href"], view.links
    assert (visit.notebook.parent / "ci_outputs" / "squares.csv").read_text().startswith("n,square")


def test_saved_notebook_holds_plain_final_outputs(visit: Visit) -> None:
    cell = visit.saved.cells[visit.quickstart_index]
    kinds = {o.output_type for o in cell.outputs}
    assert kinds == {"display_data"}, f"only display outputs: {kinds}"
    mimes = [set(o.data) for o in cell.outputs]
    assert not any("application/vnd.jupyter.widget-view+json" in m for m in mimes), "no live widget left"
    assert any("image/png" in m for m in mimes), "the chart is stored"
    html = "\n".join(o.data.get("text/html", "") for o in cell.outputs)
    assert "<table" in html and re.search(r"<td[^>]*>100</td>", html), "the table preview is stored"
    plain = "\n".join(o.data.get("text/plain", "") for o in cell.outputs)
    assert "ci: done in" in plain and "ci: writing" not in plain, "the status line is in its final state"


def test_outputs_are_the_same_after_save_and_reload(visit: Visit) -> None:
    before, after = visit.quickstart, visit.reloaded_quickstart
    assert before is not None and after is not None
    assert after.status == before.status
    assert after.code == before.code
    assert before.images, "the cell had images to reload"
    assert [i["shown"] for i in after.images] == [True] * len(before.images), after.images
    for image_before, image_after in zip(before.images, after.images, strict=True):
        assert image_after["pixels"] is not None and image_after["pixels"]["colours"] > 1, image_after
        assert image_after["pixels"]["opaque"] > 0, image_after
        assert image_after["pixels"] == image_before["pixels"], "the same picture is drawn after reload"
    assert after.tables == before.tables
    assert [a["text"] for a in after.links] == [a["text"] for a in before.links]
    assert after.list_items == before.list_items


def test_quickstart_screenshot_is_written(visit: Visit) -> None:
    from PIL import Image

    shot = ARTIFACTS / "quickstart-output.png"
    with Image.open(shot) as image:
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert width >= 700 and height >= 900, f"the whole cell is in the picture: {width}×{height}"
    assert colours is None or len(colours) > 50, "the picture shows rendered output, not a blank page"


def test_the_screenshot_shows_the_chart_where_the_page_drew_it(visit: Visit) -> None:
    import base64
    import io

    from PIL import Image, ImageChops, ImageStat

    boxes = visit.chart_boxes
    charts = [
        b for b in boxes["images"] if b["src"].startswith("data:image/png;base64,") and b["width"] >= 300
    ]
    assert len(charts) == 1, f"one chart on the page: {boxes}"
    chart = charts[0]
    with Image.open(ARTIFACTS / "quickstart-output.png") as shot:
        scale = shot.width / boxes["cell"]["width"]  # device pixels per CSS pixel
        left, top = round(chart["x"] * scale), round(chart["y"] * scale)
        size = (round(chart["width"] * scale), round(chart["height"] * scale))
        assert top + size[1] <= shot.height, "the chart is inside the screenshot"
        seen = shot.convert("RGB").crop((left, top, left + size[0], top + size[1]))
    drawn = (
        Image.open(io.BytesIO(base64.b64decode(chart["src"].split(",", 1)[1]))).convert("RGB").resize(size)
    )
    difference = ImageStat.Stat(ImageChops.difference(seen, drawn)).mean
    blank = ImageStat.Stat(ImageChops.difference(Image.new("RGB", size, "white"), drawn)).mean
    assert max(difference) < 12, f"the screenshot's pixels there differ from the chart by {difference}"
    assert min(blank) > 2 * max(difference), "the chart is not a blank image that any screenshot would match"


# -- hostile content ---------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["after running", "after reloading the saved notebook"])
def test_scripts_from_the_model_or_its_files_never_run_in_jupyterlab(visit: Visit, moment: str) -> None:
    view, pwned = (
        (visit.hostile, visit.pwned_after_run)
        if moment == "after running"
        else (visit.reloaded_hostile, visit.pwned_after_reload)
    )
    assert view is not None
    assert visit.trusted[moment] is True, "outputs are trusted, so JupyterLab would run scripts in their HTML"
    assert pwned is None, f"window.__pwned = {pwned!r} {moment}: injected script ran in JupyterLab's page"
    assert "Here is the page. <script>window.__pwned = 6</script>" in view.text, (
        "the model's raw HTML is shown as text: " + describe(view)
    )
    assert view.scripts == 0 and view.handlers == [], (view.scripts, view.handlers)
    assert not any(a["href"].lower().startswith("javascript:") for a in view.links), view.links
    assert len(view.iframes) == 1, f"evil.html previewed in a frame: {view.iframes}"
    svg_images = [i for i in view.images if i["src"].startswith("data:image/svg+xml;base64,")]
    assert len(svg_images) == 1 and svg_images[0]["shown"], f"evil.svg shown as a static image: {view.images}"
    assert svg_images[0]["pixels"] and svg_images[0]["pixels"]["opaque"] > 0, "the SVG really drew"
    assert all(f["sandbox"] == "" for f in view.iframes), f"frames allow nothing: {view.iframes}"
    assert "onerror='window.__pwned=101'" in view.text, "the list-fence payload is shown as text"
    assert "javascript:window.__pwned=105" in view.text, "the reference definition is text, not a link"
    assert not (visit.notebook.parent / CANARY_FILE).exists(), (
        "injected code wrote a file through /api/contents"
    )


@pytest.mark.parametrize("moment", ["after running", "after reloading the saved notebook"])
def test_the_sandboxs_own_displays_never_run_script_in_jupyterlab(visit: Visit, moment: str) -> None:
    view = visit.displays if moment == "after running" else visit.displays_reloaded
    assert view is not None
    pwned = visit.displays_pwned[moment]
    assert pwned is None, f"window.__pwned = {pwned!r} {moment}: a sandbox display ran script in JupyterLab"
    assert view.scripts == 0 and view.handlers == [], (view.scripts, view.handlers)
    assert not view.svgs, f"no inline SVG: {view.svgs}"
    assert not any(a["href"].lower().startswith(("javascript:", "data:")) for a in view.links), view.links
    assert "call 1 · done" in view.text, "the attacker's code ran to its end: " + describe(view)
    # The status line, the call, then three displays per payload (some sanitize to nothing visible).
    assert len(view.outputs) >= 2 + 3 * len(MARKDOWN_PAYLOADS), f"every display is there: {len(view.outputs)}"
    assert "window.__pwned=101" in view.text, "Markdown displays show their text: " + describe(view)
    svg_images = [i for i in view.images if i["src"].startswith("data:image/svg+xml;base64,")]
    assert svg_images, f"the displayed SVG, as an image: {view.images}"
    assert all(i["shown"] and i["pixels"] and i["pixels"]["opaque"] > 0 for i in svg_images), svg_images
    assert not (visit.notebook.parent / CANARY_FILE).exists(), (
        "injected code wrote a file through /api/contents"
    )
