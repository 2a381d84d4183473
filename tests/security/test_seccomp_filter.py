"""Class 5 of issue 9: the kernel's attack surface, as sandbox code reaches it.

Hostile code calls the system calls the sandbox must never have, straight through libc's
``syscall()`` (no Python wrapper to trust), with arguments for which an unfiltered kernel would
answer something other than EPERM (success, EINVAL, EFAULT, EBADF, ENOTTY): so EPERM everywhere
is the filter's doing. Run as root and as ``nobody``.
"""

from __future__ import annotations

import errno

import pyseccomp  # a dependency of ci-magic: its absence is a failure, not a skip

from tests.security.sandbox_support import Attacker, stdout

# name -> arguments (ints; "buf" is a 4 KiB scratch buffer). Chosen so that without the filter
# the call would succeed or fail with another errno than EPERM where the kernel allows it.
CALLS: dict[str, tuple[object, ...]] = {
    "ptrace": (0, 0, 0, 0),  # PTRACE_TRACEME: allowed to anyone unfiltered
    "process_vm_readv": ("self", 0, 0, 0, 0, 0),  # zero iovecs of ourselves: 0 unfiltered
    "process_vm_writev": ("self", 0, 0, 0, 0, 0),
    "io_uring_setup": (0, 0),  # EINVAL/EFAULT unfiltered
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),  # EBADF unfiltered
    "io_uring_register": (-1, 0, 0, 0),
    "bpf": (9999, 0, 0),  # EINVAL unfiltered
    "userfaultfd": (0,),
    "keyctl": (0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring: works unfiltered
    "add_key": (0, 0, 0, 0, 0),  # EFAULT unfiltered
    "request_key": (0, 0, 0, 0),
    "perf_event_open": (0, 0, -1, -1, 0),  # EFAULT unfiltered
    "kexec_load": (0, 0, 0, 0),
    "kexec_file_load": (-1, -1, 0, 0, 0),
    "init_module": (0, 0, 0),
    "finit_module": (-1, 0, 0),
    "delete_module": (0, 0),
    "reboot": (0, 0, 0, 0),  # EINVAL unfiltered (bad magic)
    "swapon": (0, 0),
    "swapoff": (0,),
    "acct": (0,),
    "quotactl": (0, 0, 0, 0),
    "mount": (0, 0, 0, 0, 0),
    "umount2": (0, 0),
    "pivot_root": (0, 0),
    "chroot": (0,),
    "move_mount": (-1, 0, -1, 0, 0),
    "open_tree": (-1, 0, 0),
    "fsopen": (0, 0),
    "fsmount": (-1, 0, 0),
    "fspick": (-1, 0, 0),
    "setns": (-1, 0),  # EBADF unfiltered
    "unshare": (0,),  # unshare(0) succeeds unfiltered
    "open_by_handle_at": (-1, 0, 0),
    "name_to_handle_at": (-100, "buf", 0, 0, 0),  # EFAULT unfiltered
    "personality": (0x0040000,),  # ADDR_NO_RANDOMIZE: works unfiltered
}
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
CLONE_NAMESPACES = {
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
SIGCHLD = 17

ATTACK = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(4096)
def call(number, *args):
    values = [ctypes.c_long(os.getpid() if a == "self" else ctypes.addressof(buf) if a == "buf" else a)
              for a in args]
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *values)
    return result, ctypes.get_errno()
def report(name, outcome):
    result, code = outcome
    if result == 0 and name.startswith("clone"):
        os._exit(0) if os.getpid() != parent else None  # a child that escaped the filter leaves
    print(name, result, code)
parent = os.getpid()
"""


def numbers() -> dict[str, int]:
    found = {
        name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in [*CALLS, "ioctl", "clone"]
    }
    found["clone3"] = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "clone3")
    return {name: number for name, number in found.items() if number >= 0}


def run(attacker: Attacker, lines: list[str]) -> dict[str, tuple[int, int]]:
    out = stdout(attacker.execute(ATTACK + "\n".join(lines)))
    results = {}
    for line in out.splitlines():
        name, result, code = line.split()
        results[name] = (int(result), int(code))
    return results


def test_every_dangerous_system_call_is_refused_with_eperm(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    table = numbers()
    lines = [
        f"report({name!r}, call({table[name]}, *{args!r}))" for name, args in CALLS.items() if name in table
    ]
    results = run(attacker, lines)
    assert set(results) == {name for name in CALLS if name in table}
    wrong = {name: outcome for name, outcome in results.items() if outcome != (-1, errno.EPERM)}
    assert wrong == {}, f"not refused with EPERM (result, errno): {wrong}"


def test_new_namespaces_cannot_be_made_by_clone_clone3_or_the_unshare_tool(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    table = numbers()
    lines = [
        f"report('clone-{flag}', call({table['clone']}, {value | SIGCHLD}, 0, 0, 0, 0))"
        for flag, value in CLONE_NAMESPACES.items()
    ]
    # The 64-bit clone_args of clone3 cannot be read by a filter: it must be unavailable (ENOSYS),
    # which makes libc fall back to clone.
    lines.append(f"report('clone3', call({table['clone3']}, 'buf', 88))")
    lines.append(
        "import subprocess\n"
        "for argv in (['unshare', '--user', '--map-root-user', 'true'], ['unshare', '-Urm', 'mount', '-t', "
        "'tmpfs', 'none', '/tmp'], ['unshare', '--net', 'true']):\n"
        "    done = subprocess.run(argv, capture_output=True)\n"
        "    print('tool-' + argv[1], 0 if done.returncode == 0 else -1, done.returncode)"
    )
    results = run(attacker, lines)
    for flag in CLONE_NAMESPACES:
        assert results[f"clone-{flag}"] == (-1, errno.EPERM), (flag, results)
    assert results["clone3"] == (-1, errno.ENOSYS), results
    for tool in ("tool---user", "tool--Urm", "tool---net"):
        assert results[tool][0] == -1, (tool, results)


def test_no_keystrokes_can_be_pushed_into_a_terminal(attacker: Attacker) -> None:
    """TIOCSTI/TIOCLINUX, also with junk in the upper 32 bits the kernel ignores."""
    attacker.start()
    attacker.create()
    ioctl = numbers()["ioctl"]
    lines = [
        f"report('TIOCSTI', call({ioctl}, 0, {TIOCSTI}, 'buf'))",
        f"report('TIOCSTI-high-bits', call({ioctl}, 0, {TIOCSTI | (1 << 32)}, 'buf'))",
        f"report('TIOCLINUX', call({ioctl}, 0, {TIOCLINUX}, 'buf'))",
        # An ordinary ioctl still works as before: fd 0 is /dev/null, not a terminal.
        f"report('TCGETS', call({ioctl}, 0, 0x5401, 'buf'))",
    ]
    results = run(attacker, lines)
    assert results["TIOCSTI"] == (-1, errno.EPERM), results
    assert results["TIOCSTI-high-bits"] == (-1, errno.EPERM), results
    assert results["TIOCLINUX"] == (-1, errno.EPERM), results
    assert results["TCGETS"] == (-1, errno.ENOTTY), results


def test_the_filter_is_on_for_pid_1_and_what_code_starts(attacker: Attacker) -> None:
    attacker.start()
    attacker.create()
    events = attacker.execute(
        """
        import subprocess
        def seccomp(path):
            return [l.split()[1] for l in open(path) if l.startswith("Seccomp:")][0]
        child = subprocess.run(["grep", "^Seccomp:", "/proc/self/status"], capture_output=True, text=True)
        print(seccomp("/proc/1/status"), seccomp("/proc/self/status"), child.stdout.split()[1])
        """
    )
    assert stdout(events) == "2 2 2\n"  # SECCOMP_MODE_FILTER everywhere
