"""How a sandbox kernel is isolated: the command line, its environment and its resource limits.

Three modes, picked once per process by :func:`detect_isolation`:

``bwrap``    bubblewrap builds a new root (system folders and the interpreter read-only,
             tmpfs ``/tmp`` and home, the data folder at ``/mnt/data``) in fresh user, mount,
             PID, network, IPC and UTS namespaces.
``unshare``  util-linux ``unshare`` creates the same namespaces and the launcher builds the
             same root itself (``_launcher.py``, mount + pivot_root through ctypes).
``none``     no namespaces (macOS, locked-down hosts): resource limits and a clean environment
             only, announced once as reduced isolation.

Both namespace modes read one list of bwrap-like mount operations (:func:`mount_plan`), so what
the sandbox sees does not depend on the tool. As root, neither mode uses a user namespace: the
launcher drops the kernel to a per-container unprivileged uid, because root's files would
otherwise stay readable and the kernel exempts root from ``RLIMIT_NPROC``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ci_magic.errors import ConfigurationError, SandboxError

__all__ = [
    "DATA_INSIDE",
    "MEMORY_TIERS",
    "RUNTIME_INSIDE",
    "Isolation",
    "IsolationMode",
    "LaunchPaths",
    "Limits",
    "PythonInfo",
    "build_font_cache",
    "detect_isolation",
    "limits_for_tier",
    "mount_plan",
    "probe_python",
]

log = logging.getLogger(__name__)

IsolationMode = Literal["bwrap", "unshare", "none"]
ISOLATION_CHOICES = ("auto", "bwrap", "unshare", "none")

DATA_INSIDE = "/mnt/data"
RUNTIME_PREFIX = "cim-"  # host folders of running kernels: /tmp/cim-XXXX/{k,r,owner}
RUNTIME_INSIDE = "/run/ci-magic"
HOME_INSIDE = "/home/sandbox"

GIB = 1 << 30
MEMORY_TIERS = {"1g": GIB, "4g": 4 * GIB, "16g": 16 * GIB, "64g": 64 * GIB}
# RLIMIT_DATA counts private writable memory, so an idle kernel with pandas and matplotlib
# loaded already uses ~300 MB of it (thread stacks, interpreter heap): give the tier on top.
DATA_HEADROOM = 512 << 20
# An idle kernel maps ~470 MB (libraries, thread stacks, malloc arenas) of which ~90 MB are
# private pages, so the tier plus this lets one process allocate about the tier.
ADDRESS_HEADROOM = 512 << 20
KERNEL_ALLOWANCE = 256 << 20  # the idle kernel's own ~120 MB, on top of the tier, for the tree
MAX_OPEN_FILES = 4096  # per process; budget.MAX_OPEN_FILES reads as many

LAUNCHER_SOURCE = (Path(__file__).with_name("_launcher.py")).read_text(encoding="utf-8")
REQUIRED_MODULE = "ipykernel"
EXPECTED_MODULES = ("pandas", "numpy", "matplotlib")
SYSTEM_DIRS = ("/usr", "/etc")
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SANDBOX_UID_BASE = 2_000_000_000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox: per process (rlimits) and for its whole tree (the budget).

    ``memory_bytes`` is the tier. The whole tree (every process's private and shared memory plus
    what its tmpfs folders hold) may use ``budget_bytes``: the tier plus the idle kernel's own
    footprint. The tmpfs folders are cut from the tier, so files there can never use it all.
    """

    memory_bytes: int = GIB
    max_processes: int = 256  # threads count too: an idle ipykernel has about a dozen
    max_file_bytes: int = 8 * GIB
    tmp_bytes: int | None = None  # size of the sandbox's tmpfs /tmp; default: a quarter of the tier
    disk_bytes: int | None = None  # what /mnt/data may hold (allocated); None: not enforced

    def rlimits(self, *, processes_already_running: int = 0) -> dict[str, int]:
        """setrlimit values; RLIMIT_NPROC counts every process of the user, hence the offset."""
        return {
            "RLIMIT_DATA": self.memory_bytes + DATA_HEADROOM,
            # Address space counts shared mappings too, which RLIMIT_DATA does not: one process
            # alone meets a MemoryError near the tier; the watchdog holds the sum of all of them.
            "RLIMIT_AS": self.memory_bytes + ADDRESS_HEADROOM,
            "RLIMIT_FSIZE": self.max_file_bytes,
            "RLIMIT_CORE": 0,  # a crash must not drop a core file into /mnt/data
            "RLIMIT_NOFILE": MAX_OPEN_FILES,  # bounds the watchdog's walk of open files (memfd)
            "RLIMIT_NPROC": processes_already_running + self.max_processes,
        }

    @property
    def tmpfs_bytes(self) -> int:
        """Size of /tmp (the largest of the three tmpfs folders)."""
        return self.tmp_bytes if self.tmp_bytes is not None else self.memory_bytes // 4

    @property
    def tmpfs_sizes(self) -> tuple[int, int, int]:
        """Sizes of /tmp, /dev/shm and home: together at most half the tier."""
        small = self.memory_bytes // 8
        return (min(self.tmpfs_bytes, self.memory_bytes // 4), small, small)

    @property
    def budget_bytes(self) -> int:
        """Memory of the whole tree, tmpfs included (cgroup memory.max or the watchdog)."""
        return self.memory_bytes + KERNEL_ALLOWANCE


def limits_for_tier(tier: str, *, disk_bytes: int | None = None) -> Limits:
    try:
        memory = MEMORY_TIERS[tier]
    except KeyError:
        raise ConfigurationError(
            f"Unknown memory limit {tier!r} for a local container: use one of "
            f"{', '.join(MEMORY_TIERS)} (the same tiers as OpenAI's containers)."
        ) from None
    if disk_bytes is None:
        return Limits(memory_bytes=memory)
    # No single file larger than the disk limit (RLIMIT_FSIZE); the watchdog holds the sum.
    return Limits(memory_bytes=memory, disk_bytes=disk_bytes, max_file_bytes=disk_bytes)


@dataclass(frozen=True)
class PythonInfo:
    """What the sandbox interpreter needs visible, as reported by the interpreter itself."""

    executable: str  # as configured (a venv's bin/python must be run through the venv's path)
    visible_paths: tuple[str, ...]  # read-only inside the sandbox, symlinks resolved as well
    version: str
    missing: tuple[str, ...] = ()  # expected data packages it lacks
    user_base: str | None = None


PROBE_SOURCE = r"""
import importlib.util, json, os, site, sys
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
paths += [p for p in sys.path if p and os.path.exists(p)]
user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
if user_site and os.path.isdir(user_site):
    paths.append(user_site)
else:
    user_site = None
mods = sys.argv[1].split(",")
print(json.dumps({
    "paths": paths,
    "realexe": os.path.realpath(sys.executable),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "missing": [m for m in mods if importlib.util.find_spec(m) is None],
    "user_base": site.getuserbase() if user_site else None,
}))
"""


@functools.cache
def probe_python(python: str) -> PythonInfo:
    """Ask the sandbox interpreter where it lives and what it can import (cached per path)."""
    executable = shutil.which(python) if os.sep not in python else python
    if executable is None or not os.path.exists(executable):
        raise ConfigurationError(
            f"The sandbox Python {python!r} does not exist. Set CodeInterpreter.sandbox_python to an "
            "interpreter (or a venv's bin/python) that has ipykernel, pandas, numpy and matplotlib."
        )
    executable = os.path.abspath(executable)
    modules = ",".join((REQUIRED_MODULE, *EXPECTED_MODULES))
    try:
        done = subprocess.run(
            [executable, "-c", PROBE_SOURCE, modules],
            env=_base_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigurationError(f"The sandbox Python {executable} could not be started: {err}.") from err
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise ConfigurationError(f"The sandbox Python {executable} failed to start: {tail[0]}")
    report = json.loads(done.stdout)
    if REQUIRED_MODULE in report["missing"]:
        raise ConfigurationError(
            f"The sandbox Python {executable} has no ipykernel, which runs the sandbox. Install it "
            f"(`{executable} -m pip install ipykernel pandas numpy matplotlib`) or point "
            "CodeInterpreter.sandbox_python at an interpreter that has it."
        )
    paths = [executable, report["realexe"], *report["paths"]]
    return PythonInfo(
        executable=executable,
        visible_paths=_visible(paths),
        version=report["version"],
        missing=tuple(report["missing"]),
        user_base=report["user_base"],
    )


def build_font_cache(python: PythonInfo, folder: Path) -> None:
    """Have the sandbox interpreter write matplotlib's font list into ``folder``, once.

    It runs on the host like :func:`probe_python` (the user's own interpreter, nothing from a
    sandbox), so every sandbox can start from a list no sandbox could have tampered with.
    """
    if any(folder.glob("fontlist-*.json")):
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: a kernel starting meanwhile never copies half a file.
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    env = {**_base_env(), "MPLCONFIGDIR": str(work), "HOME": str(work)}
    try:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [python.executable, "-c", "import matplotlib.font_manager"],
                env=env, capture_output=True, timeout=300, check=False,
            )  # fmt: skip
        for built in work.glob("fontlist-*.json"):
            os.replace(built, folder / built.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _visible(paths: Sequence[str]) -> tuple[str, ...]:
    """Each path and its symlink-free form, minus what the system folders or a parent already show."""
    found: set[str] = set()
    for raw in paths:
        for path in (os.path.abspath(raw), os.path.realpath(raw)):
            if os.path.isfile(path):
                path = os.path.dirname(path)
            if not _shown_by_system(path):
                found.add(path)
    kept = [p for p in found if not any(_shows(parent, p) for parent in found if parent != p)]
    # Parents first: a child bound before its parent would be hidden by the parent's bind.
    return tuple(sorted(kept, key=lambda p: (p.count("/"), p)))


def _shows(parent: str, path: str) -> bool:
    """Binding ``parent`` already shows ``path`` (it lies inside without leaving through a symlink)."""
    if not path.startswith(parent.rstrip("/") + "/"):
        return False
    return os.path.realpath(path) == os.path.join(os.path.realpath(parent), os.path.relpath(path, parent))


def _shown_by_system(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


@dataclass(frozen=True)
class LaunchPaths:
    """Host-side folders of one kernel launch."""

    data_dir: Path  # becomes /mnt/data
    runtime_dir: Path  # connection file, ipc sockets, exit status (becomes /run/ci-magic)
    mount_dir: Path  # empty folder the unshare launcher builds the new root on

    @classmethod
    def create(cls, data_dir: Path) -> LaunchPaths:
        # Unix socket paths are limited to ~107 bytes, so the sockets live in a short temp path
        # rather than next to the data (whose root may be deep in the user's home).
        base = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=_short_tmp()))
        (base / "k").mkdir()
        (base / "r").mkdir()
        (base / "owner").write_text(str(os.getpid()))
        return cls(data_dir=data_dir, runtime_dir=base / "k", mount_dir=base / "r")

    def remove(self) -> None:
        shutil.rmtree(self.runtime_dir.parent, ignore_errors=True)

    @staticmethod
    def remove_stale() -> int:
        """Remove runtime folders whose owning process is gone (a session that was killed)."""
        removed = 0
        for base in Path(_short_tmp()).glob(f"{RUNTIME_PREFIX}*"):
            try:
                if base.stat().st_uid != os.getuid():
                    continue
                os.kill(int((base / "owner").read_text()), 0)
            except ProcessLookupError:
                shutil.rmtree(base, ignore_errors=True)
                removed += 1
            except (OSError, ValueError):
                continue  # still starting, or not ours to judge
        return removed


def _short_tmp() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK) and len(runtime) < 40:
        return runtime
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def mount_plan(python: PythonInfo, paths: LaunchPaths, limits: Limits) -> list[tuple[str | int, ...]]:
    """What the sandbox sees, as bwrap-like operations; everything not listed is invisible."""
    ops: list[tuple[str | int, ...]] = []
    for system_dir in SYSTEM_DIRS:
        if os.path.isdir(system_dir):
            ops.append(("ro-bind", system_dir, system_dir))
    for name in SYSTEM_LINKS:
        if os.path.islink(name):
            ops.append(("symlink", os.readlink(name), name))
        elif os.path.isdir(name):
            ops.append(("ro-bind", name, name))
    made = {"/home", "/mnt", "/run"}  # parents of our own mount points, made traversable
    ops += [("dir", d) for d in sorted(made)]
    ops += [
        ("proc", "/proc"),
        ("dev", "/dev"),
        # Cut from the memory budget (budget.py counts what they hold): multiprocessing's
        # semaphores live in /dev/shm.
        ("tmpfs", "/dev/shm", limits.tmpfs_sizes[1]),
        ("tmpfs", "/tmp", limits.tmpfs_sizes[0]),
        ("tmpfs", HOME_INSIDE, limits.tmpfs_sizes[2]),
    ]
    # The interpreter stays visible even under the (hidden) home folder or /tmp: pyenv, conda, venvs.
    # Its parent folders are created world-traversable (bwrap would make them 0700).
    parents = sorted(
        {str(p) for path in python.visible_paths for p in Path(path).parents if str(p) != "/"},
        key=lambda p: (p.count("/"), p),
    )
    mounted = made | {"/tmp", HOME_INSIDE}
    ops += [("dir", parent) for parent in parents if not _shown_by_system(parent) and parent not in mounted]
    ops += [("ro-bind", path, path) for path in python.visible_paths]
    ops += [
        ("bind", str(paths.data_dir), DATA_INSIDE),
        ("bind", str(paths.runtime_dir), RUNTIME_INSIDE),
        ("remount-ro", "/"),
    ]
    return ops


def _bwrap_args(ops: list[tuple[str | int, ...]]) -> list[str]:
    args: list[str] = []
    for op in ops:
        kind = op[0]
        if kind == "tmpfs":
            args += ["--perms", "1777", "--size", str(op[2]), "--tmpfs", str(op[1])]
        elif kind == "dir":
            args += ["--perms", "0755", "--dir", str(op[1])]
        elif kind in ("proc", "dev", "remount-ro"):
            args += [f"--{kind}", str(op[1])]
        else:
            args += [f"--{kind}", str(op[1]), str(op[2])]
    return args


def _base_env() -> dict[str, str]:
    """A minimal environment: nothing inherited from the host (API keys stay outside)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Isolation:
    mode: IsolationMode
    as_root: bool = field(default_factory=lambda: _is_root())
    reason: str = ""  # why a stronger mode was not used (for the warning)

    @property
    def namespaced(self) -> bool:
        return self.mode != "none"

    @property
    def warning(self) -> str | None:
        if self.namespaced:
            return None
        why = self.reason or "user namespaces are not available here"
        return (
            f"Local sandbox isolation is reduced ({why}): sandbox code runs as you, can read your "
            "files and reach the network; only resource limits and a clean environment apply, and "
            "/mnt/data paths do not exist (the working directory is the container's data folder). "
            "On Linux install bubblewrap or enable unprivileged user namespaces; for untrusted work "
            "use the openai backend."
        )

    def sandbox_user(self, container_id: str) -> tuple[int, int] | None:
        """As root, each container runs as its own unprivileged uid (its process count is its own)."""
        if not (self.namespaced and self.as_root):
            return None
        digits = "".join(c for c in container_id if c in "0123456789abcdef")[-6:] or "0"
        uid = SANDBOX_UID_BASE + int(digits, 16)
        return uid, uid

    def data_inside(self, paths: LaunchPaths) -> str:
        return DATA_INSIDE if self.namespaced else str(paths.data_dir)

    def runtime_inside(self, paths: LaunchPaths) -> str:
        return RUNTIME_INSIDE if self.namespaced else str(paths.runtime_dir)

    def environment(self, python: PythonInfo, paths: LaunchPaths) -> dict[str, str]:
        runtime = self.runtime_inside(paths)
        if self.namespaced:
            home, tmp = HOME_INSIDE, "/tmp"
        else:
            home, tmp = str(paths.runtime_dir / "home"), str(paths.runtime_dir / "tmp")
            os.makedirs(home, exist_ok=True)
            os.makedirs(tmp, exist_ok=True)
        env = _base_env()
        env["PATH"] = f"{os.path.dirname(python.executable)}:{env['PATH']}"
        env.update(
            HOME=home,
            TMPDIR=tmp,
            USER="sandbox",
            LOGNAME="sandbox",
            MPLCONFIGDIR=f"{runtime}/matplotlib",
            PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ among the container's files
            # One BLAS/OpenMP thread and two malloc arenas: each extra thread reserves memory
            # that counts against the limit while doing little on a laptop.
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            NUMEXPR_NUM_THREADS="1",
            MALLOC_ARENA_MAX="2",
        )
        if python.user_base:
            env["PYTHONUSERBASE"] = python.user_base
        return env

    def command(
        self,
        python: PythonInfo,
        paths: LaunchPaths,
        limits: Limits,
        *,
        user: tuple[int, int] | None,
        ctl_fd: int,
        kernel_argv: Sequence[str],
        probe: bool = False,
    ) -> list[str]:
        """The argv that starts the launcher (and through it the kernel) inside the sandbox."""
        runtime = self.runtime_inside(paths)
        ops = mount_plan(python, paths, limits) if self.namespaced else None
        config = {
            "mounts": ops if self.mode == "unshare" else None,
            "new_root": str(paths.mount_dir),
            "pid_namespace": self.namespaced,
            "user": list(user) if user else None,
            "drop_caps": self.mode == "unshare" and not self.as_root,
            # In a namespace the sandbox's user counts only the sandbox's processes; without one
            # it is the host user, who already runs some.
            "rlimits": limits.rlimits(processes_already_running=0 if self.namespaced else _user_tasks()),
            "cwd": self.data_inside(paths),
            "status_file": f"{runtime}/exit-status",
            "ctl_fd": ctl_fd,
            "kernel_module": "ipykernel_launcher",
            "block_modules": ["debugpy"],
            "kernel_argv": ["ipykernel_launcher", *kernel_argv],
            "probe": probe,
        }
        launcher = [python.executable, "-c", LAUNCHER_SOURCE, json.dumps(config)]
        if self.mode == "none":
            return launcher
        if self.mode == "unshare":
            namespaces = ["--mount", "--net", "--ipc", "--pid", "--uts", "--fork", "--kill-child"]
            user_ns = [] if self.as_root else ["--user", "--map-root-user"]
            return ["unshare", *user_ns, *namespaces, "--", *launcher]
        privilege = (
            ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
            if self.as_root
            else ["--unshare-user"]
        )
        return [
            "bwrap",
            *privilege,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--as-pid-1",
            *_bwrap_args(ops or []),
            "--chdir", DATA_INSIDE,
            "--",
            *launcher,
        ]  # fmt: skip


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _user_tasks() -> int:
    """Processes and threads the current user runs now (Linux; elsewhere a generous guess)."""
    if not os.path.isdir("/proc/self/task"):
        return 4096
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


def detect_isolation(requested: str = "auto", python: PythonInfo | None = None) -> Isolation:
    """The strongest isolation that works here (checked by really launching a sandbox once)."""
    if requested not in ISOLATION_CHOICES:
        raise ConfigurationError(
            f"Unknown sandbox isolation {requested!r}: use one of {', '.join(ISOLATION_CHOICES)}."
        )
    python = python or probe_python(sys.executable)
    return _detect(requested, python)


@functools.cache
def _detect(requested: str, python: PythonInfo) -> Isolation:
    if requested == "none":
        return Isolation("none", reason="isolation='none' was configured")
    candidates: list[IsolationMode] = ["bwrap", "unshare"] if requested == "auto" else [requested]  # type: ignore[list-item]
    reasons: list[str] = []
    for mode in candidates:
        problem = _try_mode(Isolation(mode), python)
        if problem is None:
            return Isolation(mode)
        reasons.append(f"{mode}: {problem}")
    if requested != "auto":
        raise SandboxError(
            f"Sandbox isolation {requested!r} does not work on this machine ({'; '.join(reasons)}). "
            "Use isolation='auto' to fall back to the strongest mode that works."
        )
    reason = "; ".join(reasons)
    log.warning("ci-magic: local sandboxes run without namespaces: %s", reason)
    return Isolation("none", reason=reason)


def _try_mode(isolation: Isolation, python: PythonInfo) -> str | None:
    tool = "bwrap" if isolation.mode == "bwrap" else "unshare"
    if not sys.platform.startswith("linux"):
        return "namespaces exist only on Linux"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    work = Path(tempfile.mkdtemp(prefix="cim-probe-", dir=_short_tmp()))
    paths = LaunchPaths.create(work)
    read_fd, write_fd = os.pipe()
    try:
        user = isolation.sandbox_user("cntr_probe0")
        if user:
            os.chown(paths.runtime_dir, *user)
            os.chown(work, *user)
        argv = isolation.command(
            python, paths, Limits(), user=user, ctl_fd=read_fd, kernel_argv=[], probe=True
        )
        done = subprocess.run(
            argv, env=_base_env(), pass_fds=(read_fd,), capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    finally:
        os.close(read_fd)
        os.close(write_fd)
        paths.remove()
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    return None
