"""Push and pull of a 1,000,000 x 10 mixed-dtype DataFrame against in-run baselines.

Two transports, each measured on its own: a real HTTP upload on loopback (this script starts a
small stdlib HTTP server that speaks OpenAI's container-file REST shapes: multipart upload written
to disk, list, content, delete; every transfer goes through ci-magic's own ``OpenAIBackend`` on
the ``openai`` SDK, exactly as a notebook talks to OpenAI), and the local sandbox
(``LocalBackend``, whose upload is a file copy into the sandbox's /mnt/data).

Prints, from one run (each figure the median of ``--repeat`` measurements):
1. push: ``push()`` (fingerprint + Parquet + upload) vs ``df.to_csv()`` + upload (target >= 5x;
   ``to_csv`` is timed once and added to each transport's CSV upload time);
2. re-push of the unchanged frame as a share of the first push (target <= 5%), and for
   reference the same for an equal copy (another object: proven by hashing, not the snapshot);
3. pull: ``pull()`` of the Parquet file (download + save + decode) vs download + save +
   ``pd.read_csv`` of the CSV baseline (target >= 5x);
and with ``--codecs``, the Parquet compression/write/read measurements behind the defaults.

Run: .venv/bin/python bench/bench_variables.py [--rows 1000000] [--repeat 3] [--codecs]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from openai import AsyncOpenAI

from ci_magic.backends.base import DEFAULT_DOWNLOAD_SIZE_CAP
from ci_magic.backends.openai_backend import OpenAIBackend
from ci_magic.filenames import download_into
from ci_magic.variables.registry import PushRegistry, PushRequest
from ci_magic.variables.transfer import ContainerFiles

CONTAINER = "cntr_bench"


class ContainerFilesServer:
    """OpenAI's container-file endpoints on loopback, storing uploads on disk."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ci-bench-files-"))
        self.files: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ContainerFilesServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytearray:
                length = int(self.headers.get("Content-Length", "0"))
                body = bytearray(length)
                view, got = memoryview(body), 0
                while got < length:
                    n = self.rfile.readinto(view[got:])
                    if not n:
                        break
                    got += n
                return body

            def do_POST(self) -> None:
                match = re.fullmatch(r"/v1/containers/([^/]+)/files", self.path)
                if not match:
                    return self._json({"error": {"message": "not found"}}, 404)
                body = self._body()
                boundary = self.headers["Content-Type"].split("boundary=", 1)[1].strip('"').encode()
                head_end = body.index(b"\r\n\r\n") + 4
                name = re.search(rb'filename="([^"]*)"', body[:head_end]).group(1).decode()
                end = body.rindex(b"\r\n--" + boundary)
                with server._lock:
                    fid = f"cfile_{next(server._ids):04d}"
                path = server.root / fid
                with open(path, "wb") as out:
                    out.write(memoryview(body)[head_end:end])
                meta = {
                    "id": fid,
                    "object": "container.file",
                    "created_at": int(time.time()),
                    "bytes": end - head_end,
                    "container_id": match.group(1),
                    "path": f"/mnt/data/{name}",
                    "source": "user",
                }
                server.files[fid] = meta
                self._json(meta)

            def do_GET(self) -> None:
                if re.fullmatch(r"/v1/containers/[^/]+/files(\?.*)?", self.path):
                    data = list(server.files.values())
                    return self._json(
                        {
                            "object": "list",
                            "data": data,
                            "has_more": False,
                            "first_id": data[0]["id"] if data else None,
                            "last_id": data[-1]["id"] if data else None,
                        }
                    )
                match = re.fullmatch(r"/v1/containers/[^/]+/files/([^/]+)/content", self.path)
                if not match or match.group(1) not in server.files:
                    return self._json({"error": {"message": "not found"}}, 404)
                data = (server.root / match.group(1)).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_DELETE(self) -> None:
                fid = self.path.rstrip("/").rsplit("/", 1)[-1]
                server.files.pop(fid, None)
                (server.root / fid).unlink(missing_ok=True)
                self._json({"id": fid, "object": "container.file.deleted", "deleted": True})

        return Handler


def mixed_frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(42)
    return pd.DataFrame(
        {
            "price": rng.normal(100, 15, rows),
            "ratio": rng.random(rows),
            "score": rng.normal(size=rows),
            "weight": rng.random(rows) * 80,
            "qty": rng.integers(0, 1000, rows),
            "customer_id": rng.integers(10**8, 10**9, rows),
            "returned": rng.random(rows) < 0.1,
            "ts": pd.date_range("2024-01-01", periods=rows, freq="s"),
            "region": pd.Categorical(rng.choice(["north", "south", "east", "west"], rows)),
            "sku": pd.Series(rng.integers(0, 50_000, rows)).map("sku-{:05d}".format),
        }
    )


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def codec_table(df: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df)
    strings = [f.name for f in table.schema if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type)]
    print("\nParquet codecs on this frame (write / read+to_pandas / size):")
    for compression in ("none", "snappy", "lz4", "zstd"):
        for label, dictionary in (("dictionary everywhere", True), ("dictionary on strings", strings)):
            sink = pa.BufferOutputStream()
            start = time.perf_counter()
            pq.write_table(
                table, sink, compression=compression, use_dictionary=dictionary, write_statistics=False
            )
            write = time.perf_counter() - start
            data = sink.getvalue()
            start = time.perf_counter()
            pq.read_table(pa.BufferReader(data)).to_pandas()
            read = time.perf_counter() - start
            print(
                f"  {compression:7s} {label:22s} {write * 1000:6.0f} ms / {read * 1000:5.0f} ms / "
                f"{data.size / 1e6:5.1f} MB"
            )


async def measure(backend: Any, container: str, df: pd.DataFrame, csv: bytes, repeat: int, out: Path) -> dict:
    """The three figures on one transport (the CSV text is made once, by the caller)."""
    warm = PushRegistry()  # imports, thread pools, connections
    await ContainerFiles(backend, container, warm).push([PushRequest("warm", df.head(1000))])
    await ContainerFiles(backend, container, warm).pull("warm.parquet", out)

    t_upload_csv, csv_file = await timed(lambda: backend.upload_file(container, "baseline.csv", csv), repeat)
    registries: list[PushRegistry] = []

    async def first_push() -> Any:
        registries.append(PushRegistry())
        return await ContainerFiles(backend, container, registries[-1]).push([PushRequest("df", df)])

    t_push, outcome = await timed(first_push, repeat)
    registry = registries[-1]
    t_repush, again = await timed(
        lambda: ContainerFiles(backend, container, registry).push([PushRequest("df", df)]), repeat
    )
    assert again[0].status == "unchanged", again
    # Equal content in another object each time: proven by hashing, not by the snapshot.
    copies = [df.copy() for _ in range(repeat)]
    t_rehash, again = await timed(
        lambda: ContainerFiles(backend, container, registry).push([PushRequest("df", copies.pop())]), repeat
    )
    assert again[0].status == "unchanged", again

    async def baseline_pull() -> pd.DataFrame:
        saved, _ = await download_into(
            backend, container, csv_file.id, out, "baseline.csv", max_bytes=DEFAULT_DOWNLOAD_SIZE_CAP
        )
        return await asyncio.to_thread(pd.read_csv, saved)

    t_read_csv, _ = await timed(baseline_pull, repeat)
    t_pull, pulled = await timed(
        lambda: ContainerFiles(backend, container, registry).pull("df.parquet", out), repeat
    )
    pd.testing.assert_frame_equal(pulled.value, df)
    return {
        "upload_csv": t_upload_csv,
        "push": t_push,
        "repush": t_repush,
        "rehash": t_rehash,
        "read_csv": t_read_csv,
        "pull": t_pull,
        "parquet_bytes": outcome[0].size,
    }


def report(label: str, t_to_csv: float, m: dict) -> None:
    baseline = t_to_csv + m["upload_csv"]
    print(f"{label}:")
    print(
        f"  1. push:    to_csv + upload {baseline:7.3f} s | push() {m['push']:7.3f} s | "
        f"ratio {baseline / m['push']:5.1f}x  (target >= 5x)"
    )
    print(
        f"  2. re-push: unchanged {m['repush'] * 1000:7.1f} ms | first push {m['push'] * 1000:7.1f} ms | "
        f"share {100 * m['repush'] / m['push']:5.1f}%  (target <= 5%)"
    )
    print(
        f"     (an equal copy, proven by hashing: {m['rehash'] * 1000:.1f} ms, "
        f"{100 * m['rehash'] / m['push']:.1f}%)"
    )
    print(
        f"  3. pull:    download + save + read_csv {m['read_csv']:7.3f} s | pull() {m['pull']:7.3f} s | "
        f"ratio {m['read_csv'] / m['pull']:5.1f}x  (target >= 5x)"
    )


async def main(rows: int, repeat: int, codecs: bool) -> None:
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.sandbox import SandboxManager

    df = mixed_frame(rows)
    t_to_csv, csv = await timed(lambda: asyncio.to_thread(lambda: df.to_csv().encode()), repeat)
    scratch = Path(tempfile.mkdtemp(prefix="ci-bench-"))
    results = {}
    try:
        with ContainerFilesServer() as server:
            http = OpenAIBackend(AsyncOpenAI(base_url=server.url, api_key="bench", max_retries=0))
            results["loopback HTTP (stdlib server, OpenAIBackend + openai SDK)"] = await measure(
                http, CONTAINER, df, csv, repeat, scratch / "http"
            )
            await http.aclose()
        local = LocalBackend(SandboxManager(scratch / "sandboxes", pool_size=0), model_client=None, model="")
        container = await local.create_container(name="bench", memory_limit="1g", expires_after_minutes=20)
        results["local sandbox (LocalBackend: file copy into its /mnt/data)"] = await measure(
            local, container.id, df, csv, repeat, scratch / "local"
        )
        await local.delete_container(container.id)
        await local.aclose()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    size_pq = next(iter(results.values()))["parquet_bytes"]
    print(f"ci-magic variables bench: {rows:,} x {df.shape[1]} mixed dtypes, median of {repeat} per figure")
    print(f"  CSV {len(csv) / 1e6:.1f} MB (to_csv {t_to_csv:.3f} s), Parquet (lz4) {size_pq / 1e6:.1f} MB")
    for label, m in results.items():
        report(label, t_to_csv, m)
    if codecs:
        codec_table(df)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--codecs", action="store_true", help="also print the Parquet codec measurements")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.repeat, args.codecs))
