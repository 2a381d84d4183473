"""Red-team payload for class 5 of issue 9 (kernel attack surface), not in the original review.

The network namespace cuts the sandbox off from the host's IP and UNIX-socket services, but
AF_VSOCK is not tied to network namespaces: on a virtual machine with a vsock device (Firecracker,
Kata, cloud VMs, which is where hosted notebooks run) a vsock socket made in the sandbox can reach
the hypervisor side and the VM's own vsock listeners. The filter now allows only UNIX, IPv4, IPv6 and
netlink sockets. The tests only create sockets; they connect nowhere.
"""

from __future__ import annotations

import socket

import pytest

from tests.security.sandbox_support import Attacker, stdout

AF_VSOCK = 40


def test_the_sandbox_cannot_open_a_socket_that_bypasses_its_network_namespace(attacker: Attacker) -> None:
    try:
        socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as err:
        pytest.skip(f"this host's kernel has no vsock ({err.strerror}): nothing to bypass with")
    attacker.start()
    attacker.create("1g")
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.socket({AF_VSOCK}, socket.SOCK_STREAM).close()\n"
        "    print('vsock socket created')\n"
        "except OSError as err:\n"
        "    print('refused:', err.strerror)\n"
    )
    shown = stdout(attacker.execute(probe))
    assert shown.startswith("refused:"), f"the sandbox made an AF_VSOCK socket: {shown!r}"


SOCKET_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_socket, SYS_socketpair = {socket}, {socketpair}
pair = (ctypes.c_int * 2)()
for family in {families}:
    for number, args in ((SYS_socket, (1, 0)), (SYS_socketpair, (1, 0, ctypes.addressof(pair)))):
        ctypes.set_errno(0)
        # Straight through syscall(): a family with high bits set is the same family to the kernel.
        fd = libc.syscall(ctypes.c_long(number), ctypes.c_long(family), *map(ctypes.c_long, args))
        print(hex(family), number, fd, ctypes.get_errno())
"""


def test_no_exotic_socket_family_is_open_whatever_the_register_holds(attacker: Attacker) -> None:
    import pyseccomp

    attacker.start()
    attacker.create("1g")
    # AF_VSOCK, AF_PACKET, AF_BLUETOOTH, AF_ALG, AF_CAN, AF_RDS, AF_TIPC, AF_XDP, AF_KEY, and
    # AF_VSOCK / AF_INET with bits above the int the kernel reads.
    families = [40, 17, 31, 38, 29, 21, 30, 44, 15, 5, 0x1_0000_0028, 0xFFFF_FFFF_0000_0028]
    native = pyseccomp.Arch.NATIVE
    table = {name: pyseccomp.resolve_syscall(native, name) for name in ("socket", "socketpair")}
    shown = stdout(attacker.execute(SOCKET_PROBE.format(families=families, **table)))
    rows = [line.split() for line in shown.splitlines()]
    assert len(rows) == 2 * len(families), shown
    opened = [row for row in rows if int(row[2]) >= 0 or int(row[3]) not in (97, 1)]
    assert opened == [], f"exotic sockets not refused with EAFNOSUPPORT (family, call, fd, errno): {opened}"


def test_ordinary_sockets_still_work_in_the_sandbox(attacker: Attacker) -> None:
    attacker.start()
    attacker.create("1g")
    probe = (
        "import socket\n"
        "for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):\n"
        "    socket.socket(family, socket.SOCK_STREAM).close()\n"
        "a, b = socket.socketpair(); a.close(); b.close()\n"
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()\n"
        "print('ok')\n"
    )
    assert stdout(attacker.execute(probe)) == "ok\n"


def test_memory_the_budget_cannot_see_is_refused_at_its_source(attacker: Attacker) -> None:
    """memfd_create (a memfd passed over a socket belongs to no process) and pipes grown past 64 KiB."""
    attacker.start()
    attacker.create("1g")
    probe = (
        "import fcntl, os\n"
        "try:\n"
        "    os.memfd_create('hidden')\n"
        "    print('memfd_create allowed')\n"
        "except OSError as err:\n"
        "    print('memfd_create refused', err.errno)\n"
        "r, w = os.pipe()\n"
        "try:\n"
        "    fcntl.fcntl(w, 1031, 1 << 20)\n"  # F_SETPIPE_SZ
        "    print('F_SETPIPE_SZ allowed', fcntl.fcntl(w, 1032))\n"
        "except OSError as err:\n"
        "    print('F_SETPIPE_SZ refused', err.errno)\n"
    )
    shown = stdout(attacker.execute(probe)).splitlines()
    assert shown[0].startswith("memfd_create refused"), shown
    assert shown[1].startswith("F_SETPIPE_SZ refused"), shown
