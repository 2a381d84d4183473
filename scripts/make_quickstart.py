"""Writes notebooks/quickstart.ipynb (run once when the walkthrough changes; outputs are not stored)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# ci-magic quickstart\n\n"
        "`%%ci` gives this notebook a code interpreter: the model writes Python, runs it in a sandboxed "
        "container tied to this kernel, fixes its own errors, and the cell shows the code, logs, charts, "
        "tables and files it made.\n\n"
        "**Backend.** With `OPENAI_API_KEY` set (or Azure's variables) cells run on OpenAI's Responses API "
        "and Containers; without it, on the local sandbox driven by any OpenAI-compatible model server "
        "(`CI_MAGIC_MODEL_BASE_URL`). See the README for configuration."
    ),
    new_code_cell("%load_ext ci_magic\n%ci_status"),
    new_markdown_cell(
        "## Ask for an analysis\n"
        "The code streams in live; the chart, the table and the file stay in the cell."
    ),
    new_code_cell("%%ci\nLoad the numbers 1..100, plot their squares and save the table as squares.csv"),
    new_markdown_cell(
        "## Bring the file back\n"
        "`%ci_pull` downloads a container file into the output folder and binds it as a "
        "Python object: a CSV becomes a DataFrame."
    ),
    new_code_cell("squares = %ci_pull squares.csv\nsquares.tail()"),
    new_markdown_cell("The last result is `_ci`: the code of every call, outputs, text, files, usage."),
    new_code_cell("print(_ci.code)\n_ci"),
    new_markdown_cell(
        "## Send your own data\nData-like variables named in the prompt (DataFrames, arrays, figures, paths) "
        "are sent as files to `/mnt/data` with a schema card, so the model knows their shape."
    ),
    new_code_cell(
        "import numpy as np\nimport pandas as pd\n\n"
        "rng = np.random.default_rng(0)\n"
        "sales_df = pd.DataFrame({\n"
        "    'month': pd.date_range('2025-01-01', periods=12, freq='MS'),\n"
        "    'region': ['north', 'south', 'east'] * 4,\n"
        "    'revenue': rng.normal(100, 15, 12).round(2),\n"
        "})\n"
        "sales_df.head(3)"
    ),
    new_code_cell("%%ci\nSummarize sales_df and plot revenue by month"),
    new_code_cell("%ci_files"),
    new_markdown_cell(
        "## Run code directly\n`%%ci_exec` runs the cell's code verbatim in the same container."
    ),
    new_code_cell("%%ci_exec\nimport os\nprint(sorted(os.listdir('/mnt/data')))"),
    new_code_cell("%ci_status"),
]

notebook = new_notebook(
    cells=cells,
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)
path = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
nbformat.write(notebook, path)
print(f"wrote {path}")
