"""Red-team round 3, class 5 of issue 9: system calls the filter's libseccomp does not know.

libseccomp names only the calls of its release (2.5.4 in Debian 12 stops at 450-456), and a
rule for a name it cannot resolve is skipped, while the running kernel may be years newer. Newer
twins of denied calls then pass a default-allow filter: ``open_tree_attr`` (mount API, 6.15),
``setxattrat`` (6.13). Hostile code calls them by number, straight through libc's ``syscall()``.
"""

from __future__ import annotations

import os

import pytest

from tests.security.sandbox_support import Attacker, stdout

PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(64)
for name, number in {calls}:
    ctypes.set_errno(0)
    # Arguments every kernel refuses (bad descriptor, NULL path) unless the call does not exist.
    result = libc.syscall(ctypes.c_long(number), ctypes.c_long(-1), ctypes.addressof(buf), 0, 0, 0, 0)
    print(name, result, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
"""
# x86-64 numbers (the generic table's on arm64 differ below 400 only, not for these).
NEWER_CALLS = [("setxattrat", 463), ("open_tree_attr", 467), ("file_setattr", 469), ("unassigned", 1000)]


def test_system_calls_newer_than_the_filter_knows_do_not_exist_in_the_sandbox(attacker: Attacker) -> None:
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip(f"system call numbers of {os.uname().machine} not listed here")
    attacker.start()
    attacker.create("1g")
    shown = stdout(attacker.execute(PROBE.format(calls=NEWER_CALLS))).splitlines()
    rows = [line.split() for line in shown]
    assert [row[0] for row in rows] == [name for name, _ in NEWER_CALLS], shown
    passed = [row for row in rows if row[2] != "ENOSYS"]
    assert passed == [], f"newer system calls reached the kernel (name, result, errno): {passed}"


def test_ordinary_file_work_still_runs_under_the_filter(attacker: Attacker) -> None:
    attacker.start()
    attacker.create("1g")
    work = (
        "import os, shutil\n"
        "open('a.txt', 'w').write('hello')\n"
        "shutil.copy2('a.txt', '/tmp/b.txt')\n"  # copystat tries xattrs and takes EOPNOTSUPP
        "os.chmod('/tmp/b.txt', 0o600)\n"
        "print(open('/tmp/b.txt').read(), oct(os.stat('/tmp/b.txt').st_mode & 0o777))\n"
    )
    assert stdout(attacker.execute(work)) == "hello 0o600\n"


def test_the_sandbox_cannot_take_the_machines_aio_contexts(attacker: Attacker) -> None:
    attacker.start()
    attacker.create("1g")
    # fs.aio-max-nr (65,536) is one pool for the whole machine: taken from the sandbox, every
    # host program's io_setup (databases, QEMU) fails with EAGAIN while the sandbox lives.
    hoard = (
        "import ctypes, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "taken, contexts = 0, []\n"
        "for _ in range(16):\n"
        "    context = ctypes.c_ulong(0)\n"
        f"    if libc.syscall({_native('io_setup')}, ctypes.c_long(4096), ctypes.byref(context)):\n"
        "        print('refused', errno.errorcode.get(ctypes.get_errno()))\n"
        "        break\n"
        "    contexts.append(context)\n"
        "    taken += 4096\n"
        "print(taken)\n"
    )
    shown = stdout(attacker.execute(hoard)).split()
    assert shown[-1] == "0", f"the sandbox took {shown[-1]} of the machine's AIO events ({shown})"


def _native(name: str) -> int:
    import pyseccomp

    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
