"""Class 7 of issue 9: what the sandbox can see of the host.

Only what imports need is bound: the interpreter's standard library and site-packages folders,
``/usr`` and a few ``/etc`` files. Hostile code goes looking for what sits next to them: the
venv root (where a ``pip.conf`` with an index password lives), the folders ``.pth`` files add
(the project checkout with ``.git/config``), the user's home, the host's ``/etc``. Run as root
and as ``nobody``; canaries are planted by the host with a fresh token each time.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.sandbox_support import Attacker, stdout

PROJECT = Path(__file__).resolve().parents[2]
LOOK = """
import json, os
found = {}
for path in PATHS:
    try:
        with open(path, "rb") as f:
            found[path] = f.read(200).decode(errors="replace")
    except OSError as err:
        found[path] = type(err).__name__
print(json.dumps(found))
"""


def sandbox_python(attacker: Attacker) -> str:
    """The interpreter the attacker's sandboxes run (as attacker_as chose it)."""
    if attacker.user == "nobody" and os.geteuid() == 0:
        return os.environ.get("CI_MAGIC_UNPRIVILEGED_PYTHON", sys.executable)
    return sys.executable


def prefix_of(python: str) -> Path:
    done = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    return Path(done.stdout.strip())


def look(attacker: Attacker, paths: list[str]) -> dict[str, str]:
    found: dict[str, str] = json.loads(stdout(attacker.execute(f"PATHS = {paths!r}\n{LOOK}")))
    return found


@pytest.fixture
def canaries(attacker: Attacker) -> Iterator[dict[str, Path]]:
    """Secrets where a careless bind would expose them: venv root, home, beside the project."""
    token = secrets.token_hex(6)
    prefix = prefix_of(sandbox_python(attacker))
    planted = {"home": attacker.home / f".ci-magic-canary-{token}"}
    if os.access(prefix, os.W_OK):  # not when this run is itself unprivileged (the listing still checks)
        # Not named pip.conf: a real one would change pip for everyone using this venv meanwhile.
        planted["venv root"] = prefix / f"ci-magic-canary-{token}.conf"
    for path in planted.values():
        path.write_text(f"index-url = https://user:canary-{token}@example.invalid/simple\n")
        if attacker.user == "nobody":
            os.chown(path, 65534, 65534)
    yield planted
    for path in planted.values():
        path.unlink(missing_ok=True)


def test_the_venv_root_the_home_and_the_project_checkout_are_invisible(
    attacker: Attacker, canaries: dict[str, Path]
) -> None:
    attacker.start()
    attacker.create()
    git_config = PROJECT / ".git" / "config"
    targets = [str(path) for path in canaries.values()]
    targets.append(str(git_config))
    targets.append(str(PROJECT / "pyproject.toml"))
    found = look(attacker, targets)
    assert all(found[path] == "FileNotFoundError" for path in targets), found
    # Next to what is bound, only what the interpreter needs: pyvenv.cfg, bin/python, lib/.
    prefix = prefix_of(sandbox_python(attacker))
    listing = json.loads(
        stdout(attacker.execute(f"import json, os\nprint(json.dumps(sorted(os.listdir({str(prefix)!r}))))"))
    )
    assert set(listing) <= {"bin", "lib", "lib64", "pyvenv.cfg", "include"}, listing


def test_the_hosts_etc_and_other_secrets_stay_outside(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    secrets_on_host = ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/pip.conf", "/etc/ssh"]
    found = look(attacker, secrets_on_host)
    assert all(found[path] == "FileNotFoundError" for path in secrets_on_host), found
    events = attacker.execute(
        """
        import os, pwd
        print(sorted(os.listdir("/etc")))
        print([p.pw_name for p in pwd.getpwall()])
        """
    )
    etc, users = stdout(events).splitlines()
    assert "shadow" not in etc and "pip.conf" not in etc and "ssh" not in etc, etc
    assert "passwd" in etc and "ssl" in etc  # what libraries need is there
    assert eval(users) == ["root", "sandbox", "nobody"]  # not the host's list of accounts


def test_mountinfo_names_no_folder_beyond_what_is_bound(attacker: Attacker) -> None:
    """/proc/self/mountinfo shows each bind's host path: none may be a folder holding secrets."""
    attacker.start()
    attacker.create()
    mounts = stdout(
        attacker.execute("print('\\n'.join(l.split()[4] for l in open('/proc/self/mountinfo')))")
    ).split()
    prefix = str(prefix_of(sandbox_python(attacker)))
    forbidden = {prefix, str(PROJECT), str(Path.home()), str(attacker.home), "/etc", "/root", "/home"}
    assert not forbidden & set(mounts), sorted(forbidden & set(mounts))
    assert "/mnt/data" in mounts and "/usr" in mounts
