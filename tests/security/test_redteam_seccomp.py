"""Red-team payload for class 5 of issue 9 (kernel attack surface), not in the original review.

The network namespace cuts the sandbox off from the host's IP and UNIX-socket services, but
AF_VSOCK is not tied to network namespaces: on a virtual machine with a vsock device (Firecracker,
Kata, cloud VMs, which is where hosted notebooks run) a vsock socket made in the sandbox can reach
the hypervisor side and the VM's own vsock listeners. The filter allows every address family.
The test only creates a socket; it connects nowhere. ``xfail(strict=True)`` until refused.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.security.sandbox_support import USERS, Attacker, attacker_as, stdout

AF_VSOCK = 40


@pytest.fixture(params=USERS)
def attacker(request: pytest.FixtureRequest) -> Iterator[Attacker]:
    with attacker_as(request.param) as found:
        yield found


@pytest.mark.xfail(
    strict=True,
    reason="seccomp.py filters no socket() address family: AF_VSOCK, which network namespaces "
    "do not isolate, is open to the sandbox",
)
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
