"""How a sandbox kernel is isolated: the command line, its environment and its resource limits.

One mechanism, bubblewrap (``bwrap``), picked by :func:`detect_isolation`:

``bwrap``  a new root (``/usr``, a few ``/etc`` files, the interpreter's standard library and
           site-packages read-only; tmpfs ``/tmp`` and home; the data folder at ``/mnt/data``) in
           fresh user, mount, PID, network, IPC and UTS namespaces, with every capability gone,
           a seccomp filter (:mod:`.seccomp`) and no further user namespaces.
``none``   no namespaces, only resource limits and a clean environment. Never chosen by
           ``auto``: only a user who sets ``isolation = "none"`` gets it, and every status line
           then says "not isolated".

Without bubblewrap ``auto`` fails closed with :data:`NO_ISOLATION` (how to install it). The
earlier hand-written ``unshare`` + ``pivot_root`` path is gone: it did what bwrap does, with more
of our own code to get wrong, and bwrap is packaged wherever unprivileged namespaces work.

Who the sandbox is. As an ordinary user, bwrap maps sandbox uid 1000 to that user in a new user
namespace. As root, bwrap runs as root only to build the mount tree: the host itself writes the
namespace's uid map (``--userns-block-fd``), mapping sandbox uid 1000 to a per-container
unprivileged host uid (:meth:`Isolation.sandbox_user`), and bwrap switches to it and drops every
capability before the launcher starts. Either way no sandbox process has host root or any
capability, and the launcher (PID 1) makes itself non-dumpable before anything else.

What the sandbox can see is only what the interpreter needs (:func:`mount_plan`): never the
venv root (a ``pip.conf`` with credentials), never folders that ``.pth`` files add (the project
checkout and its ``.git/config``), nothing of the host's home. ``/proc/self/mountinfo`` still names
the host paths of the binds (the data folder, the interpreter): names only, nothing behind them.

What the host reads back. The runtime folder is two folders: ``k`` (the sandbox's
``/run/ci-magic``: connection file, ipc sockets, matplotlib's config) and ``h`` (host only: the
passwd file, and hard links to the kernel's sockets, each checked to be a socket owned by the
sandbox's uid before the host connects through it). The kernel's output is a pipe whose last
64 KiB the host keeps in memory, never a host file the sandbox could fill. Exit status comes back
over a pipe (see ``_launcher.py``), never through a file the sandbox could replace.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ci_magic.errors import ConfigurationError, SandboxError

__all__ = [
    "DATA_INSIDE",
    "MEMORY_TIERS",
    "NO_ISOLATION",
    "RUNTIME_INSIDE",
    "Isolation",
    "IsolationMode",
    "Launch",
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

IsolationMode = Literal["bwrap", "none"]
ISOLATION_CHOICES = ("auto", "bwrap", "none")

DATA_INSIDE = "/mnt/data"
RUNTIME_PREFIX = "cim-"  # host folders of running kernels: /tmp/cim-XXXX/{k,h,owner}
RUNTIME_INSIDE = "/run/ci-magic"
HOME_INSIDE = "/home/sandbox"
NEUTRAL_DIR = "/"  # PID 1's working directory: read-only, never on an import path
SANDBOX_UID_INSIDE = 1000  # the sandbox's uid and gid as it sees them
DROP_TO_SANDBOX_USER = (
    f"--reuid={SANDBOX_UID_INSIDE}",
    f"--regid={SANDBOX_UID_INSIDE}",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
)

NO_ISOLATION = (
    "Local sandboxes need bubblewrap to isolate the code a model writes, and it {problem}. "
    "Install it (`sudo apt-get install bubblewrap` on Debian/Ubuntu, `sudo dnf install bubblewrap` "
    "on Fedora; in a container, also allow user namespaces) and run the cell again. Only for "
    "code you trust, you can knowingly turn isolation off with "
    '`%config CodeInterpreter.isolation = "none"`: the code then runs as you, with your files, '
    'secrets and network, and every status line says "not isolated".'
)

GIB = 1 << 30
MEMORY_TIERS = {"1g": GIB, "4g": 4 * GIB, "16g": 16 * GIB, "64g": 64 * GIB}
# RLIMIT_DATA counts private writable memory, so an idle kernel with pandas and matplotlib
# loaded already uses ~300 MB of it (thread stacks, interpreter heap): give the tier on top.
DATA_HEADROOM = 512 << 20
# An idle kernel maps ~470 MB (libraries, thread stacks, malloc arenas) of which ~90 MB are
# private pages, so the tier plus this lets one process allocate about the tier.
ADDRESS_HEADROOM = 512 << 20
KERNEL_ALLOWANCE = 256 << 20  # the idle kernel's own ~120 MB, on top of the tier, for the tree
# Per process; budget.MAX_OPEN_FILES reads as many. Also bounds what pipes (64 KiB each, charged
# by the watchdog) a process can fill between two of its looks.
MAX_OPEN_FILES = 1024
MAX_LOCKED_BYTES = 8 << 20  # mlock()ed pages cannot be reclaimed; nothing here needs many

LAUNCHER_SOURCE = (Path(__file__).with_name("_launcher.py")).read_text(encoding="utf-8")
REQUIRED_MODULE = "ipykernel"
EXPECTED_MODULES = ("pandas", "numpy", "matplotlib")
SYSTEM_DIRS = ("/usr",)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# What libraries read from /etc: certificates, fonts, time zone, the dynamic loader's cache.
ETC_ENTRIES = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "debian_version", "fonts",
    "gai.conf", "host.conf", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
    "localtime", "mime.types", "nsswitch.conf", "os-release", "protocols", "services", "ssl",
    "timezone",
)  # fmt: skip
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
            "RLIMIT_NOFILE": MAX_OPEN_FILES,  # bounds the watchdog's walk of open files (pipes)
            "RLIMIT_MEMLOCK": MAX_LOCKED_BYTES,
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

    @property
    def sysv_shm_bytes(self) -> int:
        """System V shared memory the sandbox may hold (invisible to the watchdog, so small)."""
        return self.memory_bytes // 16


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
    visible_paths: tuple[str, ...]  # folders bound read-only, parents first (no system folders)
    version: str
    missing: tuple[str, ...] = ()  # expected data packages it lacks
    user_base: str | None = None
    site_dirs: tuple[str, ...] = ()  # site-packages folders, in sys.path order
    files: tuple[tuple[str, str], ...] = ()  # (host file, path inside): pyvenv.cfg, libpython
    links: tuple[tuple[str, str], ...] = ()  # (target, path inside): the venv's python symlink


PROBE_SOURCE = r"""
import importlib.util, json, os, site, sys, sysconfig
def real_dir(p):
    return bool(p) and os.path.isdir(p)
# The standard library and its extension modules (in a venv, sysconfig's "platstdlib" is the
# venv's own lib folder, which holds site-packages: not used).
stdlib = [os.path.dirname(os.__file__)]
stdlib += [p for p in sys.path if os.path.basename(p) == "lib-dynload" and real_dir(p)]
stdlib += [p for p in sys.path if p.endswith(".zip") and os.path.isfile(p)]
user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and real_dir(p)]
sites += [p for p in site.getsitepackages() if real_dir(p) and p not in sites]
if user_site and real_dir(user_site) and user_site not in sites:
    sites.append(user_site)
files = []
if sys.prefix != sys.base_prefix:
    files.append(os.path.join(sys.prefix, "pyvenv.cfg"))
if sysconfig.get_config_var("Py_ENABLE_SHARED"):
    for name in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", name or "")
        if name and os.path.isfile(lib):
            files.append(lib)
mods = sys.argv[1].split(",")
print(json.dumps({
    "stdlib": stdlib,
    "sites": sites,
    "files": [f for f in files if os.path.isfile(f)],
    "realexe": os.path.realpath(sys.executable),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "missing": [m for m in mods if importlib.util.find_spec(m) is None],
    "user_base": site.getuserbase() if user_site and real_dir(user_site) else None,
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
            cwd=NEUTRAL_DIR,
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
    realexe = report["realexe"]
    links: list[tuple[str, str]] = []
    files = [(path, path) for path in report["files"]]
    if os.path.realpath(executable) != executable:
        # The venv's bin/python stays a symlink inside, so the interpreter (and ld.so's $ORIGIN)
        # see the real binary; the folder around the real binary stays hidden.
        links.append((realexe, executable))
    files.append((realexe, realexe))
    return PythonInfo(
        executable=executable,
        visible_paths=_visible([*report["stdlib"], *report["sites"]]),
        version=report["version"],
        missing=tuple(report["missing"]),
        user_base=report["user_base"],
        site_dirs=tuple(report["sites"]),
        files=tuple(files),
        links=tuple(links),
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
                env=env, capture_output=True, timeout=300, check=False, cwd=NEUTRAL_DIR,
            )  # fmt: skip
        for built in work.glob("fontlist-*.json"):
            os.replace(built, folder / built.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _visible(paths: Sequence[str]) -> tuple[str, ...]:
    """Each folder and its symlink-free form, minus what ``/usr`` or a parent already shows."""
    found: set[str] = set()
    for raw in paths:
        for path in (os.path.abspath(raw), os.path.realpath(raw)):
            if os.path.isdir(path) and not _shown_by_system(path):
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
    runtime_dir: Path  # sandbox-writable (becomes /run/ci-magic): connection file, ipc sockets
    host_dir: Path  # the host's only: checked links to the sockets, passwd

    @classmethod
    def create(cls, data_dir: Path) -> LaunchPaths:
        # Unix socket paths are limited to ~107 bytes, so the sockets live in a short temp path
        # rather than next to the data (whose root may be deep in the user's home).
        base = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=_short_tmp()))
        (base / "k").mkdir(mode=0o700)
        (base / "h").mkdir(mode=0o700)
        (base / "owner").write_text(str(os.getpid()))
        return cls(data_dir=data_dir, runtime_dir=base / "k", host_dir=base / "h")

    def remove(self) -> None:
        shutil.rmtree(self.runtime_dir.parent, ignore_errors=True)

    @staticmethod
    def remove_stale() -> int:
        """Remove runtime folders whose owning process is gone (a session that was killed)."""
        removed = 0
        for base in Path(_short_tmp()).glob(f"{RUNTIME_PREFIX}*"):
            try:
                if base.is_symlink() or base.stat().st_uid != os.getuid():
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
    """What the sandbox sees, as bwrap operations; everything not listed is invisible."""
    ops: list[tuple[str | int, ...]] = []
    for system_dir in SYSTEM_DIRS:
        if os.path.isdir(system_dir):
            ops.append(("ro-bind", system_dir, system_dir))
    for name in SYSTEM_LINKS:
        if os.path.islink(name):
            ops.append(("symlink", os.readlink(name), name))
        elif os.path.isdir(name):
            ops.append(("ro-bind", name, name))
    made = {"/etc", "/home", "/mnt", "/run"}  # parents of our own mount points, made traversable
    ops += [("dir", d) for d in sorted(made)]
    # Of /etc only what libraries read (certificates, fonts, time zone, the loader's cache):
    # never the whole folder, whose other files (pip.conf, credentials of tools) are the host's.
    ops += [
        ("ro-bind", f"/etc/{name}", f"/etc/{name}") for name in ETC_ENTRIES if os.path.exists(f"/etc/{name}")
    ]
    ops += [("ro-bind", str(paths.host_dir / name), f"/etc/{name}") for name in ("passwd", "group")]
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
    inside = [*python.visible_paths, *(dest for _, dest in python.files), *(dest for _, dest in python.links)]
    parents = sorted(
        {str(p) for path in inside for p in Path(path).parents if str(p) != "/"},
        key=lambda p: (p.count("/"), p),
    )
    mounted = made | {"/tmp", HOME_INSIDE}
    ops += [("dir", parent) for parent in parents if not _shown_by_system(parent) and parent not in mounted]
    ops += [("ro-bind", path, path) for path in python.visible_paths]
    ops += [("ro-bind", source, dest) for source, dest in python.files if not _shown_by_system(dest)]
    ops += [("symlink", target, dest) for target, dest in python.links if not _shown_by_system(dest)]
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
    return {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}


@dataclass
class Launch:
    """One start of the launcher: its argv and the pipes between host and sandbox.

    The host keeps ``control_fd`` (write: the control bytes) and ``status_fd`` (read: how the
    kernel ended). ``child_fds`` are the sandbox's ends and the seccomp filter, inherited by the
    spawned process under the same numbers and closed here right after the spawn. As root,
    :meth:`map_user` must be called right after the spawn: bwrap waits for the uid map.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    child_fds: tuple[int, ...]
    control_fd: int
    status_fd: int
    user: tuple[int, int] | None = None  # root: the host uid/gid the sandbox's uid 1000 maps to
    info_fd: int | None = None  # root: bwrap's --info-fd (child-pid)
    release_fd: int | None = None  # root: bwrap's --userns-block-fd, written once mapped
    # As root, bwrap starts with no supplementary groups (root's would reach the sandbox). None
    # when root has none to drop: any list, even empty, makes Python fork instead of vfork, and
    # forking a notebook kernel of a few hundred MB costs tens of milliseconds per sandbox start.
    extra_groups: list[int] | None = field(default_factory=lambda: [] if _root_with_groups() else None)

    def spawned(self) -> None:
        """Close the sandbox's ends of the pipes in the host (the child has its own copies)."""
        for fd in self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = ()

    def map_user(self, timeout: float = 10.0) -> None:
        """As root: map uid/gid 1000 of bwrap's new user namespace to the container's host uid.

        Host root stays mapped as the namespace's root only for bwrap's own setup (it creates
        the mount points as root); ``setpriv`` then switches to uid 1000 and empties every
        capability set before the launcher starts, and no_new_privs plus nosuid mounts keep
        anything from going back.
        """
        if self.info_fd is None or self.release_fd is None or self.user is None:
            return
        info = _read_json_bounded(self.info_fd, timeout)
        pid = int(info["child-pid"])
        uid, gid = self.user
        # As root no "deny" in setgroups is needed; bwrap starts with no supplementary groups.
        for name, outside in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 0 1\n{SANDBOX_UID_INSIDE} {outside} 1\n")
        os.write(self.release_fd, b"1")

    def close(self) -> None:
        self.spawned()
        for fd in (self.control_fd, self.status_fd, self.info_fd, self.release_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.info_fd = self.release_fd = None


def _read_json_bounded(fd: int, timeout: float, limit: int = 4096) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise SandboxError("bubblewrap did not report its sandbox in time.")
        chunk = os.read(fd, limit - len(data))
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return dict(json.loads(data))
    raise SandboxError(f"bubblewrap stopped before reporting its sandbox ({data[:200]!r}).")


@dataclass(frozen=True)
class Isolation:
    mode: IsolationMode
    as_root: bool = field(default_factory=lambda: _is_root())
    reason: str = ""  # why isolation is off (for the warning)
    bwrap: str = "bwrap"  # the bubblewrap found on PATH when the mode was chosen
    setpriv: str | None = None  # util-linux setpriv: as root, how the sandbox leaves uid 0

    @property
    def namespaced(self) -> bool:
        return self.mode != "none"

    @property
    def label(self) -> str:
        """What a status line shows about the sandbox: empty when isolated."""
        return "" if self.namespaced else "not isolated"

    @property
    def warning(self) -> str | None:
        if self.namespaced:
            return None
        return (
            f"Local sandbox isolation is reduced to none, the code is not isolated "
            f"({self.reason or 'isolation is off'}): it runs as you, can read your files and "
            "secrets and reach the network; only resource limits and a clean environment apply, "
            "and /mnt/data paths do not exist (the working directory is the container's data "
            "folder). Remove the setting to isolate it with bubblewrap again."
        )

    def sandbox_user(self, container_id: str) -> tuple[int, int] | None:
        """As root, each container runs as its own unprivileged host uid (its process count is its own)."""
        if not (self.namespaced and self.as_root):
            return None
        digits = "".join(c for c in container_id if c in "0123456789abcdef")[-6:] or "0"
        uid = SANDBOX_UID_BASE + int(digits, 16)
        return uid, uid

    def host_uid(self, user: tuple[int, int] | None) -> int:
        """The host uid every sandbox process runs as (what owns the kernel's sockets)."""
        return user[0] if user else os.getuid()

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
            # Arrow's default mimalloc pool spins forever once RLIMIT_AS refuses it a new arena
            # (seen after matplotlib had drawn: pd.read_parquet never returned and ignored the
            # interrupt). The system allocator answers the same refusal with a MemoryError.
            ARROW_DEFAULT_MEMORY_POOL="system",
            # mimalloc (Arrow's, for code that picks it, and other libraries bundling it) reserves
            # 1 GiB of address space for its first arena: two thirds of a 1g container's limit.
            MIMALLOC_ARENA_RESERVE="64MiB",
        )
        if python.user_base:
            env["PYTHONUSERBASE"] = python.user_base
        return env

    def launch(
        self,
        python: PythonInfo,
        paths: LaunchPaths,
        limits: Limits,
        *,
        user: tuple[int, int] | None,
        kernel_argv: Sequence[str],
        probe: bool = False,
        seccomp: bool = True,
    ) -> Launch:
        """How to start the launcher (and through it the kernel) inside the sandbox.

        ``seccomp=False`` exists for the benchmark's cost-of-each-protection figures only.
        """
        ctl_read, ctl_write = os.pipe()
        status_read, status_write = os.pipe()
        os.set_blocking(status_read, False)
        child_fds = [ctl_read, status_write]
        config = {
            "pid_namespace": self.namespaced,
            # In a namespace the sandbox's user counts only the sandbox's processes; without one
            # it is the host user, who already runs some.
            "rlimits": limits.rlimits(processes_already_running=0 if self.namespaced else _user_tasks()),
            "cwd": self.data_inside(paths),
            "site_dirs": list(python.site_dirs),
            "ctl_fd": ctl_read,
            "status_fd": status_write,
            "kernel_module": "ipykernel_launcher",
            "block_modules": ["debugpy"],
            "kernel_argv": ["ipykernel_launcher", *kernel_argv],
            "probe": probe,
        }
        # -I: no PYTHON* variables, user site, script or working folder on sys.path; -S: no .pth.
        launcher = [python.executable, "-I", "-S", "-c", LAUNCHER_SOURCE]
        plan = Launch(
            argv=[],
            env=self.environment(python, paths),
            cwd=str(paths.host_dir),
            child_fds=(),
            control_fd=ctl_write,
            status_fd=status_read,
        )
        try:
            if not self.namespaced:
                plan.argv = [*launcher, json.dumps(config)]
                plan.child_fds = tuple(child_fds)
                return plan
            _write_identity(paths.host_dir)
            privilege: list[str] = []
            if self.as_root and user is not None:
                # bwrap refuses --disable-userns with a uid map written by its caller, so nested
                # user namespaces are refused by the seccomp filter (unshare, clone flags, clone3).
                info_read, info_write = os.pipe()
                release_read, release_write = os.pipe()
                child_fds += [info_write, release_read]
                plan.info_fd, plan.release_fd, plan.user = info_read, release_write, user
                privilege = ["--userns-block-fd", str(release_read), "--info-fd", str(info_write)]
                # bwrap does not change uid itself here (its uid is the caller's, root): setpriv
                # (util-linux) switches to uid 1000 with only these three capabilities, which it
                # needs to do that and to empty the bounding set, and which are gone once it has.
                privilege += ["--cap-drop", "ALL"]
                for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
                    privilege += ["--cap-add", cap]
                launcher = [self.setpriv or "setpriv", *DROP_TO_SANDBOX_USER, "--", *launcher]
            else:
                privilege = ["--disable-userns"]
            if seccomp:
                from ci_magic.backends.local.seccomp import filter_pipe

                seccomp_fd = filter_pipe()
                child_fds.append(seccomp_fd)
                privilege += ["--seccomp", str(seccomp_fd)]
            plan.child_fds = tuple(child_fds)
            plan.argv = [
                self.bwrap,
                "--unshare-user", "--uid", str(SANDBOX_UID_INSIDE), "--gid", str(SANDBOX_UID_INSIDE),
                *privilege,
                "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "sandbox",
                "--die-with-parent", "--new-session", "--as-pid-1",
                *_bwrap_args(mount_plan(python, paths, limits)),
                "--chdir", NEUTRAL_DIR,
                "--",
                *launcher, json.dumps(config),
            ]  # fmt: skip
            return plan
        except BaseException:
            plan.child_fds = tuple(child_fds)
            plan.close()
            raise


def _write_identity(folder: Path) -> None:
    """The sandbox's own /etc/passwd and /etc/group: its user, not the host's list of users."""
    uid = SANDBOX_UID_INSIDE
    (folder / "passwd").write_text(
        f"root:x:0:0::/nonexistent:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}::{HOME_INSIDE}:/bin/sh\n"
        "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
    )
    (folder / "group").write_text(f"root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _root_with_groups() -> bool:
    return _is_root() and bool(os.getgroups())


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
    """The isolation to use: bubblewrap, checked by really launching a sandbox once; never less.

    ``auto`` and ``bwrap`` raise :class:`SandboxError` (:data:`NO_ISOLATION`) when bubblewrap is
    missing or does not work here. Only ``none``, set knowingly, runs without isolation.
    """
    if requested not in ISOLATION_CHOICES:
        raise ConfigurationError(
            f"Unknown sandbox isolation {requested!r}: use one of {', '.join(ISOLATION_CHOICES)} "
            '("auto" uses bubblewrap and never runs code unisolated).'
        )
    if requested == "none":
        return Isolation("none", reason="isolation='none' was configured")
    python = python or probe_python(sys.executable)
    return _detect(shutil.which("bwrap"), python)


@functools.cache
def _detect(bwrap: str | None, python: PythonInfo) -> Isolation:
    if not sys.platform.startswith("linux"):
        problem = "cannot run here: namespaces exist only on Linux (use the openai backend)"
        raise SandboxError(NO_ISOLATION.format(problem=problem))
    if bwrap is None:
        raise SandboxError(NO_ISOLATION.format(problem="is not installed (no `bwrap` on PATH)"))
    setpriv = shutil.which("setpriv", path=SYSTEM_PATH)
    if _is_root() and setpriv is None:
        problem = "cannot leave root without util-linux's setpriv (`apt-get install util-linux`)"
        raise SandboxError(NO_ISOLATION.format(problem=problem))
    isolation = Isolation("bwrap", bwrap=bwrap, setpriv=setpriv)
    trouble = _try(isolation, python)
    if trouble is not None:
        raise SandboxError(NO_ISOLATION.format(problem=f"does not work here ({trouble})"))
    return isolation


def _try(isolation: Isolation, python: PythonInfo) -> str | None:
    """Start a probe sandbox (no kernel); None when it worked, else bwrap's complaint."""
    work = Path(tempfile.mkdtemp(prefix="cim-probe-", dir=_short_tmp()))
    paths = LaunchPaths.create(work)
    plan: Launch | None = None
    try:
        user = isolation.sandbox_user("cntr_probe0")
        if user:
            os.chown(paths.runtime_dir, *user)
            os.chown(work, *user)
        plan = isolation.launch(python, paths, Limits(), user=user, kernel_argv=[], probe=True)
        process = subprocess.Popen(
            plan.argv, env=plan.env, cwd=plan.cwd, pass_fds=plan.child_fds, extra_groups=plan.extra_groups,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        plan.spawned()
        try:
            plan.map_user()
        except (OSError, SandboxError, ValueError, KeyError) as err:
            process.kill()
            _, stderr = process.communicate(timeout=30)
            return _last_line(stderr) or str(err)
        _, stderr = process.communicate(timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    finally:
        if plan is not None:
            plan.close()
        paths.remove()
        shutil.rmtree(work, ignore_errors=True)
    if process.returncode != 0:
        return _last_line(stderr) or f"exit status {process.returncode}"
    return None


def _last_line(stderr: bytes | None) -> str:
    lines = (stderr or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""
