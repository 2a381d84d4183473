"""The renderer: what a user sees while a turn streams and what stays in the cell afterwards."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
from pathlib import Path

import pytest

from ci_magic import events
from ci_magic.render.files import file_bundle
from ci_magic.render.frontend import JupyterFrontend, TerminalFrontend, detect_frontend
from ci_magic.render.live import TurnView
from ci_magic.result import SavedFile
from tests.render_support import (
    CHART_CODE,
    RECORDING,
    FakeClock,
    RecordingFrontend,
    chart_turn,
    chunked,
    openai_recording_events,
    play,
    png_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"<\s*/?\s*[a-zA-Z]")


def save(folder: Path, name: str, data: bytes, *, file_id: str = "", cited: bool = True) -> SavedFile:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return SavedFile(name, path, f"/mnt/data/{name}", file_id, len(data), cited)


def visible_text(markup: str) -> str:
    """What a browser would show as text (tags removed, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def live_view(rate: float = 15.0, quiet: bool = False) -> tuple[TurnView, RecordingFrontend, FakeClock]:
    clock = FakeClock()
    frontend = RecordingFrontend(clock)
    return TurnView(frontend, quiet=quiet, max_updates_per_second=rate, clock=clock), frontend, clock


def max_messages_in_any_second(times: list[float]) -> int:
    return max((sum(1 for t in times if start <= t < start + 1.0) for start in times), default=0)


# -- live updates are throttled --------------------------------------------------------------------


def test_hundreds_of_deltas_at_full_speed_cost_a_bounded_number_of_display_updates() -> None:
    view, frontend, clock = live_view(rate=15)
    code = "".join(f"value_{i} = {i} * 2\n" for i in range(120))
    answer = "The values double each time. " * 40
    collected: list[events.Event] = [events.TurnStarted("resp_1", "gpt-5"), events.CallStarted("c1")]
    collected += [events.CodeDelta("c1", piece) for piece in chunked(code, 6)]
    collected += [events.CodeDone("c1", code), events.CallStatus("c1", "completed")]
    collected += [events.TextDelta(piece) for piece in chunked(answer, 4)]
    collected.append(events.Completed())
    deltas = sum(isinstance(e, (events.CodeDelta, events.TextDelta)) for e in collected)
    assert deltas > 600

    result = play(collected, view, clock, step=0.002)  # ~500 events a second: faster than any model
    live_messages = [t for _, t in frontend.messages]
    elapsed = result.wall_time
    view.finish(result)

    assert len(live_messages) <= 15 * elapsed + 3, (len(live_messages), elapsed)
    assert max_messages_in_any_second(live_messages) <= 20
    block = next(s for s in frontend.slots if s.role == "stream")
    assert block.updates >= 5, "the code should visibly stream, not appear at the end"
    assert code.rstrip() in block.bundle["text/plain"]
    assert len(frontend.messages) < deltas / 10


def test_the_status_line_follows_the_turn_and_ends_with_a_summary() -> None:
    view, frontend, clock = live_view()
    result = play(chart_turn(png_bytes()), view, clock, step=0.05)
    view.finish(result)
    status = next(s for s in frontend.slots if s.role == "status")
    seen = " | ".join(str(b["text/plain"]) for b in [*status.history, status.bundle])
    for phase in ("writing code (call 1)", "running call 1", "writing the answer", "done in"):
        assert phase in seen
    assert re.search(r"writing code \(call 1\) · \d+ s", seen), "the live status shows elapsed time"
    final = status.bundle["text/plain"]
    assert final == f"ci: done in {result.wall_time:.1f} s · 1 call · 1,500 tokens (1,200 in, 300 out)"
    assert status is frontend.slots[0], "the status line sits above the outputs"


def test_tick_shows_held_back_changes_when_the_stream_pauses() -> None:
    view, frontend, clock = live_view(rate=10)
    view.handle(events.CallStarted("c1"))
    view.handle(events.CodeDelta("c1", "x = 1\n"))
    view.handle(events.CodeDelta("c1", "y = 2\n"))  # same instant: held back by the budget
    block = next(s for s in frontend.slots if s.role == "stream")
    assert "y = 2" not in block.bundle["text/plain"]
    clock.advance(0.5)
    view.tick()
    assert "y = 2" in block.bundle["text/plain"]


LONG_CODE = (
    '''import pandas as pd


def load(path):
    """Read the sales file.

    x = 1  (inside the docstring: still a string)
    """
    return pd.read_parquet(path)

QUERY = """
SELECT month, SUM(revenue)
FROM sales
"""

@lru_cache
def total(frame):
    return frame["revenue"].sum()
'''
    * 8
)


def test_long_code_streams_highlighted_exactly_as_if_highlighted_at_once() -> None:
    from pygments import highlight

    from ci_magic.render.live import _FORMATTER, _LEXER

    view, frontend, clock = live_view()
    collected = [
        events.CallStarted("c1"),
        *[events.CodeDelta("c1", p) for p in chunked(LONG_CODE, 5)],
        events.Completed(),
    ]
    view.finish(play(collected, view, clock, step=0.004))
    block = frontend.slots[1]
    assert len(block.history) > 10
    for shown in [b["text/html"] for b in block.history] + [block.bundle["text/html"]]:
        code = visible_text(shown.split("</div>", 1)[1])
        if not code:
            continue  # the block opens empty as soon as the call starts
        assert shown.endswith(highlight(code.rstrip("\n"), _LEXER, _FORMATTER) + "</pre></div>")


# -- the recorded OpenAI turn ----------------------------------------------------------------------


@pytest.mark.skipif(not RECORDING.exists(), reason=f"the genuine OpenAI recording is not here: {RECORDING}")
def test_the_recorded_openai_turn_shows_each_call_its_logs_and_the_answer_linked_to_local_files(
    tmp_path: Path,
) -> None:
    view, frontend, clock = live_view()
    collected = list(openai_recording_events())
    result = play(collected, view, clock, step=0.01, prompt="roll two dice 10,000 times")
    live = len(frontend.messages)
    rows = "sum\n" + "".join(f"{(i * 7) % 11 + 2}\n" for i in range(10_000))
    output = tmp_path / "ci_outputs"
    result.files = [save(output, "roll2dice_sums_10000.csv", rows.encode(), file_id="cfile_68c2e7084ab4")]
    view.finish(result, link_base=tmp_path)

    assert live <= 15 * result.wall_time + 3
    blocks = [s.bundle for s in frontend.slots if s.role == "stream"]
    assert len(blocks) == len(result.calls) == 3
    for call, bundle in zip(result.calls, blocks, strict=True):
        assert call.code.rstrip() in bundle["text/plain"]
        assert call.code.rstrip() in visible_text(bundle["text/html"])
        assert call.logs in visible_text(bundle["text/html"])
        assert "call" in bundle["text/html"] and "done" in bundle["text/html"]
    answer = next(s.bundle for s in frontend.slots if s.role == "text")
    assert 'href="ci_outputs/roll2dice_sums_10000.csv"' in answer["text/html"]
    assert "sandbox:" not in answer["text/html"] and "sandbox:" not in answer["text/plain"]
    assert set(answer) == {"text/html", "text/plain"}, "the model's answer never goes out as Markdown"
    table = frontend.slots[-1].bundle
    assert table["text/plain"].startswith("table roll2dice_sums_10000.csv (")
    assert "10,000 rows × 1 columns" in table["text/html"]
    assert "ci: done in" in frontend.slots[0].bundle["text/plain"]
    assert "7,670 tokens" in frontend.slots[0].bundle["text/plain"]


# -- nothing the model or sandbox writes can run in the notebook -----------------------------------


def test_html_in_the_models_answer_is_shown_as_text_not_run() -> None:
    view, frontend, clock = live_view()
    answer = (
        "Done. <script>window.__pwned=1</script>\n\n"
        '<svg onload="window.__pwned=2"><circle r="5"/></svg>\n\n'
        "[click me](javascript:window.__pwned=3) and <img src=x onerror=alert(1)>\n\n"
        "```python\nif a < b:\n    print('<ok>')\n```"
    )
    result = play(
        [events.TextDelta(p) for p in chunked(answer, 7)] + [events.TextDone(answer), events.Completed()],
        view,
        clock,
    )
    view.finish(result)
    bundle = next(s.bundle for s in frontend.slots if s.role == "text")
    shown = bundle["text/html"]
    assert "<script" not in shown and "<svg" not in shown and "<img" not in shown
    assert "javascript:" not in shown.lower()
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in shown
    assert "window.__pwned=1" in visible_text(shown), "the text itself stays readable"
    assert "if a &lt; b:" in shown
    # Markdown parsers disagree (tests/security/test_output_injection.py): the answer has no Markdown
    # copy for a frontend's parser to read differently, only our HTML and the text as is.
    assert "text/markdown" not in bundle, bundle
    assert "<script>window.__pwned=1</script>" in bundle["text/plain"]


def test_markdown_escaping_leaves_nothing_active_and_broken_html_is_closed() -> None:
    from ci_magic.render.safe_html import escape_markdown, sanitize_html

    not_a_fence = "```a`b\n<script>x()</script>\n```"
    assert escape_markdown(not_a_fence) == "\\`\\`\\`a\\`b\n\\<script\\>x\\(\\)\\</script\\>\n\\`\\`\\`"
    assert escape_markdown("a \\<b>") == "a \\\\\\<b\\>", "a backslash in the text cannot cancel our escape"
    unclosed = "<table><tr><td>a<svg><g><script>x()</script></g></svg>b"
    assert sanitize_html(unclosed) == "<table><tbody><tr><td>ab</td></tr></tbody></table>"


def test_a_dataframe_table_from_the_sandbox_is_kept_but_anything_active_is_removed() -> None:
    view, frontend, clock = live_view()
    hostile = (
        '<div onclick="steal()"><style>body{display:none}</style>'
        '<table class="dataframe" style="background:url(https://evil.example/x)">'
        '<tr><th colspan="2">name</th></tr>'
        '<tr><td>&lt;b&gt;Ada&lt;/b&gt;</td><td><img src=x onerror="steal()">36</td></tr>'
        "<script>steal()</script><iframe src=https://evil.example></iframe></table>"
        '<a href="javascript:steal()">more</a></div>'
    )
    collected = [
        events.CallStarted("c1"),
        events.CodeDone("c1", "df"),
        events.RichOutput("c1", {"text/html": hostile, "text/plain": "   name\n0  <b>Ada</b>"}),
        events.RichOutput("c1", {"application/javascript": "steal()", "text/plain": "<Javascript object>"}),
        events.Completed(),
    ]
    view.finish(play(collected, view, clock))
    rich = next(b for b in frontend.bundles() if "table" in str(b.get("text/html", "")))
    shown = rich["text/html"]
    assert '<table class="dataframe">' in shown and '<th colspan="2">name</th>' in shown
    assert "&lt;b&gt;Ada&lt;/b&gt;" in shown and "36" in shown
    for bad in ("<script", "<style", "<iframe", "<img", "onclick", "onerror", "javascript:", "url("):
        assert bad not in shown
    everything = json.dumps(frontend.bundles())
    assert "application/javascript" not in everything and "steal()</script>" not in everything


def test_generated_html_and_svg_files_cannot_script_the_notebook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = save(out, "report.html", b"<!DOCTYPE html><h1>Q1</h1><script>parent.__pwned=1</script>")
    drawing = save(out, "shape.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>')
    huge = save(tmp_path / "out", "huge.html", b"<p>" + b"x" * 2_100_000 + b"</p>")
    # SVG: only as an <img> (browsers run SVG images in static mode: no scripts, no loads).
    svg_html = file_bundle(drawing, link_base=tmp_path)["text/html"]
    assert re.search(r'<img src="data:image/svg\+xml;base64,[A-Za-z0-9+/=]+"', svg_html)
    assert "<svg" not in svg_html and "onload" not in svg_html and 'href="out/shape.svg"' in svg_html
    for saved in (report,):
        shown = file_bundle(saved, link_base=tmp_path)["text/html"]
        assert re.search(r'<iframe sandbox="" ', shown)
        assert "allow-scripts" not in shown and "allow-same-origin" not in shown
        assert "<script" not in shown and "<svg" not in shown, "the document only lives escaped in srcdoc"
        srcdoc = html.unescape(re.search(r'srcdoc="([^"]*)"', shown).group(1))
        assert "Content-Security-Policy" in srcdoc and "default-src 'none'" in srcdoc
        assert f'href="out/{saved.name}"' in shown
    report_doc = re.search(r'srcdoc="([^"]*)"', file_bundle(report)["text/html"]).group(1)
    assert html.unescape(report_doc).startswith("<!DOCTYPE html><meta http-equiv"), "CSP after the doctype"
    big = file_bundle(huge, link_base=tmp_path)
    assert "<iframe" not in big["text/html"] and "too large to preview" in big["text/html"]


# -- files -----------------------------------------------------------------------------------------


def test_tables_are_previewed_with_their_shape_and_first_rows(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"city": ["<b>Oslo</b>"] + [f"city {i}" for i in range(24)], "people": range(25)})
    out = tmp_path / "ci_outputs"
    out.mkdir()
    frame.to_csv(out / "cities.csv", index=False)
    frame.to_csv(out / "cities.tsv", index=False, sep="\t")
    frame.to_parquet(out / "cities.parquet")
    frame.to_feather(out / "cities.feather")
    frame.to_excel(out / "cities.xlsx", index=False)
    for name in ("cities.csv", "cities.tsv", "cities.parquet", "cities.feather", "cities.xlsx"):
        path = out / name
        bundle = file_bundle(
            SavedFile(name, path, f"/mnt/data/{name}", "f", path.stat().st_size, True), link_base=tmp_path
        )
        assert "25 rows × 2 columns" in bundle["text/html"], name
        assert "&lt;b&gt;Oslo&lt;/b&gt;" in bundle["text/html"] and "<b>Oslo" not in bundle["text/html"], name
        assert "city 8" in bundle["text/html"] and "city 9" not in bundle["text/html"], "first 10 rows only"
        assert f'href="ci_outputs/{name}"' in bundle["text/html"]
        plain = bundle["text/plain"]
        assert plain.startswith(f"table {name} (") and f"ci_outputs/{name}" in plain
        assert not TAG.search(bundle["text/plain"].replace("<b>Oslo</b>", ""))


def test_other_files_are_links_relative_to_the_notebook_folder_with_their_size(tmp_path: Path) -> None:
    archive = save(tmp_path / "ci_outputs" / "run 1", "model.zip", b"z" * 2048)
    bundle = file_bundle(archive, link_base=tmp_path)
    assert '<a href="ci_outputs/run%201/model.zip"' in bundle["text/html"]
    assert "(2.0 KB)" in bundle["text/html"]
    assert bundle["text/plain"] == "file model.zip (2.0 KB): ci_outputs/run 1/model.zip"
    payload = json.dumps({"mean": 6.98, "n": 10000}).encode()
    shown = file_bundle(save(tmp_path / "ci_outputs", "summary.json", payload), link_base=tmp_path)
    assert "&quot;mean&quot;: 6.98" in shown["text/html"]
    expected = f"json summary.json ({len(payload)} B): ci_outputs/summary.json, an object with 2 key(s)"
    assert shown["text/plain"] == expected
    broken = save(tmp_path / "ci_outputs", "broken.parquet", b"not parquet at all")
    assert "no preview" in file_bundle(broken, link_base=tmp_path)["text/plain"]


# A sandbox makes these for free: kilobytes on disk, hundreds of megabytes once decoded.
BOMB_MAKERS = {
    "strings.parquet": """
import pyarrow as pa, pyarrow.parquet as pq
value = "0" * (16 << 20)  # ten 16 MB strings in one plain-encoded page: 160 MB from ~6 KB
column = pa.array([value] * 10, type=pa.large_string())
pq.write_table(pa.table({"text": column}), PATH, use_dictionary=False, compression="zstd")
""",
    "zeros.feather": """
import numpy as np, pyarrow as pa, pyarrow.feather as feather
zeros = pa.array(np.zeros(1 << 25, dtype=np.int64))  # one record batch: 256 MB from ~9 KB
feather.write_feather(pa.table({"n": zeros}), PATH, compression="zstd", chunksize=1 << 25)
""",
}

PREVIEW_IN_A_FRESH_PROCESS = """
import json, resource, sys
from pathlib import Path
import pyarrow.feather, pyarrow.parquet, openpyxl, PIL.Image  # imports are not the preview's cost
from ci_magic.render.files import file_bundle
from ci_magic.result import SavedFile
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bundle = file_bundle(SavedFile(path.name, path, "/mnt/data/" + path.name, "f", path.stat().st_size, True))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"plain": bundle["text/plain"], "html": bundle.get("text/html", ""), "grown_kb": grown}))
"""


def preview_in_a_fresh_process(path: Path) -> dict[str, object]:
    """The preview's bundle and how much the process's peak memory grew while making it."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PREVIEW_IN_A_FRESH_PROCESS, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(BOMB_MAKERS))
def test_a_decompression_bomb_from_the_sandbox_costs_the_preview_nothing(name: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    bomb = tmp_path / "ci_outputs" / name
    bomb.parent.mkdir()
    subprocess.run(
        [sys.executable, "-c", f"PATH = {str(bomb)!r}\n" + BOMB_MAKERS[name]], check=True, timeout=120
    )
    assert bomb.stat().st_size < 64_000, "a small file, as a sandbox would write it"

    shown = preview_in_a_fresh_process(bomb)

    assert re.fullmatch(
        rf"file {re.escape(name)} \(.+\): .+ \[preview skipped: file expands to ~\d+\.\d MB\]",
        str(shown["plain"]),
    ), shown["plain"]
    assert "preview skipped: file expands to" in str(shown["html"]) and 'href="' in str(shown["html"])
    grown_mb = int(shown["grown_kb"]) / 1024  # type: ignore[call-overload]
    print(f"{name}: {bomb.stat().st_size / 1024:.1f} KB on disk, preview peak memory +{grown_mb:.1f} MB")
    assert grown_mb < 32, f"the preview's peak memory grew by {grown_mb:.0f} MB"


def test_an_ordinary_large_parquet_and_feather_still_preview_from_their_first_batch(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({f"c{i}": range(300_000) for i in range(4)})
    out = tmp_path / "ci_outputs"
    out.mkdir()
    frame.to_parquet(out / "big.parquet", row_group_size=100_000)
    frame.to_feather(out / "big.feather", chunksize=100_000)
    for name in ("big.parquet", "big.feather"):
        path = out / name
        bundle = file_bundle(SavedFile(name, path, f"/mnt/data/{name}", "f", path.stat().st_size, True))
        assert "300,000 rows × 4 columns; first 10 rows" in bundle["text/plain"], bundle["text/plain"]


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge grey image, with a few bytes of pixel data: what a browser inflates."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_an_image_whose_header_declares_billions_of_pixels_is_not_inlined(tmp_path: Path) -> None:
    out = tmp_path / "ci_outputs"
    huge = save(out, "huge.png", png_header_bomb(100_000, 100_000))
    large = save(out, "large.png", png_header_bomb(8_000, 6_000))  # 48 megapixels: over the budget too
    fine = save(out, "fine.png", png_bytes())
    for saved in (huge, large):
        bundle = file_bundle(saved, link_base=tmp_path)
        assert "image/png" not in bundle, saved.name
        assert "preview skipped" in bundle["text/plain"], bundle["text/plain"]
    assert "image/png" in file_bundle(fine, link_base=tmp_path)
    # The same picture displayed by the sandbox's code, not saved: not sent to the browser either.
    view, frontend, clock = live_view()
    bomb = base64.b64encode(png_header_bomb(100_000, 100_000)).decode()
    collected = [
        events.CallStarted("c1"),
        events.RichOutput("c1", {"image/png": bomb, "text/plain": "<Figure>"}),
        events.Completed(),
    ]
    view.finish(play(collected, view, clock), link_base=tmp_path)
    assert not any("image/png" in b for b in frontend.bundles())
    assert "image not shown: it declares 10,000,000,000 pixels" in frontend.all_text("text/plain")


def test_a_plt_show_image_is_shown_once_and_its_saved_copies_are_only_listed(tmp_path: Path) -> None:
    view, frontend, clock = live_view()
    chart = png_bytes()
    other = png_bytes(color=(200, 30, 30))
    result = play(chart_turn(chart), view, clock)
    out = tmp_path / "ci_outputs"
    copy = save(out, "figures/chart_0001-1.png", chart, cited=False)  # the session's copy of the Image
    result.files = [
        dataclasses.replace(copy, displayed=True),
        save(out, "other.png", other, file_id="cfile_other"),  # a different image: shown
    ]
    view.finish(result, link_base=tmp_path)
    images = [b["image/png"] for b in frontend.bundles() if "image/png" in b]
    assert sorted(images) == sorted([base64.b64encode(chart).decode(), base64.b64encode(other).decode()])
    listed = next(b for b in frontend.bundles() if "image shown above" in str(b.get("text/html")))
    assert "figures/chart_0001-1.png" in listed["text/plain"] and "other.png" not in listed["text/plain"]
    assert "image saved: ci_outputs/figures/chart_0001-1.png" in listed["text/plain"], "terminal: the path"
    assert "[image: PNG 64×48" in frontend.all_text("text/plain")


# -- logs and errors -------------------------------------------------------------------------------


def test_long_logs_are_collapsible_and_short_ones_are_shown_plainly() -> None:
    view, frontend, clock = live_view()
    long_logs = "".join(f"epoch {i}: loss {1 / (i + 1):.3f}\n" for i in range(40))
    collected = [
        events.CallStarted("short"),
        events.CodeDone("short", "print('hi')"),
        events.Logs("short", "hi\n", "stdout"),
        events.CallStarted("long"),
        events.CodeDone("long", "train()"),
        *[events.Logs("long", line + "\n", "stdout") for line in long_logs.splitlines()],
        events.Completed(),
    ]
    view.finish(play(collected, view, clock))
    short, long = (s.bundle for s in frontend.slots if s.role == "stream")
    assert "<details" not in short["text/html"] and "hi" in visible_text(short["text/html"])
    assert re.search(r"<details><summary[^>]*>output · 40 lines</summary>", long["text/html"])
    assert long_logs.rstrip() in visible_text(long["text/html"])
    assert long_logs.rstrip() in long["text/plain"]


def test_a_failing_call_shows_its_error_without_terminal_colour_codes() -> None:
    view, frontend, clock = live_view()
    trace = (
        "\x1b[31mNameError\x1b[0m                 Traceback\nCell In[3], line 1\n----> 1 totl\n"
        "\x1b[31mNameError\x1b[0m: name 'totl' is not defined"
    )
    collected = [
        events.CallStarted("c1"),
        events.CodeDone("c1", "totl"),
        events.CallStatus("c1", "running"),
        events.ExecutionError("c1", "NameError", "name 'totl' is not defined", trace),
        events.CallStatus("c1", "failed"),
        events.Completed(),
    ]
    view.finish(play(collected, view, clock))
    block = next(s.bundle for s in frontend.slots if s.role == "stream")
    assert "\x1b" not in json.dumps(block)
    assert "NameError: name &#x27;totl&#x27; is not defined" in block["text/html"]
    assert "call 1 · failed" in block["text/html"]
    assert "----> 1 totl" in block["text/plain"]


def test_a_sandbox_display_update_replaces_the_earlier_output() -> None:
    view, frontend, clock = live_view()
    collected = [
        events.CallStarted("c1"),
        events.CodeDone("c1", "progress()"),
        events.RichOutput("c1", {"text/html": "<b>step 1 of 3</b>", "text/plain": "step 1"}, display_id="p"),
        events.RichOutput(
            "c1", {"text/html": "<b>step 3 of 3</b>", "text/plain": "step 3"}, "p", update=True
        ),
        events.Completed(),
    ]
    view.finish(play(collected, view, clock, step=0.2))
    progress = [b for b in frontend.bundles() if "step" in str(b.get("text/plain"))]
    assert [b["text/html"] for b in progress] == ["<b>step 3 of 3</b>"]


def test_a_failed_turn_marks_the_status_and_keeps_what_arrived_and_its_notices() -> None:
    view, frontend, clock = live_view()
    collected = [
        events.Notice("The container expired; a new one was created.", "warning"),
        events.CallStarted("c1"),
        events.CodeDelta("c1", "x = "),
        events.Failed("The stream broke after 2 events:\nconnection reset by peer.", "stream"),
    ]
    result = play(collected, view, clock)
    result.notices.append(events.Notice("Could not save big.bin: disk full", "warning"))
    view.finish(result)
    # The why is the error the cell raises (said once, below); the status only marks the failure.
    assert frontend.slots[0].bundle["text/plain"] == f"ci: failed after {result.wall_time:.1f} s"
    assert "x = " in frontend.all_text("text/plain"), "the code that arrived stays on screen"
    notices = next(s.bundle for s in frontend.slots if "container expired" in str(s.bundle["text/plain"]))
    assert notices["text/plain"].splitlines() == [
        "warning: The container expired; a new one was created.",
        "warning: Could not save big.bin: disk full",
    ]


# -- quiet mode ------------------------------------------------------------------------------------


def test_quiet_mode_shows_nothing_while_running_then_only_final_outputs(tmp_path: Path) -> None:
    view, frontend, clock = live_view(quiet=True)
    result = play(chart_turn(png_bytes()), view, clock)
    assert frontend.messages == []
    chart = png_bytes(color=(1, 2, 3))  # saved by the model, never displayed
    result.files = [save(tmp_path / "ci_outputs", "chart.png", chart, file_id="cfile_chart")]
    view.finish(result, link_base=tmp_path)
    code = frontend.slots[1].bundle
    assert code["text/html"].startswith("<details>") and "1 call, 10 lines of code" in code["text/html"]
    assert "plt.show()" in visible_text(code["text/html"]) and "plt.show()" not in code["text/plain"]
    assert sum("image/png" in b for b in frontend.bundles()) == 2  # the plt.show() image and chart.png
    answer = next(s.bundle for s in frontend.slots if s.role == "text")
    assert 'href="ci_outputs/chart.png"' in answer["text/html"]
    assert "done in" in frontend.slots[0].bundle["text/plain"]


# -- terminal IPython ------------------------------------------------------------------------------


def test_in_a_terminal_the_turn_reads_as_plain_text_with_images_reported_by_path(tmp_path: Path) -> None:
    out = io.StringIO()
    clock = FakeClock()
    view = TurnView(TerminalFrontend(out), clock=clock)
    chart = png_bytes()
    printed_while_running: list[str] = []

    def watch(event: events.Event) -> None:
        if isinstance(event, events.CallStatus) and event.status == "running":
            printed_while_running.append(out.getvalue())

    result = play(chart_turn(chart), view, clock, on_event=watch)
    result.files = [save(tmp_path / "ci_outputs", "figures/ci_chart-1.png", chart, cited=False)]
    view.finish(result, link_base=tmp_path)
    text = out.getvalue()

    assert "sales = pd.read_parquet" in printed_while_running[0], "code prints while the call runs"
    assert CHART_CODE.rstrip() in text
    assert "months: 2" in text and "2024-01  1200.5" in text
    assert "[image: PNG 64×48" in text and "ci_outputs/figures/ci_chart-1.png" in text
    assert "Revenue grew **12%**" in text and "[chart.png](sandbox:/mnt/data/chart.png)" in text
    summary = f"ci: done in {result.wall_time:.1f} s · 1 call · 1,500 tokens (1,200 in, 300 out)"
    assert text.rstrip().endswith(summary)
    assert not TAG.search(text), "no HTML"
    assert '{"' not in text and "\x1b" not in text and "\r" not in text
    assert text.count("sales = pd.read_parquet") == 1, "nothing printed twice"


def test_on_a_tty_the_status_line_is_redrawn_in_place_without_escape_codes() -> None:
    out = io.StringIO()
    clock = FakeClock()
    view = TurnView(TerminalFrontend(out, tty=True), clock=clock)
    view.finish(play(chart_turn(png_bytes()), view, clock, step=0.05))
    text = out.getvalue()
    assert "\rci: running call 1 · " in text
    assert "\x1b" not in text
    last_line = text.split("\n")[-2]
    assert last_line.split("\r")[-1].startswith("ci: done in"), "the transient line gives way to the summary"


def test_outside_a_kernel_the_terminal_frontend_is_chosen() -> None:
    assert isinstance(detect_frontend(), TerminalFrontend)


# -- a real kernel ---------------------------------------------------------------------------------

KERNEL_CELL = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from ci_magic.render.frontend import JupyterFrontend, detect_frontend
from ci_magic.render.live import TurnView
from ci_magic.result import SavedFile
from tests.render_support import FakeClock, chart_turn, play, png_bytes

frontend = detect_frontend()
assert isinstance(frontend, JupyterFrontend), frontend
clock = FakeClock()
view = TurnView(frontend, clock=clock)
result = play(chart_turn(png_bytes()), view, clock, step=0.01)
table = Path("ci_outputs/monthly.csv")
table.parent.mkdir(exist_ok=True)
table.write_text("month,revenue\\n2024-01,1200.5\\n2024-02,1344.0\\n")
size = table.stat().st_size
result.files = [SavedFile("monthly.csv", table, "/mnt/data/monthly.csv", "cfile_t", size, True)]
view.finish(result, link_base=Path.cwd())
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_in_a_real_kernel_the_cell_keeps_plain_display_data_in_its_final_state(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell(KERNEL_CELL.format(root=str(ROOT))))
    client = nbclient.NotebookClient(
        notebook, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    path = tmp_path / "saved.ipynb"
    nbformat.write(notebook, path)
    outputs = nbformat.read(path, as_version=4).cells[0].outputs

    assert [o.output_type for o in outputs] == ["display_data"] * len(outputs)
    assert len(outputs) == 6  # status, call, image, table, answer, file preview: updates replaced in place
    status, call, image, table, answer, preview = outputs
    assert status.data["text/plain"].startswith("ci: done in")
    assert {"text/html", "text/plain"} <= set(call.data)
    assert CHART_CODE.rstrip() in call.data["text/plain"] and "call 1 · done" in call.data["text/html"]
    assert base64.b64decode(image.data["image/png"]).startswith(b"\x89PNG")
    assert 'class="dataframe"' in table.data["text/html"] and "1344.0" in table.data["text/html"]
    assert {"text/html", "text/plain"} <= set(answer.data)
    assert "<strong>12%</strong>" in answer.data["text/html"]
    assert "3 rows" not in preview.data["text/plain"] and "2 rows × 2 columns" in preview.data["text/plain"]
    assert 'href="ci_outputs/monthly.csv"' in preview.data["text/html"]
    assert "<script" not in json.dumps([o.data for o in outputs])


def test_the_jupyter_frontend_sends_nothing_for_an_unchanged_update(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict] = []

    class Handle:
        def update(self, bundle: dict, **kwargs: object) -> None:
            sent.append(bundle)

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: Handle())
    slot = JupyterFrontend().open({"text/plain": "a", "text/html": "<b>a</b>"})
    slot.update({"text/plain": "a", "text/html": "<b>a</b>"}, final=True)
    slot.update({"text/plain": "b", "text/html": "<b>b</b>"})
    assert sent == [{"text/plain": "b", "text/html": "<b>b</b>"}]


def test_an_answer_that_arrives_only_whole_is_shown(tmp_path: Path) -> None:
    view, frontend, clock = live_view()
    result = play([events.TextDone("Only the whole answer arrived."), events.Completed()], view, clock)
    view.finish(result, link_base=tmp_path)
    assert any("Only the whole answer" in str(b.get("text/plain")) for b in frontend.bundles())
