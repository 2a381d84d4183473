"""The sandbox's system-call filter, built on the host with libseccomp and handed to bwrap.

Sandbox code never needs to debug other processes, load kernel code, mount file systems, make
namespaces or inject keystrokes into a terminal, and each of those is kernel attack surface that
has had local privilege escalations. The filter answers them with ``EPERM`` (``clone3`` with
``ENOSYS``, so libc falls back to ``clone``, whose flags a filter can read). Sockets are limited
to the families a data-science library uses (UNIX, IPv4, IPv6, netlink): the others, AF_VSOCK
first, are not isolated by the network namespace or are rarely-used kernel code. Memory the
container's budget could not see is refused at its source: ``memfd_create`` (a memfd sent over a
socket and closed belongs to no process; libraries fall back to the counted /dev/shm and /tmp)
and growing a pipe past its default 64 KiB (``F_SETPIPE_SZ``), so the watchdog can charge every
open pipe at that size; so is what the whole machine shares (Linux AIO contexts, ``io_setup``).
Extended attributes cannot be set (``EOPNOTSUPP``, as on a file system without them): on tmpfs
their values are kernel memory that no file size shows (3 GiB of them filled 6 GiB of the host's
slab from a 1g container). Everything else is allowed, except system calls newer than
libseccomp knows: they answer ``ENOSYS``, as on an older kernel (libc falls back), so a new twin
of a denied call (``setxattrat``, ``open_tree_attr``) cannot slip past a filter built with an
older libseccomp.

System calls of another architecture (32-bit ``int 0x80`` on x86-64) kill the caller,
libseccomp's default for a foreign architecture, so the filter cannot be sidestepped that way.

The filter is compiled once per process (:func:`filter_bpf`) and written into a pipe for each
launch (:func:`filter_pipe`); bwrap installs it with ``--seccomp FD`` just before it starts the
launcher, so it holds for PID 1, the kernel and every process they start.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import sys
import tempfile
from typing import Any

from ci_magic.errors import SandboxError

__all__ = ["ALLOWED_SOCKET_FAMILIES", "DENIED_SYSCALLS", "filter_bpf", "filter_pipe"]

# Denied outright (EPERM). Names missing on this architecture are skipped.
DENIED_SYSCALLS = (
    # Reading or writing another process's memory (PID 1 included).
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    # Large kernel interfaces with a history of privilege escalations.
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "userfaultfd",
    "perf_event_open", "keyctl", "add_key", "request_key",
    # Kernel code, the machine itself.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "uselib",
    # File systems and namespaces: the sandbox's view of the world is fixed once it starts.
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fspick", "mount_setattr", "setns", "unshare",
    # File handles bypass path permissions (the "shocker" escape).
    "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip

# Answered with ENOSYS, as on a kernel without them, so libraries take their fallback path.
# io_setup: Linux AIO contexts come from one machine-wide pool (fs.aio-max-nr): a sandbox took
# all 65,536 and the host's own io_setup failed with EAGAIN while it held them.
UNAVAILABLE_SYSCALLS = ("memfd_create", "memfd_secret", "io_setup")
# Answered with EOPNOTSUPP, as by a file system without extended attributes (shutil.copystat and
# friends ignore it). Values set on tmpfs are kernel memory the budget cannot see.
NO_XATTR_SYSCALLS = ("setxattr", "lsetxattr", "fsetxattr")

# socket()/socketpair() families the sandbox may use; any other is refused with EAFNOSUPPORT.
ALLOWED_SOCKET_FAMILIES = (
    1,  # AF_UNIX: ipykernel's ipc sockets, multiprocessing
    2,  # AF_INET
    10,  # AF_INET6
    16,  # AF_NETLINK: libc's getaddrinfo, psutil (only the sandbox's own network namespace)
)
HIGHEST_FAMILY = 64  # above AF_MAX of any kernel: one "greater or equal" rule covers the rest
F_SETPIPE_SZ = 1031  # fcntl: a pipe's capacity up to fs.pipe-max-size (1 MiB), unaccounted

# clone() flags that make a new namespace; CLONE_NEWTIME (0x80) lies in clone's exit-signal
# byte, which no real signal number reaches.
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
TIOCSTI = 0x5412  # push characters into a terminal's input: commands typed "by the user"
TIOCLINUX = 0x541C  # the same through the Linux console, plus reading its screen
PER_LINUX = 0  # personality(): anything else could turn off address randomisation

INSTALL_HINT = (
    "The local sandbox filters system calls with libseccomp, which could not be loaded ({why}). "
    "Install it (`apt-get install libseccomp2` on Debian/Ubuntu, `dnf install libseccomp` on "
    "Fedora) and the Python binding (`pip install pyseccomp`), then run the cell again."
)


@functools.cache
def filter_bpf() -> bytes:
    """The compiled BPF program (cached: the rules do not change while ci-magic runs)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as err:  # the binding, or libseccomp.so.2 behind it
        raise SandboxError(INSTALL_HINT.format(why=err)) from err
    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        _add(rules, deny, name)
    for flag in NAMESPACE_FLAGS:
        _add(rules, deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # The kernel compares only the low 32 bits of an ioctl request, so must the filter.
    for request in (TIOCSTI, TIOCLINUX):
        _add(rules, deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    _add(rules, deny, "personality", seccomp.Arg(0, seccomp.NE, PER_LINUX))
    unavailable = seccomp.ERRNO(errno.ENOSYS)
    for name in UNAVAILABLE_SYSCALLS:
        _add(rules, unavailable, name)
    _add(rules, deny, "fcntl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, F_SETPIPE_SZ))
    # A family is an int, but the filter sees the whole 64-bit register: every value that is
    # not exactly an allowed family is refused, high bits set included (the GE rule).
    no_family = seccomp.ERRNO(errno.EAFNOSUPPORT)
    for name in ("socket", "socketpair"):
        for family in range(HIGHEST_FAMILY):
            if family not in ALLOWED_SOCKET_FAMILIES:
                _add(rules, no_family, name, seccomp.Arg(0, seccomp.EQ, family))
        _add(rules, no_family, name, seccomp.Arg(0, seccomp.GE, HIGHEST_FAMILY))
    _add(rules, seccomp.ERRNO(errno.ENOSYS), "clone3")
    no_xattr = seccomp.ERRNO(errno.EOPNOTSUPP)
    for name in NO_XATTR_SYSCALLS:
        _add(rules, no_xattr, name)
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return _newer_syscalls_unavailable(seccomp) + out.read()


# Classic BPF (linux/filter.h, linux/seccomp.h, linux/audit.h) for the prefix below.
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4  # offsets in struct seccomp_data
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
HIGHEST_SYSCALL_SEEN = 1024  # above any system call number of the 64-bit ABIs, x32's bit aside


def _newer_syscalls_unavailable(seccomp: Any) -> bytes:
    """BPF run before libseccomp's program: system calls it does not know answer ``ENOSYS``.

    libseccomp resolves only the calls of its own release; a rule for a newer one is silently
    skipped, and a default-allow filter lets it through. The prefix compares the number against
    the first one libseccomp cannot name and otherwise falls through into its program (classic
    BPF jumps only forward, so the program's own jumps are unchanged).
    """
    arch = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}.get(os.uname().machine)
    if arch is None:
        return b""  # numbering not checked on this architecture: libseccomp's program alone
    first_unknown = 0
    for number in range(HIGHEST_SYSCALL_SEEN):
        try:
            seccomp.resolve_syscall(seccomp.Arch.NATIVE, number)
        except ValueError:
            continue
        first_unknown = number + 1
    instruction = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
    program = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 0, 3, arch),  # another ABI: libseccomp's program decides (it kills)
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        # x86-64's x32 calls (bit 30) are numbers past this too: refused either way.
        (BPF_JGE_K, 0, 1, first_unknown),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    if sys.byteorder != "little":
        return b""  # the architectures above are little-endian
    return b"".join(instruction.pack(*step) for step in program)


def _add(rules: Any, action: int, name: str, *conditions: Any) -> None:
    import pyseccomp as seccomp

    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
        return  # no such system call on this architecture: nothing to deny
    rules.add_rule(action, name, *conditions)


def filter_pipe() -> int:
    """A pipe's read end holding the filter, for ``bwrap --seccomp FD`` (the caller closes it)."""
    program = filter_bpf()
    read_fd, write_fd = os.pipe()
    try:
        # A pipe holds 64 KiB without a reader; the program is a few KiB.
        written = os.write(write_fd, program)
        if written != len(program):
            raise SandboxError("The sandbox's system-call filter did not fit into a pipe.")
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd
