"""The first code that runs inside a sandbox: PID 1 (the reaper), which forks the Jupyter kernel.

This file is never imported by ci-magic. ``isolation.py`` passes its source to the *sandbox*
interpreter as ``python -I -S -c SOURCE CONFIG`` (CONFIG is one JSON argument), so it may use
only the standard library and must run on any Python 3.8+.

How it starts, and why it is safe to start this way: bwrap has already made the namespaces,
switched to the sandbox's unprivileged uid, dropped every capability and installed the seccomp
filter. The interpreter runs isolated (``-I``: no ``PYTHON*`` variables, no user site, no script
or working directory on ``sys.path``) and without ``site`` (``-S``: no ``.pth`` file is read),
from a read-only working directory (``/``). So PID 1 imports only the standard library, from
read-only binds, and nothing the sandbox can write is on its import path. Its first act is to
make itself non-dumpable: sandbox code (same uid) can then neither open ``/proc/1/mem`` nor
``/proc/1/fd/*``, and the filter refuses ``ptrace`` besides.

::

    PID 1:  non-dumpable, rlimits, fork
    child:  close the control and status pipes, dumpable again, chdir to /mnt/data, add the
            interpreter's site-packages folders (and only those), run ipykernel in this process
    PID 1:  reap orphans, act on control bytes, report how the kernel ended, exit with it

Control protocol (host -> PID 1, the inherited read end ``ctl_fd``; one byte per command)::

    "i"   SIGINT to the kernel (works even when its control thread cannot get the GIL)
    "c"   SIGKILL to every process of the sandbox except PID 1 and the kernel (after a timeout:
          threads of the kernel are not processes and stay; detached children do not)
    "k"   kill everything and exit (PID 1 exiting ends the whole PID namespace)
    EOF   the host went away: the same as "k"

Status protocol (PID 1 -> host, the inherited write end ``status_fd``): one line, at most 64
bytes, written once when the kernel has ended: ``exit N`` or ``signal N``. The host reads it
non-blocking and bounded; nothing is written to a file the sandbox could replace.
"""

import contextlib
import ctypes
import json
import os
import select
import signal
import sys

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = None


def prctl(option, arg2=0):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if _libc.prctl(option, arg2, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


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
            # Without namespaces (isolation="none", macOS) some limits cannot be set.


def become_kernel(config):
    os.close(config["ctl_fd"])
    os.close(config["status_fd"])
    if sys.platform.startswith("linux"):
        # Inherited from PID 1; the kernel is the sandbox's own code and needs its /proc/self.
        prctl(PR_SET_DUMPABLE, 1)
    os.chdir(config["cwd"])
    os.umask(0o022)
    if config.get("probe"):
        os._exit(0)  # isolation works: nothing else to check
    import site

    sys.dont_write_bytecode = True  # -I ignores PYTHONDONTWRITEBYTECODE: no __pycache__ in /mnt/data
    for folder in config["site_dirs"]:
        site.addsitedir(folder)  # reads that folder's .pth files; missing targets are skipped
    # What `site` would have given an interactive session (-S skipped it).
    site.setquit()
    site.setcopyright()
    site.sethelper()
    # The kernel may import the container's files, after the standard library, as IPython
    # arranges it (it is the sandbox itself; nothing privileged ever imports from /mnt/data).
    first_site = next((i for i, p in enumerate(sys.path) if p in config["site_dirs"]), len(sys.path))
    sys.path.insert(first_site, "")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in config.get("block_modules", ()):
        # None in sys.modules makes "import name" raise ImportError: ipykernel then skips its
        # optional debugger (debugpy), a tenth of a second of imports nobody uses in a sandbox.
        sys.modules[name] = None  # type: ignore[assignment]
    sys.argv = list(config["kernel_argv"])
    import runpy

    runpy.run_module(config["kernel_module"], run_name="__main__", alter_sys=True)


def describe(status):
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}\n"
    return f"exit {os.WEXITSTATUS(status)}\n"


def sandbox_processes(config):
    """Live pids of the sandbox's processes other than this one (zombies are already dead)."""
    me = os.getpid()
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            parents[int(name)] = int(parent)
    if config.get("pid_namespace"):
        return list(parents)  # this /proc shows only the sandbox's PID namespace
    # No PID namespace (isolation="none"): only our descendants, found through their parents.
    ours = []
    for pid in parents:
        seen, cursor = set(), pid
        while cursor in parents and cursor not in seen:
            seen.add(cursor)
            cursor = parents[cursor]
            if cursor == me:
                ours.append(pid)
                break
    return ours


def kill_all_but_kernel(kernel_pid, config):
    """SIGKILL every other process; rounds, so children forked meanwhile are caught too."""
    for _ in range(50):
        strays = [pid for pid in sandbox_processes(config) if pid != kernel_pid]
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        reap_orphans(kernel_pid, config)


def reap_orphans(kernel_pid, config):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == kernel_pid:
            finish(kernel_pid, config, status)


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
            if b"c" in command:
                kill_all_but_kernel(kernel_pid, config)
            if b"i" in command:
                os.kill(kernel_pid, signal.SIGINT)
        reap_orphans(kernel_pid, config)


def finish(kernel_pid, config, status):
    code = 137
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kernel_pid, signal.SIGKILL)
    else:
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):  # the host is gone
            os.write(config["status_fd"], describe(status).encode("ascii"))
    if not config.get("pid_namespace"):
        # Without a PID namespace nothing kills the kernel's children for us.
        for pid in sandbox_processes(config):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    os._exit(code)


def main():
    config = json.loads(sys.argv[1])
    if sys.platform.startswith("linux"):
        prctl(PR_SET_DUMPABLE, 0)  # before anything else: sandbox code shares our uid
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # bwrap set it already; isolation="none" did not
        if not config.get("pid_namespace"):
            prctl(PR_SET_CHILD_SUBREAPER, 1)
    set_limits(config["rlimits"], strict=config.get("pid_namespace"))
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
