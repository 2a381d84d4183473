"""Red-team payloads for class 4 of issue 9 (limits that hold for the whole tree), not in the
original review: memory the watchdog cannot see, and host files the sandbox can write to.

Written as hostile sandbox code, run through the sandbox manager as root and as ``nobody``.
Each is ``xfail(strict=True)`` until the hole is closed: then it passes and the marker goes.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

from tests.security.sandbox_support import (
    Attacker,
    allocated_bytes,
    errors,
    final_status,
    processes_in,
    sandbox_namespace,
    stdout,
)

GIB = 1 << 30
MIB = 1 << 20
BUDGET_1G = GIB + (256 << 20)  # the tier plus the idle kernel's allowance (Limits.budget_bytes)


def test_full_pipes_in_many_processes_stay_within_a_1g_containers_budget(attacker: Attacker) -> None:
    attacker.start(execution_timeout=120)
    attacker.create("1g")
    namespace = sandbox_namespace(attacker.pid or 0)
    assert namespace is not None
    # Past the per-user soft limit (fs.pipe-user-pages-soft) each new pipe still holds two pages,
    # and fs.pipe-user-pages-hard is 0 (no limit) by default. A full pipe whose write end is
    # closed keeps its data, so one descriptor holds one pipe: 200 processes x 1000 x 8 KiB.
    hoard = textwrap.dedent(
        """
        import fcntl, os, struct, termios, time
        report_r, report_w = os.pipe()
        children = []
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                held, keep = 0, []
                try:
                    for _ in range(2000):
                        r, w = os.pipe2(os.O_NONBLOCK)
                        try:
                            while True:
                                os.write(w, b"p" * 4096)
                        except BlockingIOError:
                            pass
                        os.close(w)
                        keep.append(r)
                        held += struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"0000"))[0]
                except OSError:
                    pass
                os.write(report_w, struct.pack("q", held))
                time.sleep(600)
                os._exit(0)
            children.append(pid)
        held = sum(struct.unpack("q", os.read(report_r, 8))[0] for _ in children)
        time.sleep(5)  # the watchdog has had many looks by now
        alive = sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in children)
        print(held, alive)
        """
    )
    events = attacker.execute(hoard, timeout=120)
    found = re.fullmatch(r"(\d+) (\d+)\n", stdout(events))
    if found is None:
        return  # stopped before it could report: contained
    held, alive = int(found[1]), int(found[2])
    assert held > GIB, f"the payload did not fill its pipes ({held} bytes): the test proves nothing"
    # Contained means: the hoarders were stopped, or the tree never held more than its budget.
    assert alive < 200 or held <= BUDGET_1G, (
        f"{held / GIB:.2f} GiB held in pipe buffers by {alive} live processes "
        f"({len(processes_in(namespace))} in the sandbox), over the 1g container's budget"
    )


def test_the_host_log_the_kernel_inherits_is_not_a_second_disk(attacker: Attacker) -> None:
    attacker.start(disk_limit="100m")
    attacker.create("1g")
    assert attacker.data is not None
    # The host's own log file is open in the kernel (ipykernel keeps a copy of its original
    # stdout): find it by name and allocate 95 MiB in it, then 95 MiB more in /mnt/data.
    fill = textwrap.dedent(
        """
        import os
        def target(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""
        logs = [int(fd) for fd in os.listdir("/proc/self/fd") if target(fd).endswith("kernel.log")]
        for fd in logs[:1]:
            os.posix_fallocate(fd, 0, 95 * 2**20)
            print(target(fd))
        with open("in-data.bin", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 95 * 2**20)
        """
    )
    events = attacker.execute(fill, timeout=60)
    host_log = stdout(events).strip()
    if not host_log:
        return  # no host file reachable from the sandbox: contained
    assert os.path.isabs(host_log) and not Path(host_log).is_relative_to(attacker.data)
    outside = os.stat(host_log).st_blocks * 512 if os.path.exists(host_log) else 0
    held = allocated_bytes(attacker.data) + outside
    stopped = any(e["name"] == "DiskLimitExceeded" for e in errors(events))
    assert outside < MIB or (stopped and final_status(events) == "failed"), (
        f"{outside / MIB:.0f} MiB written into the host's {host_log} from the sandbox "
        f"({held / MIB:.0f} MiB on the host for a container with disk_limit=100m)"
    )


def test_memfds_held_only_in_a_sockets_queue_stay_within_a_1g_containers_budget(attacker: Attacker) -> None:
    attacker.start(execution_timeout=60)
    attacker.create("1g")
    hide = textwrap.dedent(
        """
        import array, os, socket, time
        keeper, _other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        held = 0
        for n in range(3):
            fd = os.memfd_create(f"hidden-{n}")
            for _ in range(500):
                os.write(fd, b"m" * 2**20)
            held += os.fstat(fd).st_blocks * 512
            # Sent to ourselves and closed: the message in flight is the only reference left.
            keeper.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
        time.sleep(5)  # the watchdog has had many looks by now
        print(held)
        """
    )
    events = attacker.execute(hide, timeout=60)
    found = re.fullmatch(r"(\d+)\n", stdout(events))
    if found is None:
        return  # stopped before it could report: contained
    held = int(found[1])
    assert held > GIB, f"the payload did not fill its memfds ({held} bytes): the test proves nothing"
    assert held <= BUDGET_1G, (
        f"{held / GIB:.2f} GiB held in memfds that no process has open, in a 1g container, "
        "and the code ran to its end"
    )


def test_files_written_outside_mnt_data_count_against_the_disk_limit(attacker: Attacker) -> None:
    attacker.start(disk_limit="100m")
    attacker.create("1g")
    spill = textwrap.dedent(
        """
        import os
        # Where /run/ci-magic lives on the host (mountinfo's root field), for the host to check.
        for line in open("/proc/self/mountinfo"):
            fields = line.split()
            if fields[4] == "/run/ci-magic":
                print(fields[3])
        for n in range(3):  # 285 MiB in files each under the 100 MiB per-file limit
            with open(f"/run/ci-magic/spill-{n}.bin", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 95 * 2**20)
        """
    )
    events = attacker.execute(spill, timeout=60)
    lines = stdout(events).split()
    stopped = any(e["name"] == "DiskLimitExceeded" for e in errors(events))
    if not lines or stopped:
        return  # nothing writable outside /mnt/data, or the limit held
    host_folder = Path(lines[0])
    held = allocated_bytes(host_folder) if host_folder.is_dir() else 0
    assert held <= 100 * MIB, (
        f"{held / MIB:.0f} MiB written into the host's {host_folder} from a container with "
        "disk_limit=100m, and the code ran to its end"
    )


def test_no_process_of_the_sandbox_holds_a_host_file_open_for_writing(attacker: Attacker) -> None:
    """Whatever the name: every writable regular file open in the sandbox is one it can see there."""
    attacker.start(disk_limit="100m")
    attacker.create("1g")
    survey = textwrap.dedent(
        """
        import os, stat
        def visible(target, link):  # the name leads to the same file inside the sandbox
            try:
                return os.path.samestat(os.stat(target), os.stat(link))
            except OSError:
                return False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
                    regular = stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode)
                except (OSError, IndexError, ValueError):
                    continue
                link = f"/proc/{pid}/fd/{fd}"
                if regular and flags & os.O_ACCMODE != os.O_RDONLY and not visible(target, link):
                    print(pid, fd, target)
        print("done")
        """
    )
    shown = stdout(attacker.execute(survey)).splitlines()
    assert shown[-1:] == ["done"] and shown[:-1] == [], f"writable host files in the sandbox: {shown[:-1]}"


def test_the_host_keeps_only_the_end_of_what_the_kernel_writes() -> None:
    from ci_magic.backends.local.kernel import OUTPUT_KEPT, OutputTail

    read_end, write_end = os.pipe()
    tail = OutputTail(read_end)
    tail.start()
    for n in range(64):
        os.write(write_end, f"line {n}\n".encode() * 2000)
    os.write(write_end, b"ModuleNotFoundError: No module named 'ipykernel'\n")
    os.close(write_end)
    tail._thread.join(5)
    text = tail.text()
    assert len(text) == OUTPUT_KEPT
    assert text.splitlines()[-1] == "ModuleNotFoundError: No module named 'ipykernel'"
