"""Files the model made come back as typed objects, saved in the output folder; nothing is unpickled."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ci_magic.errors import ContainerFileError
from ci_magic.variables.registry import PushRegistry, PushRequest
from ci_magic.variables.transfer import ContainerFiles
from tests.fakes import FakeBackend

FRAME = pd.DataFrame({"city": ["Oslo", "Lima"], "temp": [4.5, 19.0]})


def png(color: str = "blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def frame_bytes(kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "csv":
        FRAME.to_csv(buf, index=False)
    elif kind == "tsv":
        FRAME.to_csv(buf, index=False, sep="\t")
    elif kind == "parquet":
        FRAME.to_parquet(buf)
    elif kind == "feather":
        FRAME.to_feather(buf)
    elif kind == "xlsx":
        FRAME.to_excel(buf, index=False)
    return buf.getvalue()


class Unpickled(Exception):
    pass


class Trap:
    """Raises if anything ever unpickles it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Unpickled, ("a pickle was loaded",))


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(hash_prefix=True)


@pytest.fixture
def container(backend: FakeBackend) -> str:
    return asyncio.run(backend.create_container()).id


def model_writes(backend: FakeBackend, container: str, name: str, data: bytes) -> None:
    backend.add_model_file(container, f"/mnt/data/{name}", data)


def fetch(backend: FakeBackend, container: str, name: str, out: Path, registry: PushRegistry | None = None):
    return asyncio.run(ContainerFiles(backend, container, registry or PushRegistry()).pull(name, out))


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "feather", "xlsx"])
def test_tables_come_back_as_dataframes(backend, container, tmp_path, ext) -> None:
    data = frame_bytes(ext)
    model_writes(backend, container, f"weather.{ext}", data)
    pulled = fetch(backend, container, f"weather.{ext}", tmp_path)
    pd.testing.assert_frame_equal(pulled.value, FRAME, check_dtype=ext != "xlsx")
    assert (pulled.kind, pulled.variable, pulled.name) == ("dataframe", "weather", f"weather.{ext}")
    assert pulled.path == tmp_path / f"weather.{ext}"
    assert pulled.path.read_bytes() == data


def test_arrays_json_text_images_and_other_bytes(backend, container, tmp_path) -> None:
    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, np.arange(6).reshape(2, 3))
    np.savez(npz, x=np.ones(2), y=np.zeros(3))
    files = {
        "grid.npy": npy.getvalue(),
        "parts.npz": npz.getvalue(),
        "summary.json": json.dumps({"best": "Lima", "n": 2}).encode(),
        "rows.jsonl": b'{"a": 1}\n{"a": 2}\n',
        "notes.md": b"# Findings\nLima is warmer.",
        "run.log": b"step 1\nstep 2\n",
        "chart.png": png(),
        "archive.zip": b"PK\x03\x04rest",
    }
    for name, data in files.items():
        model_writes(backend, container, name, data)
    got = {name: fetch(backend, container, name, tmp_path) for name in files}
    np.testing.assert_array_equal(got["grid.npy"].value, np.arange(6).reshape(2, 3))
    assert set(got["parts.npz"].value) == {"x", "y"} and got["parts.npz"].kind == "arrays"
    assert got["summary.json"].value == {"best": "Lima", "n": 2}
    assert got["rows.jsonl"].value == [{"a": 1}, {"a": 2}]
    assert got["notes.md"].value == "# Findings\nLima is warmer." and got["notes.md"].kind == "text"
    assert got["run.log"].value == "step 1\nstep 2\n"
    chart = got["chart.png"]
    assert (chart.kind, chart.mime) == ("image", "image/png")
    assert chart.value.size == (6, 3)
    assert got["archive.zip"].kind == "bytes" and got["archive.zip"].value == files["archive.zip"]
    assert got["archive.zip"].path.read_bytes() == files["archive.zip"]


def test_pickles_are_never_loaded(backend, container, tmp_path) -> None:
    trap = pickle.dumps(Trap())
    model_writes(backend, container, "model.pkl", trap)
    pulled = fetch(backend, container, "model.pkl", tmp_path)
    assert pulled.kind == "bytes" and pulled.value == trap
    buf = io.BytesIO()
    np.save(buf, np.array([Trap()], dtype=object), allow_pickle=True)
    model_writes(backend, container, "objects.npy", buf.getvalue())
    with pytest.raises(ContainerFileError) as info:
        fetch(backend, container, "objects.npy", tmp_path)
    assert "pickles refused" in str(info.value)
    assert (tmp_path / "objects.npy").read_bytes() == buf.getvalue()


def test_an_undecodable_file_keeps_its_bytes_and_says_where(backend, container, tmp_path) -> None:
    model_writes(backend, container, "broken.parquet", b"PAR1 this is not parquet")
    with pytest.raises(ContainerFileError) as info:
        fetch(backend, container, "broken.parquet", tmp_path)
    message = str(info.value)
    assert "broken.parquet could not be read as Parquet" in message
    assert f"The raw bytes were kept at {tmp_path / 'broken.parquet'}" in message
    assert (tmp_path / "broken.parquet").read_bytes() == b"PAR1 this is not parquet"


def test_a_missing_file_lists_what_is_there(backend, container, tmp_path) -> None:
    model_writes(backend, container, "clean.csv", b"a\n1\n")
    model_writes(backend, container, "out/plot.png", png())
    with pytest.raises(ContainerFileError) as info:
        fetch(backend, container, "cleaned.csv", tmp_path)
    assert "There is no file 'cleaned.csv' in the container. It holds: clean.csv, out/plot.png." in str(
        info.value
    )
    assert list(tmp_path.iterdir()) == []


def test_files_are_found_by_path_link_id_or_base_name(backend, container, tmp_path) -> None:
    model_writes(backend, container, "out/clean.csv", b"a\n1\n")
    file_id = asyncio.run(backend.list_files(container))[0].id
    for name in (
        "/mnt/data/out/clean.csv",
        "sandbox:/mnt/data/out/clean.csv",
        file_id,
        "out/clean.csv",
        "clean.csv",
    ):
        pulled = fetch(backend, container, name, tmp_path)
        assert pulled.path == tmp_path / "out" / "clean.csv"
        assert pulled.value["a"].tolist() == [1]


def test_notebook_files_are_pulled_by_the_name_the_notebook_gave_them(backend, container, tmp_path) -> None:
    registry = PushRegistry(tmp_path / "spool")
    asyncio.run(ContainerFiles(backend, container, registry).push([PushRequest("df", FRAME)]))
    [stored] = asyncio.run(backend.list_files(container))
    assert stored.name != "df.parquet"  # OpenAI-style hash prefix
    pulled = fetch(backend, container, "df.parquet", tmp_path / "out", registry)
    assert pulled.path == tmp_path / "out" / "df.parquet"
    pd.testing.assert_frame_equal(pulled.value, FRAME)


def test_a_name_that_cannot_be_made_safe_is_refused_and_nothing_is_written(
    backend, container, tmp_path
) -> None:
    model_writes(backend, container, "../../etc/cron.d/evil", b"* * * * * root boom")
    out = tmp_path / "out"
    with pytest.raises(ContainerFileError, match="climbs out of the folder"):
        fetch(backend, container, "evil", out)
    with pytest.raises(ContainerFileError, match="climbs out of the folder"):
        asyncio.run(ContainerFiles(backend, container, PushRegistry()).pull_all(out))
    assert backend.count("download") == 0
    assert not (tmp_path / "etc").exists()


def test_pull_all_takes_every_model_file_and_reports_undecodable_ones(backend, container, tmp_path) -> None:
    registry = PushRegistry(tmp_path / "spool")
    asyncio.run(ContainerFiles(backend, container, registry).push([PushRequest("df", FRAME)]))
    model_writes(backend, container, "result.csv", frame_bytes("csv"))
    model_writes(backend, container, "charts/a.png", png())
    model_writes(backend, container, "bad.json", b"{not json")
    model_writes(backend, container, "cfile_69f0c0b7a1d8819188d3.png", png())  # what plt.show() leaves
    pulled = {
        p.name: p
        for p in asyncio.run(ContainerFiles(backend, container, registry).pull_all(tmp_path / "out"))
    }
    # Not the notebook's df.parquet; everything the model made is saved.
    assert set(pulled) == {"result.csv", "charts/a.png", "bad.json", "cfile_69f0c0b7a1d8819188d3.png"}
    # Each file offers its stem as a variable name, but a machine-made name is no one's variable.
    assert {p.variable for p in pulled.values()} == {"result", "a", "bad", ""}
    pd.testing.assert_frame_equal(pulled["result.csv"].value, FRAME)
    assert pulled["charts/a.png"].kind == "image"
    bad = pulled["bad.json"]
    assert bad.kind == "bytes" and bad.value == b"{not json" and "could not be read as JSON" in bad.error
    assert (tmp_path / "out" / "bad.json").exists()
    everything = asyncio.run(
        ContainerFiles(backend, container, registry).pull_all(tmp_path / "all", include_notebook=True)
    )
    assert len(everything) == 5


def test_ci_files_rows_say_where_each_file_came_from(backend, container, tmp_path) -> None:
    registry = PushRegistry(tmp_path / "spool")
    asyncio.run(
        ContainerFiles(backend, container, registry).push(
            [PushRequest("df", FRAME), PushRequest("note", "hi")]
        )
    )
    model_writes(backend, container, "summary.txt", b"done")
    rows = asyncio.run(ContainerFiles(backend, container, registry).listing())
    assert [(r.name, r.source) for r in rows] == [
        ("df.parquet", "notebook"),
        ("note.txt", "notebook"),
        ("summary.txt", "model"),
    ]
    assert rows[1].size == 2
    assert rows[2].size is None and rows[2].cells()[1] == "?"  # OpenAI reports no size for model files
    assert rows[0].created <= rows[2].created
    assert rows[2].path == "/mnt/data/summary.txt"


# ---- decompression bombs -------------------------------------------------------------------------

ZERO_ROWS = 1_000_000  # one batch of int64 zeros: 8 MB in memory, a few hundred bytes compressed


def parquet_bomb(batches: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"n": np.zeros(ZERO_ROWS, dtype=np.int64)})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
        for _ in range(batches):
            writer.write_table(table)
    return sink.getvalue().to_pybytes()


def feather_bomb(batches: int) -> bytes:
    import pyarrow as pa

    batch = pa.record_batch({"n": np.zeros(ZERO_ROWS, dtype=np.int64)})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, batch.schema, options=options) as writer:
        for _ in range(batches):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("ext", ["parquet", "feather"])
def test_a_small_file_that_decodes_huge_is_refused_and_names_the_override(
    backend, container, tmp_path, ext
) -> None:
    bomb = (parquet_bomb if ext == "parquet" else feather_bomb)(100)  # 100 million rows: 800 MB decoded
    assert len(bomb) < 2**20
    model_writes(backend, container, f"totals.{ext}", bomb)
    files = ContainerFiles(backend, container, PushRegistry(tmp_path / "spool"), pull_memory_cap=64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(ContainerFileError) as info:
            asyncio.run(files.pull(f"totals.{ext}", tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert f"totals.{ext} is " in message and "would take about 762.9 MB in memory once decoded" in message
    assert "over the 64.0 MB limit" in message
    assert "%config CodeInterpreter.pull_memory_cap = 1073741824" in message, "the override, ready to copy"
    assert f"saved at {tmp_path / f'totals.{ext}'}" in message
    assert (tmp_path / f"totals.{ext}").read_bytes() == bomb
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB allocated while refusing"


def test_a_bomb_among_others_in_pull_all_comes_back_as_its_bytes(backend, container, tmp_path) -> None:
    bomb = parquet_bomb(20)
    model_writes(backend, container, "bomb.parquet", bomb)
    model_writes(backend, container, "fine.parquet", frame_bytes("parquet"))
    files = ContainerFiles(backend, container, PushRegistry(tmp_path / "spool"), pull_memory_cap=64 * 2**20)
    pulled = {p.name: p for p in asyncio.run(files.pull_all(tmp_path))}
    assert pulled["bomb.parquet"].kind == "bytes" and pulled["bomb.parquet"].value == bomb
    assert "pull_memory_cap" in (pulled["bomb.parquet"].error or "")
    pd.testing.assert_frame_equal(pulled["fine.parquet"].value, FRAME)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("grid.npy", lambda: _npy_header_only((40_000, 40_000))),
        ("parts.npz", lambda: _zipped("x.npy", b"\0" * (80 * 2**20))),
        ("sheet.xlsx", lambda: _zipped("xl/worksheets/sheet1.xml", b" " * (80 * 2**20))),
        ("huge.png", lambda: _png_header(6_000, 6_000)),  # 108 MB of pixels, under Pillow's own limit
    ],
)
def test_other_formats_are_sized_from_their_headers_first(backend, container, tmp_path, name, make) -> None:
    model_writes(backend, container, name, make())
    files = ContainerFiles(backend, container, PushRegistry(tmp_path / "spool"), pull_memory_cap=64 * 2**20)
    with pytest.raises(ContainerFileError, match="pull_memory_cap"):
        asyncio.run(files.pull(name, tmp_path))


def _npy_header_only(shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue()  # a header promising 12.8 GB, and no data


def _zipped(member: str, data: bytes) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_pull_all_skips_a_file_over_the_download_cap_and_takes_the_rest(backend, container, tmp_path) -> None:
    model_writes(backend, container, "a_huge_dump.bin", b"\0" * (2 * 2**20))
    model_writes(backend, container, "summary.csv", frame_bytes("csv"))
    model_writes(backend, container, "notes.txt", b"all good")
    files = ContainerFiles(backend, container, PushRegistry(tmp_path / "spool"), download_cap=2**20)
    pulled = {p.name: p for p in asyncio.run(files.pull_all(tmp_path / "out"))}
    assert set(pulled) == {"a_huge_dump.bin", "summary.csv", "notes.txt"}, "the files after it came too"
    pd.testing.assert_frame_equal(pulled["summary.csv"].value, FRAME)
    assert pulled["notes.txt"].value == "all good"
    skipped = pulled["a_huge_dump.bin"]
    assert skipped.kind == "skipped" and skipped.value is None and not skipped.variable
    assert "\n" not in (skipped.error or "") and "CodeInterpreter.download_size_cap" in (skipped.error or "")
    assert not (tmp_path / "out" / "a_huge_dump.bin").exists(), "nothing of it was written"
