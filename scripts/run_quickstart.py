"""Execute notebooks/quickstart.ipynb headless (nbclient) and save it, with its outputs, in build/.

Writes build/quickstart.ipynb (outputs included) and build/quickstart.html (nbconvert), and
exits non-zero if any cell failed. Unless --use-env is given, the kernel talks to the project's
OpenAI-compatible test server (its scripted model really runs the code), started here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser.processes import BackgroundProcess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--use-env", action="store_true", help="use the real backend configured in the environment"
    )
    parser.add_argument(
        "--event-delay", type=float, default=0.0, help="test server: seconds between streamed events"
    )
    args = parser.parse_args()

    build = REPO / "build"
    shutil.rmtree(build / "ci_outputs", ignore_errors=True)
    build.mkdir(exist_ok=True)
    server = None
    if not args.use_env:
        server = BackgroundProcess(
            [
                sys.executable,
                "-m",
                "tests.servers.openai_server",
                "--scenario",
                "quickstart",
                "--event-delay",
                str(args.event_delay),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            log=build / "test-server.log",
        )
        url = server.wait_for_line(r"^READY (\S+)", timeout=60).group(1)
        os.environ.update(OPENAI_API_KEY="quickstart-test-server", OPENAI_BASE_URL=url)
        for name in ("CI_MAGIC_BACKEND", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"):
            os.environ.pop(name, None)
        print(f"test server: {url} (scripted model, code really runs; log: build/test-server.log)")
    try:
        notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
        client = NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": str(build)}},
        )
        client.execute()
    finally:
        if server is not None:
            server.stop()
    nbformat.write(notebook, build / "quickstart.ipynb")
    html, _ = HTMLExporter().from_notebook_node(notebook)
    (build / "quickstart.html").write_text(html, encoding="utf-8")

    failed = [
        (index, output.get("ename"), output.get("evalue"))
        for index, cell in enumerate(notebook.cells)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    code_cells = sum(cell.cell_type == "code" for cell in notebook.cells)
    files = sorted(p.relative_to(build).as_posix() for p in (build / "ci_outputs").rglob("*") if p.is_file())
    print(f"executed {code_cells} code cells; wrote build/quickstart.ipynb and build/quickstart.html")
    print(f"files the model made: {', '.join(files) or 'none'}")
    for index, name, value in failed:
        print(f"cell {index} failed: {name}: {value}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
