"""A long-lived Python process per container, like the kernel OpenAI keeps behind code_interpreter.

The parent (``Worker``) sends code; the child runs it in one persistent namespace, so variables
survive between calls and turns. Protocol over the child's stdin/stdout pipes: a 4-byte
big-endian length, then a UTF-8 JSON object, in both directions. The child moves the pipes to
private descriptors and points fds 0/1/2 elsewhere, so nothing user code prints (even from
subprocesses or C code) can corrupt the protocol: during a call fds 1 and 2 go to one capture
file, which keeps stdout and stderr interleaved as a terminal would show them.

Like a Jupyter cell, the value of a trailing expression is printed (its repr), and figures are
flushed at the end of each call as with the inline backend: ``plt.show()`` and any figure still
open become PNG bytes. ``/mnt/data`` in the code is rewritten to the container's real folder
(the server cannot mount it), and the folder is rewritten back to ``/mnt/data`` in the logs.

Run as a script this module is the child; it imports only the standard library.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["DATA_DIR", "ExecResult", "Worker"]

DATA_DIR = "/mnt/data"
_DATA_DIR_RE = re.compile(re.escape(DATA_DIR) + r"(?![\w.-])")
_BACKEND_MODULE = "_ci_inline_backend"
_HEADER = struct.Struct(">I")

# Written next to the worker's scratch files and selected with MPLBACKEND=module://...: the
# documented way to plug a backend into matplotlib, loaded only if the code imports pyplot.
_BACKEND_SOURCE = """\
import io

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase
SHOWN = []


def show(*args, **kwargs):
    for manager in Gcf.get_all_fig_managers():
        buffer = io.BytesIO()
        manager.canvas.figure.savefig(buffer, format="png", bbox_inches="tight")
        SHOWN.append(buffer.getvalue())
    Gcf.destroy_all()
"""


@dataclass(frozen=True)
class ExecResult:
    """What one call produced: its log text, the PNGs of shown figures, and how it ended."""

    logs: str
    images: list[bytes] = field(default_factory=list)
    error: bool = False
    timed_out: bool = False


class Worker:
    """Parent side: starts the child lazily, sends code, restarts it after a crash or a kill."""

    def __init__(
        self, data_dir: Path, scratch_dir: Path, *, timeout: float = 60.0, mpl_config_dir: Path | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.scratch_dir = scratch_dir.resolve()
        self.timeout = timeout
        self.mpl_config_dir = mpl_config_dir or Path(tempfile.gettempdir()) / "ci-magic-test-server-mpl"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.alive and self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def run(self, code: str) -> ExecResult:
        if not self.alive:
            self._start()
        assert self._process is not None and self._process.stdin is not None
        payload = json.dumps({"code": _DATA_DIR_RE.sub(str(self.data_dir), code)}).encode()
        try:
            self._process.stdin.write(_HEADER.pack(len(payload)) + payload)
            self._process.stdin.flush()
            reply = self._read_reply(time.monotonic() + self.timeout)
            if reply is None:
                # Interrupt first, as a kernel would: the namespace survives a KeyboardInterrupt.
                os.kill(self._process.pid, signal.SIGINT)
                reply = self._read_reply(time.monotonic() + 2.0)
                if reply is None:
                    self.close()
                    return ExecResult(
                        self._unalias(
                            f"Execution timed out after {self.timeout:g} s; "
                            "the Python process was restarted and its state is lost.\n"
                        ),
                        error=True,
                        timed_out=True,
                    )
                result = self._result(reply, timed_out=True)
                note = f"Execution timed out after {self.timeout:g} s and was interrupted.\n"
                return ExecResult(result.logs + note, result.images, error=True, timed_out=True)
            return self._result(reply)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.close()
            return ExecResult("The Python process died; its state is lost.\n", error=True)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        if process.poll() is None:
            process.kill()
        process.wait()

    def _start(self) -> None:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.mpl_config_dir.mkdir(parents=True, exist_ok=True)
        (self.scratch_dir / f"{_BACKEND_MODULE}.py").write_text(_BACKEND_SOURCE)
        env = {
            "MPLBACKEND": f"module://{_BACKEND_MODULE}",
            "MPLCONFIGDIR": str(self.mpl_config_dir),
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(self.scratch_dir),
        }
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), str(self.scratch_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
            env=env,
            start_new_session=True,
        )

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        assert self._process is not None and self._process.stdout is not None
        header = _read_exact(self._process.stdout, _HEADER.size, deadline)
        if header is None:
            return None
        body = _read_exact(self._process.stdout, _HEADER.unpack(header)[0], deadline + 5.0)
        if body is None:
            raise EOFError("worker stopped mid-reply")
        return json.loads(body)

    def _result(self, reply: dict[str, Any], timed_out: bool = False) -> ExecResult:
        return ExecResult(
            logs=self._unalias(reply["output"]),
            images=[base64.b64decode(image) for image in reply["images"]],
            error=bool(reply["error"]),
            timed_out=timed_out,
        )

    def _unalias(self, text: str) -> str:
        return text.replace(str(self.data_dir), DATA_DIR)


def _read_exact(stream: BinaryIO, size: int, deadline: float) -> bytes | None:
    """``size`` bytes from a pipe, ``None`` if the deadline passes first; EOFError if it closes."""
    chunks: list[bytes] = []
    remaining = size
    fd = stream.fileno()
    while remaining:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
            if chunks:
                raise EOFError("worker stalled mid-message")
            return None
        chunk = os.read(fd, remaining)
        if not chunk:
            raise EOFError("worker exited")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------------
# Child side


def _child_main(scratch_dir: str) -> None:
    import ast
    import builtins
    import io
    import linecache
    import traceback

    sys.path.insert(0, scratch_dir)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
    # Unbuffered text streams keep print() and tracebacks in the order they happened.
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    capture_path = os.path.join(scratch_dir, f"capture-{os.getpid()}.txt")
    count = 0

    def read_message() -> dict[str, Any] | None:
        header = b""
        while len(header) < _HEADER.size:
            chunk = proto_in.read(_HEADER.size - len(header))
            if not chunk:
                return None
            header += chunk
        size = _HEADER.unpack(header)[0]
        body = b""
        while len(body) < size:
            chunk = proto_in.read(size - len(body))
            if not chunk:
                return None
            body += chunk
        return json.loads(body)

    def run_cell(code: str, filename: str) -> bool:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename=filename, mode="exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
                if value is not None:
                    namespace["_"] = value
                    print(repr(value))
            return False
        except BaseException as exc:  # the user's failure is data, reported in the logs
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != filename:
                tb = tb.tb_next
            if isinstance(exc, SyntaxError):
                tb = None
            sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))
            return True

    def flush_figures() -> list[str]:
        backend = sys.modules.get(_BACKEND_MODULE)
        if backend is None:
            return []
        try:
            backend.show()
        except Exception:
            traceback.print_exc()
        images = [base64.b64encode(png).decode() for png in backend.SHOWN]
        backend.SHOWN.clear()
        return images

    while True:
        # The parent interrupts only running code; a late SIGINT must not kill the idle process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        request = read_message()
        if request is None:
            return
        count += 1
        with open(capture_path, "w+b") as capture:
            os.dup2(capture.fileno(), 1)
            os.dup2(capture.fileno(), 2)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                error = run_cell(request["code"], f"<cell-{count}>")
                images = flush_figures()
            except KeyboardInterrupt:  # an interrupt that landed outside the user's code
                error, images = True, []
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            capture.seek(0)
            output = capture.read().decode("utf-8", errors="replace")
        reply = json.dumps({"output": output, "images": images, "error": error}).encode()
        proto_out.write(_HEADER.pack(len(reply)) + reply)


if __name__ == "__main__":
    _child_main(sys.argv[1])
