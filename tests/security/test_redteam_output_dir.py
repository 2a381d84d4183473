"""Red-team payload for class 9 of issue 9 (sandbox files where the notebook imports from).

``output_dir_problem`` refuses the working directory, its parents, ``sys.path`` folders and their
parents. It accepts the home folder whenever the notebook does not live under it (a Docker image
with ``HOME=/root`` and notebooks in ``/workspace``, JupyterHub with a shared notebook folder).
Saved files keep the sub-folders the sandbox chose, dot-folders included, so a sandbox file
``.ipython/profile_default/startup/00-run.py`` lands where IPython runs code at every kernel start:
the next notebook the user opens runs it, outside any sandbox. ``xfail(strict=True)`` until refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.notebook_support import kernel_env, local_env, output_text, run_cells

pytestmark = pytest.mark.slow


PLANT = (
    "%%ci_exec\n"
    "import os\n"
    "startup = '.ipython/profile_default/startup'\n"
    "os.makedirs(startup, exist_ok=True)\n"
    "with open(f'{startup}/00-run.py', 'w') as f:\n"
    "    f.write('import builtins\\nbuiltins.PWNED = __file__\\n')\n"
    "print('planted')"
)
CHECK = "import builtins\nprint('PWNED' if hasattr(builtins, 'PWNED') else 'clean')"


def test_sandbox_files_never_land_where_ipython_runs_startup_code(tmp_path: Path) -> None:
    home, notebooks = tmp_path / "home", tmp_path / "workspace"
    home.mkdir()
    notebooks.mkdir()
    env = local_env(CI_MAGIC_OUTPUT_DIR=None, IPYTHONDIR=None, HOME=str(home))
    with kernel_env(**env):
        first = run_cells(
            ["%load_ext ci_magic", '%config CodeInterpreter.output_dir = "~"', PLANT], notebooks, timeout=120
        )
        assert "planted" in output_text(first.cells[2]), output_text(first.cells[2])
        # The user opens another notebook later: a fresh kernel with the same home.
        second = run_cells([CHECK], notebooks, timeout=60)
    assert output_text(second.cells[0]).strip() == "clean", (
        "a file written in the sandbox ran in the user's next kernel: "
        f"{sorted(str(p.relative_to(home)) for p in home.rglob('*.py'))}"
    )
