"""Driving JupyterLab in headless Chromium the way a person does, and reading what the page shows.

Cells are run by clicking them and pressing Shift+Enter, notebooks saved with Ctrl+S; what the
tests assert on is the rendered DOM (text, images, tables, links) plus screenshots. The app object
(``window.jupyterapp``, exposed by ``--LabApp.expose_app_in_browser``) is only asked *when* things
are ready: the kernel is idle, the notebook is saved.

Chromium comes from Debian (``/usr/bin/chromium`` + ``/usr/bin/chromedriver``) and Selenium is told
both paths, so Selenium Manager never downloads a browser or a driver.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "CellView",
    "LabPage",
    "browser_missing",
    "make_driver",
    "wait_for",
]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
T = TypeVar("T")

# One round trip reads everything a test looks at in one cell (the page may change between calls).
_READ_CELL = """
const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]];
if (!cell) return null;
// What an image really drew: its pixels scaled to 24x24 (distinct colours, non-transparent ones, a checksum).
const drawn = (img) => {
  if (!img.naturalWidth) return null;
  try {
    const canvas = document.createElement('canvas');
    canvas.width = 24; canvas.height = 24;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0, 24, 24);
    const data = context.getImageData(0, 0, 24, 24).data;
    const colours = new Set();
    let sum = 0, opaque = 0;
    for (let k = 0; k < data.length; k += 4) {
      colours.add((data[k] << 16) | (data[k + 1] << 8) | data[k + 2]);
      if (data[k + 3] > 0) opaque += 1;
      sum = (sum * 31 + data[k] + 3 * data[k + 1] + 7 * data[k + 2] + 11 * data[k + 3]) % 1000000007;
    }
    return {colours: colours.size, opaque: opaque, checksum: sum};
  } catch (error) {
    return {colours: 0, opaque: 0, checksum: 0, error: String(error)};
  }
};
const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')];
const prompt = cell.querySelector('.jp-InputPrompt');
return {
  prompt: prompt ? prompt.innerText.trim() : '',
  outputs: outputs.map(o => o.innerText),
  code: [...cell.querySelectorAll('.jp-OutputArea-output pre')].map(p => p.innerText),
  images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(i => ({
    src: i.getAttribute('src') || '', width: i.naturalWidth, shown: i.complete && i.naturalWidth > 0
      && i.getBoundingClientRect().width > 0, pixels: drawn(i)})),
  tables: [...cell.querySelectorAll('.jp-OutputArea-output table')].map(t => ({
    rows: t.querySelectorAll('tr').length,
    header: [...t.querySelectorAll('th')].map(h => h.innerText.trim())})),
  links: [...cell.querySelectorAll('.jp-OutputArea-output a')].map(a => ({
    text: a.innerText.trim(), href: a.getAttribute('href') || ''})),
  listItems: [...cell.querySelectorAll('.jp-OutputArea-output li')].map(li => li.innerText.trim()),
  scripts: cell.querySelectorAll('.jp-OutputArea-output script').length,
  svgs: [...cell.querySelectorAll('.jp-OutputArea-output svg')].map(s => s.outerHTML.slice(0, 200)),
  iframes: [...cell.querySelectorAll('.jp-OutputArea-output iframe')].map(f => ({
    sandbox: f.getAttribute('sandbox'), hasSrcdoc: f.hasAttribute('srcdoc')})),
  handlers: [...cell.querySelectorAll('.jp-OutputArea-output *')].flatMap(
    e => [...e.attributes].filter(a => a.name.startsWith('on')).map(a => e.tagName + '[' + a.name + ']')),
};
"""

_KERNEL_STATUS = """
const app = window.jupyterapp;
const widget = app && app.shell.currentWidget;
const kernel = widget && widget.sessionContext && widget.sessionContext.session
  && widget.sessionContext.session.kernel;
return kernel ? kernel.status : null;
"""

_DIRTY = """
const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
return widget && widget.context ? widget.context.model.dirty : null;
"""

_TRUSTED = """
const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const cell = widget && widget.content && widget.content.widgets[arguments[0]];
return cell ? cell.model.trusted : null;
"""

# Time for two animation frames plus a task: long if rendering or the main thread is stuck.
_FRAME_LATENCY = """
const done = arguments[arguments.length - 1];
const start = performance.now();
requestAnimationFrame(() => requestAnimationFrame(
  () => setTimeout(() => done(performance.now() - start), 0)));
"""

# What one cell drew, frame by frame, recorded by the page itself: after each change to the cell, the
# next animation frame (the one that paints it) notes the status line, the code's length and whether
# the cell has finished. Polling from the test misses short phases when one screenshot takes seconds
# on a busy machine; the page's own record does not depend on how fast the test asks.
_RECORD_CELL = """
const index = arguments[0];
const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
const record = {started: performance.now(), shown: []};
(window.__ciRecords = window.__ciRecords || {})[index] = record;
let pending = false;
const note = () => {
  pending = false;
  const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText.trim());
  const prompt = cell.querySelector('.jp-InputPrompt');
  const shown = {
    seconds: (performance.now() - record.started) / 1000,
    status: outputs.find(o => o.startsWith('ci ·')) || '',
    codeChars: [...cell.querySelectorAll('.jp-OutputArea-output pre')]
      .reduce((total, pre) => total + pre.innerText.length, 0),
    executed: /^\\[\\d+\\]:$/.test(prompt ? prompt.innerText.trim() : ''),
  };
  const last = record.shown[record.shown.length - 1];
  if (!last || last.status !== shown.status || last.codeChars !== shown.codeChars
      || last.executed !== shown.executed) {
    record.shown.push(shown);
  }
};
record.observer = new MutationObserver(() => {
  if (!pending) { pending = true; requestAnimationFrame(note); }
});
record.observer.observe(cell, {childList: true, subtree: true, characterData: true});
note();
"""

_RECORDED = """
const record = (window.__ciRecords || {})[arguments[0]];
if (!record) return null;
record.observer.disconnect();
return record.shown;
"""


# Where each image of a cell sits inside the cell's box (CSS pixels), to find it in a screenshot.
_IMAGE_BOXES = """
const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]];
const box = cell.getBoundingClientRect();
return {cell: {width: box.width, height: box.height},
  images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(i => {
    const r = i.getBoundingClientRect();
    return {src: i.getAttribute('src') || '', x: r.left - box.left, y: r.top - box.top,
      width: r.width, height: r.height};
  })};
"""


def browser_missing() -> str | None:
    """Why the browser test cannot run here (a laptop without the Debian packages), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    for module, extra in (("selenium", "selenium"), ("jupyterlab", "jupyterlab")):
        try:
            __import__(module)
        except ImportError:
            return f"{extra} is not installed (pip install -e '.[browser]')"
    return None


def make_driver(profile: Path, *, width: int = 1100, height: int = 2400) -> Any:
    """Headless Chromium with a fresh profile; a tall window so a whole %%ci cell fits a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    return driver


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; the error names ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


@dataclass(frozen=True)
class CellView:
    """What one notebook cell shows right now."""

    prompt: str
    outputs: list[str]
    code: list[str]
    images: list[dict[str, Any]]
    tables: list[dict[str, Any]]
    links: list[dict[str, str]]
    list_items: list[str]
    scripts: int
    svgs: list[str]
    iframes: list[dict[str, Any]]
    handlers: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.outputs)

    @property
    def status(self) -> str:
        """ci-magic's status line (``ci · ...``), or '' before it appears."""
        return next((o.strip() for o in self.outputs if o.strip().startswith("ci ·")), "")

    @property
    def code_chars(self) -> int:
        return sum(len(c) for c in self.code)

    @property
    def executed(self) -> bool:
        """The prompt shows an execution count: ``[3]:`` (``[*]:`` while running, ``[ ]:`` before)."""
        return re.fullmatch(r"\[\d+\]:", self.prompt) is not None


class LabPage:
    """One JupyterLab tab; screenshots go to ``artifacts``."""

    def __init__(self, driver: Any, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)

    def open_notebook(self, url: str, *, timeout: float = 60) -> None:
        """Load the notebook page and wait until its kernel is idle and the cells are drawn."""
        self.driver.get(url)
        wait_for("the notebook's kernel to be idle", lambda: self.kernel_status() == "idle", timeout)
        wait_for("the notebook's cells", lambda: self.cell_count() > 0, timeout)
        # The file browser takes a third of the width; a person reading output would close it too.
        self.driver.execute_script("window.jupyterapp.shell.collapseLeft();")

    def kernel_status(self) -> str | None:
        return self.driver.execute_script(_KERNEL_STATUS)

    def cell_count(self) -> int:
        script = "return document.querySelectorAll('.jp-Notebook .jp-Cell').length"
        return int(self.driver.execute_script(script))

    def cell_element(self, index: int) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[index]

    def read_cell(self, index: int) -> CellView:
        raw = self.driver.execute_script(_READ_CELL, index)
        if raw is None:
            raise AssertionError(f"the notebook has no cell {index} (it has {self.cell_count()})")
        raw["list_items"] = raw.pop("listItems")
        return CellView(**raw)

    def run_cell(self, index: int) -> None:
        """Click the cell's prompt (selects it in command mode) and press Shift+Enter."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        cell = self.cell_element(index)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cell)
        cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
        ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()

    def run_cell_and_wait(self, index: int, *, timeout: float = 60) -> CellView:
        self.run_cell(index)
        return self.wait_until_executed(index, timeout=timeout)

    def wait_until_executed(self, index: int, *, timeout: float = 60) -> CellView:
        def finished() -> CellView | None:
            view = self.read_cell(index)
            return view if view.executed and self.kernel_status() == "idle" else None

        return wait_for(f"cell {index} to finish running", finished, timeout)

    def save(self, *, timeout: float = 20) -> None:
        """Ctrl+S, then wait until the document is no longer dirty."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        wait_for("the notebook to be saved", lambda: self.driver.execute_script(_DIRTY) is False, timeout)

    def reload(self, *, timeout: float = 60) -> None:
        self.driver.refresh()
        wait_for("the notebook's kernel after reload", lambda: self.kernel_status() == "idle", timeout)
        wait_for("the notebook's cells after reload", lambda: self.cell_count() > 0, timeout)
        self.driver.execute_script("window.jupyterapp.shell.collapseLeft();")

    def record_cell(self, index: int) -> None:
        """From now on the page notes each state of the cell it draws (see :meth:`recorded`)."""
        self.driver.execute_script(_RECORD_CELL, index)

    def recorded(self, index: int) -> list[dict[str, Any]]:
        """The states of the cell the page drew since :meth:`record_cell`, oldest first; stops recording.

        Each is ``{"seconds", "status", "codeChars", "executed"}``, kept only when one of them changed."""
        shown = self.driver.execute_script(_RECORDED, index)
        if shown is None:
            raise AssertionError(f"cell {index} was not being recorded")
        return list(shown)

    def frame_latency_ms(self) -> float:
        """Milliseconds until the page has drawn two frames and run a task: high when it is stuck."""
        return float(self.driver.execute_async_script(_FRAME_LATENCY))

    def cell_trusted(self, index: int) -> bool | None:
        """Whether JupyterLab trusts the cell's outputs (trusted HTML may run its scripts)."""
        return self.driver.execute_script(_TRUSTED, index)

    def pwned(self) -> Any:
        """``window.__pwned`` of JupyterLab's page: anything but None means injected script ran."""
        return self.driver.execute_script("return window.__pwned === undefined ? null : window.__pwned;")

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def image_boxes(self, index: int) -> dict[str, Any]:
        """The cell's size and each image's ``src`` and box inside the cell (CSS pixels)."""
        return dict(self.driver.execute_script(_IMAGE_BOXES, index))

    def cell_screenshot(self, index: int, name: str) -> Path:
        """Only the cell (input and outputs), scrolled to the top of the notebook view."""
        cell = self.cell_element(index)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cell)
        time.sleep(0.3)  # let the scroll settle before the pixels are taken
        path = self.artifacts / f"{name}.png"
        cell.screenshot(str(path))
        return path
