"""Red-team round 3, class 4 of issue 9: disk and memory the watchdog cannot see.

Written as hostile sandbox code, run through the sandbox manager as root and as ``nobody``.
A test marked ``xfail(strict=True)`` is an attack that still gets through: when the hole is
closed it passes and the marker goes.
"""

from __future__ import annotations

import re
import textwrap
import time

import pytest

from tests.security.sandbox_support import Attacker, errors, stdout

MIB = 1 << 20
GIB = 1 << 30


def children_reports(*, patience: float) -> str:
    """The end of a payload whose forked ``children`` each write 8 bytes (what they hold) to
    ``ready_w``: it adds them up for ``patience`` seconds, waits 2 s more for the watchdog, and
    prints what they held, how many reported and how many still live."""
    return textwrap.dedent(
        f"""
        held, ready, dead = 0, 0, set()
        def reap():
            dead.update(p for p in children if p not in dead and os.waitpid(p, os.WNOHANG) != (0, 0))
        deadline = time.monotonic() + {patience}
        while ready + len(dead) < len(children) and time.monotonic() < deadline:
            if select.select([ready_r], [], [], 0.2)[0]:
                held += int.from_bytes(os.read(ready_r, 8), "little")  # a killed child reports nothing
                ready += 1
            reap()
        time.sleep(2)  # the watchdog has had many looks by now
        reap()
        print(held, ready, len(children) - len(dead))
        """
    )


@pytest.mark.xfail(
    strict=True,
    reason="no /proc file shows a descriptor queued in a socket: a deleted file held only there is "
    "invisible to the watchdog (needs a count of what inotify saw deleted, or a real quota)",
)
def test_deleted_files_whose_only_reference_is_a_message_in_flight_count_too(attacker: Attacker) -> None:
    attacker.start(disk_limit="100m")
    attacker.create("1g")
    # Unlinked while open (each file under the per-file limit), then the descriptor is sent over
    # a socket to nobody who reads it and closed: no process has the file open or mapped, yet
    # its blocks stay taken while the message waits.
    hoard = textwrap.dedent(
        """
        import array, os, socket, time
        keeper, _reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        held = 0
        for n in range(5):
            fd = os.open(f"in-flight-{n}.bin", os.O_CREAT | os.O_RDWR)
            os.unlink(f"in-flight-{n}.bin")
            for _ in range(90):
                os.write(fd, b"d" * 2**20)
            held += os.fstat(fd).st_blocks * 512
            keeper.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
        time.sleep(3)  # the watchdog has had many looks by now
        print(held)
        """
    )
    events = attacker.execute(hoard, timeout=60)
    found = re.fullmatch(r"(\d+)\n", stdout(events))
    stopped = any(e["name"] == "DiskLimitExceeded" for e in errors(events))
    held = int(found[1]) if found else 0
    assert stopped or held <= 100 * MIB, f"{held / MIB:.0f} MiB held on the host's disk by messages in flight"


def test_deleted_files_held_only_by_a_private_mapping_count_too(attacker: Attacker) -> None:
    attacker.start(disk_limit="100m")
    attacker.create("1g")
    # A copy-on-write mapping holds its file as firmly as a shared one (an executable is mapped so).
    hoard = textwrap.dedent(
        """
        import mmap, os, time
        held, maps = 0, []
        for n in range(5):
            with open(f"mapped-{n}.bin", "wb+") as f:
                for _ in range(90):
                    f.write(b"d" * 2**20)
                f.flush()
                held += os.fstat(f.fileno()).st_blocks * 512
                maps.append(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
            os.unlink(f"mapped-{n}.bin")
        time.sleep(3)  # the watchdog has had many looks by now
        print(held)
        """
    )
    events = attacker.execute(hoard, timeout=60)
    found = re.fullmatch(r"(\d+)\n", stdout(events))
    stopped = any(e["name"] == "DiskLimitExceeded" for e in errors(events))
    held = int(found[1]) if found else 0
    assert stopped or held <= 100 * MIB, f"{held / MIB:.0f} MiB held on the host's disk by private mappings"


def test_extended_attributes_on_tmpfs_cannot_hold_memory(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    # A tmpfs file's extended attributes are kernel memory (kvmalloc'd values) that its size,
    # its blocks and the mount's used blocks never show: 3 GiB of them took 6 GiB of host slab.
    hoard = textwrap.dedent(
        """
        import os
        value, stored = b"x" * 65000, 0
        try:
            for n in range(2 * 2**30 // 65000):
                path = f"/tmp/attrs-{n // 1000}"
                if n % 1000 == 0:
                    open(path, "w").close()
                os.setxattr(path, f"user.k{n}", value)
                stored += len(value)
        except OSError as err:
            print("refused", err.errno)
        print(stored)
        """
    )
    shown = stdout(attacker.execute(hoard, timeout=60)).split()
    if not shown:
        return  # stopped before it could report: contained
    stored = int(shown[-1])
    assert stored <= 64 * MIB, f"{stored / MIB:.0f} MiB of extended attributes held in the sandbox's /tmp"


def test_empty_files_in_tmpfs_count_against_the_memory_budget(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    before = attacker.call("peak")["peak"]
    # Empty files use no block of the tmpfs, so its size never stops them, yet each one is kernel
    # memory (inode, dentry, name): 1.55 million of them took 1.9 GiB of host slab, far past a
    # 1g container's budget. Here a few seconds' worth, to see whether the budget counts them.
    flood = textwrap.dedent(
        """
        import os, time
        made, deadline = 0, time.monotonic() + 4
        while made < 150_000 and time.monotonic() < deadline:
            os.mkdir(f"/tmp/{made}")
            for n in range(1000):
                os.close(os.open(f"/tmp/{made}/{n:0200}", os.O_CREAT | os.O_WRONLY))
            made += 1000
        time.sleep(1)  # many looks by the watchdog
        print(made)
        """
    )
    made = int(stdout(attacker.execute(flood, timeout=60)))
    assert made >= 20_000, f"only {made} files made: the test proves nothing"
    counted = attacker.call("peak")["peak"] - before
    assert counted >= made * 1024, (
        f"{made} empty files in /tmp (about {made * 1300 / MIB:.0f} MiB of host memory) "
        f"raised the container's measured memory by {counted / MIB:.0f} MiB only"
    )


def test_page_tables_of_many_sparse_mappings_count_against_the_memory_budget(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    # One page mapped every 2 MiB and read (the shared zero page): no RSS, no address space to
    # speak of, but a page-table page per mapping: 65,000 mappings hold 254 MiB of host memory.
    hoard = textwrap.dedent(
        """
        import ctypes, os, select, time
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        int_ = ctypes.c_int
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, int_, int_, int_, ctypes.c_long]
        ready_r, ready_w = os.pipe()
        children = []
        for c in range(7):
            pid = os.fork()
            if pid == 0:
                base = (1 << 44) + c * (1 << 40)
                for k in range(65_000):
                    page = libc.mmap(base + k * 2**21, 4096, 1, 0x22, -1, 0)  # PROT_READ, private, anonymous
                    if page in (None, 2**64 - 1):
                        break
                    ctypes.c_char.from_address(page).value
                status = open("/proc/self/status").read()
                pte = int(status.split("VmPTE:")[1].split()[0]) * 1024
                os.write(ready_w, pte.to_bytes(8, "little"))
                time.sleep(600)
                os._exit(0)
            children.append(pid)
        """
    ) + children_reports(patience=40)
    found = re.fullmatch(r"(\d+) (\d+) (\d+)\n", stdout(attacker.execute(hoard, timeout=60)))
    if found is None:
        return  # stopped before it could report: contained
    held, ready, alive = int(found[1]), int(found[2]), int(found[3])
    if ready < 7:
        return  # some were stopped while they built their page tables: contained
    assert held > 1.5 * GIB, f"the payload built only {held / MIB:.0f} MiB of page tables: it proves nothing"
    assert alive < 7, f"{held / GIB:.2f} GiB of page tables held by {alive} live processes of a 1g container"


def test_epoll_watches_count_against_the_memory_budget(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    # Each epoll watch is ~200 bytes of kernel memory in no process's RSS; a user may hold millions
    # (fs.epoll.max_user_watches): 500 instances x 460 eventfds in each of 20 processes, on top
    # of 800 MiB of ordinary memory.
    hoard = textwrap.dedent(
        """
        import os, select, time
        ballast = bytearray(800 * 2**20)  # within the tier: the watches come on top
        ready_r, ready_w = os.pipe()
        children = []
        for c in range(20):
            pid = os.fork()
            if pid == 0:
                targets = [os.eventfd(0) for _ in range(460)]
                polls, watches = [], 0
                try:
                    for _ in range(500):
                        polls.append(select.epoll())
                        for target in targets:
                            polls[-1].register(target, select.EPOLLIN)
                            watches += 1
                except OSError:
                    pass  # the user's max_user_watches
                os.write(ready_w, watches.to_bytes(8, "little"))
                time.sleep(600)
                os._exit(0)
            children.append(pid)
        """
    ) + children_reports(patience=15)
    started = time.monotonic()
    events = attacker.execute(hoard, timeout=60)
    # Stopped (SIGSTOP) while a victim is killed, the kernel cannot reap it: the zombie must not
    # keep the tree stopped until the timeout.
    took = time.monotonic() - started
    assert not any(e["name"] == "TimeoutError" for e in errors(events)) and took < 40, (took, errors(events))
    found = re.fullmatch(r"(\d+) (\d+) (\d+)\n", stdout(events))
    if found is None:
        return  # stopped before it could report: contained
    held, ready, alive = int(found[1]), int(found[2]), int(found[3])
    if ready < 20:
        return  # some were stopped while they added watches: contained
    assert held > 4_000_000, f"only {held} epoll watches made: the test proves nothing"
    assert alive < 20, (
        f"{held:,} epoll watches (~{held * 200 / GIB:.2f} GiB) and 800 MiB held by {alive} live processes "
        "of a 1g container"
    )
