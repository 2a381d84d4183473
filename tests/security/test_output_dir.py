"""Issue 9, class 9: sandbox files where the notebook imports from.

Generated files are saved in ``output_dir`` under names the sandbox chooses. The attacker writes a
module named like one the user imports (``seaborn.py``) and hopes it lands where the notebook's
Python looks first: the working directory, a folder on ``sys.path``, or a parent of one (a
sub-folder named like the working directory). Run in a real notebook on the local sandbox.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.notebook_support import errors_of, kernel_env, output_text, run_cells
from tests.notebook_support import local_env as notebook_local_env

pytestmark = pytest.mark.slow


TROJAN = (
    "%%ci_exec\n"
    "import os\n"
    "payload = 'import builtins\\nbuiltins.PWNED = __file__\\n'\n"
    "for name in ('seaborn.py', 'lib/seaborn.py'):\n"
    "    os.makedirs(os.path.dirname(name) or '.', exist_ok=True)\n"
    "    open(name, 'w').write(payload)\n"
    "print('planted', sorted(os.listdir('.')))"
)
IMPORT_CHECK = (
    "import builtins, importlib, sys\n"
    "sys.modules.pop('seaborn', None)\n"
    "try:\n"
    "    import seaborn\n"
    "except ImportError:\n"
    "    pass\n"
    "print('PWNED' if hasattr(builtins, 'PWNED') else 'clean', getattr(builtins, 'PWNED', ''))"
)


def local_env() -> dict[str, str | None]:
    return notebook_local_env(CI_MAGIC_OUTPUT_DIR=None)


def test_an_output_dir_python_imports_from_is_refused_and_the_trojan_never_runs(tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        '%config CodeInterpreter.output_dir = "."',
        '%config CodeInterpreter.output_dir = ".."',
        'import os, sys\nsys.path.insert(0, os.path.abspath("lib"))\n'
        '%config CodeInterpreter.output_dir = "lib"',
        "%config CodeInterpreter.output_dir",
        TROJAN,
        IMPORT_CHECK,
    ]
    with kernel_env(**local_env()):
        notebook = run_cells(cells, tmp_path, timeout=120)
    for index in (1, 2, 3):
        refusal = output_text(notebook.cells[index])
        # One paragraph: what was wrong and what to do.
        assert "is refused" in refusal and "ci_outputs" in refusal, refusal
    assert "ci_outputs" in output_text(notebook.cells[4]), "the setting was left as it was"
    assert "planted" in output_text(notebook.cells[5]), output_text(notebook.cells[5])
    assert "clean" in output_text(notebook.cells[6]), output_text(notebook.cells[6])
    assert not (tmp_path / "seaborn.py").exists()
    assert (tmp_path / "ci_outputs" / "seaborn.py").exists(), "the file itself is still saved, out of reach"


def test_a_folder_put_on_sys_path_after_it_was_chosen_receives_nothing(tmp_path: Path) -> None:
    cells = [
        "%load_ext ci_magic",
        '%config CodeInterpreter.output_dir = "results"',
        'import os, sys\nos.makedirs("results", exist_ok=True)\n'
        'sys.path.insert(0, os.path.abspath("results"))',
        TROJAN,
        "%ci_pull seaborn.py",
        IMPORT_CHECK,
    ]
    with kernel_env(**local_env()):
        notebook = run_cells(cells, tmp_path, timeout=120)
    assert not errors_of(notebook.cells[1]), output_text(notebook.cells[1])
    attack = output_text(notebook.cells[3])
    assert "planted" in attack and "Not saved" in attack and "is refused" in attack, attack
    pull = output_text(notebook.cells[4])
    assert errors_of(notebook.cells[4]) and "is refused" in pull and "Traceback" not in pull, pull
    assert "clean" in output_text(notebook.cells[5]), output_text(notebook.cells[5])
    assert not (tmp_path / "results" / "seaborn.py").exists()


def test_an_output_dir_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    cells = ["%load_ext ci_magic", TROJAN, IMPORT_CHECK]
    with kernel_env(**{**local_env(), "CI_MAGIC_OUTPUT_DIR": "."}):
        notebook = run_cells(cells, tmp_path, timeout=120)
    text = output_text(notebook.cells[1])
    assert "is refused" in text and "CI_MAGIC_OUTPUT_DIR" in text, text
    assert "Traceback" not in text, "one paragraph, not a traceback"
    assert "clean" in output_text(notebook.cells[2]), output_text(notebook.cells[2])
    assert not (tmp_path / "seaborn.py").exists()
