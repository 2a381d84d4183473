"""Drives a local sandbox for the security tests, as root or as another user (``nobody``).

Run as ``python -c <this source>``: it reads one JSON command per line on stdin and answers each
with one line ``@@driver@@ <json>`` on stdout (other output, e.g. a notebook shell's, passes by).
The attacks go through the same doors a user's do: ``SandboxManager.execute`` (what the model's
tool calls and ``%%ci_exec`` use) and, for ``shell_*``, ``%%ci_exec`` / ``%ci_reset`` in a real
IPython shell with the local backend.
"""

import asyncio
import functools
import json
import os
import sys
import traceback
from pathlib import Path

PREFIX = "@@driver@@ "


def event_dict(event):
    found = {"type": type(event).__name__}
    for name in ("text", "stream", "name", "value", "traceback", "status", "level"):
        if hasattr(event, name):
            found[name] = getattr(event, name)
    return found


class Driver:
    def __init__(self, root):
        self.root = Path(root)
        self.manager = None
        self.cid = None
        self.shell = None

    def kernel(self):
        container = self.manager._containers.get(self.cid) if self.manager and self.cid else None
        return container.kernel if container else None

    def pid(self):
        kernel = self.kernel()
        return kernel.pid if kernel else None

    async def start(self, execution_timeout=30.0, disk_limit=None):
        from ci_magic.backends.local.sandbox import SandboxManager

        self.manager = SandboxManager(
            self.root / "containers", pool_size=0, execution_timeout=execution_timeout, disk_limit=disk_limit
        )
        return {"user": os.geteuid()}

    async def create(self, memory_limit="1g"):
        info = await self.manager.create(name="attack", memory_limit=memory_limit)
        self.cid = info.id
        [e async for e in self.manager.execute(self.cid, "pass", call_id="warm")]  # started
        return {"id": self.cid, "pid": self.pid(), "data": str(self.root / "containers" / self.cid / "data")}

    async def execute(self, code, timeout=None):
        events = [e async for e in self.manager.execute(self.cid, code, call_id="attack", timeout=timeout)]
        return {"events": [event_dict(e) for e in events], "pid": self.pid()}

    async def upload(self, name, text):
        await self.manager.upload(self.cid, name, text.encode())
        return {}

    async def delete(self):
        await self.manager.delete(self.cid)
        return {}

    async def peak(self):
        kernel = self.kernel()
        return {"peak": kernel.peak_memory if kernel else None}

    async def close(self):
        if self.manager is not None:
            await self.manager.aclose()
        return {}

    # A notebook user's shell: %%ci_exec and %ci_reset with the local backend.
    def _shell(self):
        if self.shell is None:
            os.environ["CI_MAGIC_BACKEND"] = "local"
            os.environ.setdefault("CI_MAGIC_OUTPUT_DIR", str(self.root / "outputs"))
            from IPython.core.interactiveshell import InteractiveShell

            self.shell = InteractiveShell.instance()
            self.shell.run_line_magic("load_ext", "ci_magic")
            self.shell.run_line_magic("config", "CodeInterpreter.pool_size = 0")
        return self.shell

    def shell_exec(self, code):
        self._shell().run_cell_magic("ci_exec", "", code)
        return {}

    def shell_reset(self):
        self._shell().run_line_magic("ci_reset", "")
        return {}

    def shell_close(self):
        if self.shell is not None:
            self.shell.run_line_magic("unload_ext", "ci_magic")
        return {}


async def main():
    driver = Driver(sys.argv[1])
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op.startswith("shell_"):
                # The magics run their own event loop: off this one.
                answer = await loop.run_in_executor(None, functools.partial(getattr(driver, op), **command))
            else:
                answer = await getattr(driver, op)(**command)
        except Exception as err:
            answer = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        sys.stdout.write(PREFIX + json.dumps(answer) + "\n")
        sys.stdout.flush()
        if op == "close":
            break


asyncio.run(main())
