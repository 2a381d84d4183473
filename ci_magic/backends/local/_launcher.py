"""The first code that runs inside a sandbox: finish isolating, then become the Jupyter kernel.

This file is never imported by ci-magic. ``isolation.py`` passes its source to the *sandbox*
interpreter with ``python -c``, followed by one JSON argument, so it may use only the standard
library and must run on any Python 3.8+ (the sandbox Python can be an older interpreter).

Steps (each optional, driven by the JSON config)::

    build a new root from mount operations and pivot_root into it   (unshare mode; bwrap does this itself)
    fork:  parent = reaper (PID 1 of the sandbox's PID namespace)  child = kernel
    child: drop to the sandbox user / drop every capability, set rlimits, no_new_privs,
           close the control pipe, run ipykernel in this same process (no second interpreter start)
    reaper: reap orphans, turn control bytes into signals ("i" interrupt, "k" kill), write the
            kernel's exit status to a file, exit when the kernel exits or the host goes away (EOF)
"""

import contextlib
import ctypes
import errno
import json
import os
import platform
import select
import signal
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# statvfs f_flag bit -> mount flag that must be kept when remounting inside a user namespace
# (the kernel refuses to clear "locked" flags inherited from the host mount).
KEEP_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

PIVOT_ROOT = {
    "x86_64": 155,
    "amd64": 155,
    "aarch64": 41,
    "arm64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
    "i686": 217,
    "i386": 217,
    "armv7l": 218,
}

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def check(result, what):
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source, target, fstype, flags, data=None):
    def enc(value):
        return value.encode() if value is not None else None

    lib = libc()
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    check(
        lib.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount {source or fstype} on {target}",
    )


def kept_flags(path):
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in KEEP_FLAGS if flags & st)


def submounts(target):
    """Mount points at or under ``target`` (from /proc/self/mountinfo), parents first."""
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4]
            point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            if point == target or point.startswith(target.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=len)


def make_readonly(target):
    # A recursive bind copies sub-mounts writable: make every one of them read-only too.
    for point in submounts(target):
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept_flags(point))
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT):
                raise
            # Mounts we cannot touch are the host's own read-only or locked ones.


def ensure_dir(path):
    os.makedirs(path, mode=0o755, exist_ok=True)


def ensure_file(path):
    ensure_dir(os.path.dirname(path))
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def bind(source, dest, readonly):
    if os.path.isdir(source):
        ensure_dir(dest)
    else:
        ensure_file(dest)
    mount(source, dest, None, MS_BIND | MS_REC)
    if readonly:
        make_readonly(dest)


def loopback_up():
    """Bring up ``lo`` in the new network namespace (as bwrap does): local servers keep working."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def build_root(new_root, operations):
    """Apply bwrap-like mount operations under ``new_root`` (a fresh tmpfs), then pivot into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for op in operations:
        kind, args = op[0], op[1:]
        if kind in ("ro-bind", "bind"):
            source, dest = args
            bind(source, new_root + dest, readonly=(kind == "ro-bind"))
        elif kind == "tmpfs":
            dest, size = args
            ensure_dir(new_root + dest)
            options = "mode=1777" + (f",size={size}" if size else "")
            mount("tmpfs", new_root + dest, "tmpfs", MS_NOSUID | MS_NODEV, options)
        elif kind == "dir":
            ensure_dir(new_root + args[0])
        elif kind == "symlink":
            target, dest = args
            ensure_dir(os.path.dirname(new_root + dest))
            os.symlink(target, new_root + dest)
        elif kind == "proc":
            ensure_dir(new_root + args[0])
            mount("proc", new_root + args[0], "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif kind == "dev":
            build_dev(new_root + args[0])
        elif kind != "remount-ro":
            raise ValueError(f"unknown mount operation {kind!r}")
    pivot(new_root)
    for op in operations:
        if op[0] == "remount-ro":
            mount(None, op[1], None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_dev(dev):
    ensure_dir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            ensure_file(dev + "/" + name)
            mount("/dev/" + name, dev + "/" + name, None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, dev + "/" + name)
    ensure_dir(dev + "/shm")
    os.chmod(dev + "/shm", 0o1777)


def pivot(new_root):
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown system call number on {platform.machine()}")
    os.chdir(new_root)
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves only ours.
    check(libc().syscall(number, b".", b"."), "pivot_root")
    lib = libc()
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    check(lib.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def prctl(option, arg2=0):
    lib = libc()
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    check(lib.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


def drop_capabilities(bounding=True):
    """Leave no capability behind, not even one a later exec of a setuid-root file could regain."""
    if bounding:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            prctl(PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = CapHeader(0x20080522, 0)
    data = (CapData * 2)()
    check(libc().capset(ctypes.byref(header), data), "capset")


def set_limits(limits, strict):
    import resource

    for name, value in limits.items():
        number = getattr(resource, name, None)
        if number is None:
            continue  # e.g. RLIMIT_NPROC does not exist everywhere
        hard = resource.getrlimit(number)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(number, (value, value))
        except (ValueError, OSError):
            if strict:
                raise
            # Without namespaces (macOS) some limits cannot be set; isolation is reduced anyway.


def become_kernel(config):
    os.close(config["ctl_fd"])
    user = config.get("user")
    if user:
        os.setgroups([])
        os.setresgid(user[1], user[1], user[1])
        os.setresuid(user[0], user[0], user[0])
        # Leaving root cleared the permitted and effective sets; this clears the inheritable one.
        drop_capabilities(bounding=False)
    elif config.get("drop_caps"):
        drop_capabilities()
    if sys.platform.startswith("linux"):
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    set_limits(config["rlimits"], strict=config.get("pid_namespace"))
    os.chdir(config["cwd"])
    os.umask(0o022)
    if config.get("probe"):
        os._exit(0)  # isolation works: nothing else to check
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in config.get("block_modules", ()):
        # None in sys.modules makes "import name" raise ImportError: ipykernel then skips its
        # optional debugger (debugpy), a tenth of a second of imports nobody uses in a sandbox.
        sys.modules[name] = None
    sys.argv = list(config["kernel_argv"])
    sys.path[0] = config["cwd"]
    import runpy

    runpy.run_module(config["kernel_module"], run_name="__main__", alter_sys=True)


def describe(status):
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def reap(kernel_pid, config):
    """Wait for the kernel; also reap every orphan re-parented to us."""
    ctl = config["ctl_fd"]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: os.kill(kernel_pid, signal.SIGINT))
    signal.signal(signal.SIGTERM, lambda *_: finish(kernel_pid, config, None))
    while True:
        try:
            readable, _, _ = select.select([ctl, wake_r], [], [], 5.0)
        except InterruptedError:
            readable = []
        if wake_r in readable:
            os.read(wake_r, 512)
        if ctl in readable:
            command = os.read(ctl, 64)
            if not command or b"k" in command:
                finish(kernel_pid, config, None)  # the host closed the pipe or asked: end everything
            if b"i" in command:
                os.kill(kernel_pid, signal.SIGINT)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == kernel_pid:
                finish(kernel_pid, config, status)


def finish(kernel_pid, config, status):
    code = 137
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kernel_pid, signal.SIGKILL)
    else:
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            with open(config["status_file"], "w") as f:
                f.write(describe(status))
        except OSError:
            pass
    if not config.get("pid_namespace"):
        # Without a PID namespace nothing kills the kernel's children for us: they share our group.
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)
    os._exit(code)


def main():
    config = json.loads(sys.argv[1])
    if config.get("mounts") is not None:
        build_root(config["new_root"], config["mounts"])
        loopback_up()
    if not config.get("pid_namespace") and sys.platform.startswith("linux"):
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    kernel_pid = os.fork()
    if kernel_pid == 0:
        try:
            become_kernel(config)
        except BaseException as err:  # report anything, then die without cleanup
            sys.stderr.write(f"ci-magic sandbox: could not start the kernel: {err!r}\n")
            sys.stderr.flush()
            os._exit(70)
        os._exit(0)
    reap(kernel_pid, config)


if __name__ == "__main__":
    try:
        main()
    except OSError as err:
        sys.stderr.write(f"ci-magic sandbox: setup failed: {err}\n")
        sys.exit(71)
