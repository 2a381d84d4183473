"""Notebook variables become container files the model can load in one line, and only when they changed."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ci_magic.errors import BackendError, VariableError
from ci_magic.variables import codecs
from ci_magic.variables.codecs import prepare
from ci_magic.variables.discover import (
    always_push_items,
    prompt_variables,
    push_items,
    resolve_variables,
)
from ci_magic.variables.progress import TextProgress
from ci_magic.variables.registry import PushedFile, PushRegistry, PushRequest
from ci_magic.variables.transfer import ContainerFiles, PushOutcome
from tests.fakes import FakeBackend

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@pytest.fixture(params=[False, True], ids=["path-keyed", "openai-prefixed"])
def backend(request: pytest.FixtureRequest) -> FakeBackend:
    """Both ways a backend names uploads: exactly /mnt/data/<name>, or OpenAI's /mnt/data/<hash>-<name>."""
    return FakeBackend(hash_prefix=request.param)


@pytest.fixture
def container(backend: FakeBackend) -> str:
    return asyncio.run(backend.create_container()).id


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[PushRegistry]:
    reg = PushRegistry(tmp_path / "spool")
    yield reg
    reg.close()


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the variables serialized during the test."""
    seen: list[str] = []
    original = codecs.Prepared.encode

    def counting(self: codecs.Prepared) -> None:
        seen.append(self.name)
        original(self)

    monkeypatch.setattr(codecs.Prepared, "encode", counting)
    return seen


def sales() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "region": pd.Categorical(["north", "south", "north", "east"]),
            "revenue": [120.5, 98.0, 143.25, 77.0],
            "units": pd.array([3, None, 5, 2], dtype="Int64"),
            "day": pd.date_range("2024-03-01", periods=4, tz="UTC"),
            "note": ["ok", "late", None, "ok"],
        },
        index=pd.Index([101, 102, 103, 104], name="order_id"),
    )
    return frame


def send(backend: FakeBackend, container: str, registry: PushRegistry, **values: Any) -> list[PushOutcome]:
    return asyncio.run(
        ContainerFiles(backend, container, registry).push([PushRequest(k, v) for k, v in values.items()])
    )


def load_like_the_model(entry: PushedFile, data: bytes, tmp_path: Path) -> Any:
    """Run the card's loader line against a local copy of the container file."""
    local = tmp_path / "container" / entry.filename
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    namespace: dict[str, Any] = {}
    exec(entry.reader.replace("{path}", repr(str(local))), namespace)
    return namespace[entry.name if entry.name.isidentifier() else entry.filename.split(".")[0]]


# ---- what each type becomes --------------------------------------------------------------------


def test_a_dataframe_arrives_as_parquet_with_dtypes_and_index(backend, container, registry, tmp_path) -> None:
    df = sales()
    [outcome] = send(backend, container, registry, df=df)
    assert outcome.status == "uploaded"
    assert outcome.filename == "df.parquet"
    assert outcome.path.endswith("df.parquet")
    loaded = load_like_the_model(registry.get("df"), backend.content(container, "df.parquet"), tmp_path)
    pd.testing.assert_frame_equal(loaded, df)


def test_every_supported_type_gets_a_file_named_after_the_variable(
    backend, container, registry, tmp_path
) -> None:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3])
    ax.set_title("trend")
    source = tmp_path / "budget.xlsx"
    pd.DataFrame({"item": ["rent", "food"], "cost": [1200, 300]}).to_excel(source, index=False)
    values = {
        "s": pd.Series([1.5, 2.5], name="price"),
        "arr": np.arange(12, dtype=np.int32).reshape(3, 4),
        "cfg": {"threshold": 0.5, "labels": ["a", "b"], "n": np.int64(3)},
        "ids": [1, 2, 3],
        "limit": 42,
        "readme": "Quarterly numbers.\nSecond line.",
        "blob": b"\x00\x01binary",
        "img": Image.new("RGB", (8, 4), "red"),
        "fig": fig,
        "budget": source,
    }
    outcomes = send(backend, container, registry, **values)
    plt.close(fig)
    assert [o.filename for o in outcomes] == [
        "s.parquet",
        "arr.npy",
        "cfg.json",
        "ids.json",
        "limit.json",
        "readme.txt",
        "blob.bin",
        "img.png",
        "fig.png",
        "budget.xlsx",
    ]
    loaded = {
        name: load_like_the_model(
            registry.get(name), backend.content(container, registry.get(name).filename), tmp_path
        )
        for name in values
    }
    pd.testing.assert_series_equal(loaded["s"], values["s"])
    np.testing.assert_array_equal(loaded["arr"], values["arr"])
    assert loaded["arr"].dtype == np.int32
    assert loaded["cfg"] == {"threshold": 0.5, "labels": ["a", "b"], "n": 3}
    assert loaded["ids"] == [1, 2, 3] and loaded["limit"] == 42
    assert loaded["readme"] == values["readme"]
    assert loaded["blob"] == values["blob"]
    assert loaded["img"].size == (8, 4) and loaded["img"].getpixel((0, 0)) == (255, 0, 0)
    assert loaded["fig"].format == "PNG"
    assert backend.content(container, "budget.xlsx") == source.read_bytes()  # a path goes as is
    assert set(loaded["budget"]) == {"Sheet1"}


def test_csv_on_request_keeps_a_meaningful_index(backend, container, registry, tmp_path) -> None:
    df = sales()[["revenue"]]
    [outcome] = asyncio.run(
        ContainerFiles(backend, container, registry).push([PushRequest("df", df, fmt="csv")])
    )
    assert outcome.filename == "df.csv"
    loaded = load_like_the_model(registry.get("df"), backend.content(container, "df.csv"), tmp_path)
    pd.testing.assert_frame_equal(loaded, df)


def test_a_frame_parquet_cannot_hold_goes_as_csv_and_says_why(backend, container, registry) -> None:
    mixed = pd.DataFrame({"code": [1, "A7", 3.5]})
    [outcome] = send(backend, container, registry, mixed=mixed)
    assert outcome.filename == "mixed.csv"
    assert "Parquet cannot hold" in outcome.note
    assert "note: Parquet cannot hold" in registry.cards()
    with pytest.raises(VariableError, match="cannot be written as parquet"):
        asyncio.run(
            ContainerFiles(backend, container, registry).push([PushRequest("mixed", mixed, fmt="parquet")])
        )


def test_an_unsupported_type_names_what_is_supported_and_sends_nothing(backend, container, registry) -> None:
    with pytest.raises(VariableError) as info:
        send(backend, container, registry, df=sales(), tags={"a", "b"})
    message = str(info.value)
    assert "`tags` is a set" in message
    assert "pandas DataFrame" in message and "--pickle" in message
    assert backend.count("upload") == 0 and len(registry) == 0


def test_pickle_is_opt_in(backend, container, registry) -> None:
    with pytest.raises(VariableError, match="numpy array of Python objects"):
        send(backend, container, registry, ragged=np.array([[1], [1, 2]], dtype=object))
    item = PushRequest("tags", {"a", "b"}, allow_pickle=True)
    [outcome] = asyncio.run(ContainerFiles(backend, container, registry).push([item]))
    assert outcome.filename == "tags.pkl"
    assert pickle.loads(backend.content(container, "tags.pkl")) == {"a", "b"}
    assert "pickle.load" in registry.get("tags").loader
    [named] = asyncio.run(
        ContainerFiles(backend, container, registry).push(
            [PushRequest("df", sales(), filename="model.pkl", allow_pickle=True)]
        )
    )
    assert named.filename == "model.pkl"
    pd.testing.assert_frame_equal(pickle.loads(backend.content(container, "model.pkl")), sales())


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (PushRequest("df", sales(), fmt="xml"), "Use one of: parquet, csv, tsv, feather, json, xlsx"),
        (PushRequest("df", sales(), filename="../up.parquet"), "not a usable container file name"),
        (PushRequest("df", sales(), filename="sales.csv", fmt="parquet"), "disagree"),
        (PushRequest("df", sales(), filename="sales.txt"), "does not say which"),
        (PushRequest("df", sales(), fmt="pickle"), "needs --pickle too"),
        (PushRequest("cfg", {"when": pd.Timestamp("2024-01-01")}), "not JSON-serializable"),
        (PushRequest("grid", np.ones((2, 2, 2)), fmt="csv"), "only 1-D/2-D numeric"),
    ],
)
def test_bad_flags_and_values_are_one_paragraph_errors(backend, container, registry, item, message) -> None:
    with pytest.raises(VariableError) as info:
        asyncio.run(ContainerFiles(backend, container, registry).push([item]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert backend.count("upload") == 0


def test_as_sets_the_container_name(backend, container, registry) -> None:
    [outcome] = asyncio.run(
        ContainerFiles(backend, container, registry).push([PushRequest("df", sales(), filename="q1/sales")])
    )
    assert outcome.filename == "q1/sales.parquet"
    [outcome] = asyncio.run(
        ContainerFiles(backend, container, registry).push([PushRequest("t", "hello", filename="notes.md")])
    )
    assert outcome.filename == "notes.md"


# ---- dedupe and replacement ------------------------------------------------------------------


def test_an_unchanged_variable_is_neither_serialized_nor_uploaded_again(
    backend, container, registry, encodes
) -> None:
    df = sales()
    send(backend, container, registry, df=df)
    [again] = send(backend, container, registry, df=df.copy())  # equal content, another object
    assert again.status == "unchanged"
    assert backend.count("upload") == 1
    assert encodes == ["df"]


def test_a_changed_variable_replaces_its_old_file(backend, container, registry) -> None:
    df = sales()
    [first] = send(backend, container, registry, df=df)
    df.loc[102, "revenue"] = 99.5
    [second] = send(backend, container, registry, df=df)
    assert second.status == "replaced"
    assert ("delete", container, first.file_id) in backend.calls
    names = [f.name for f in asyncio.run(backend.list_files(container))]
    assert len([n for n in names if n.endswith("df.parquet")]) == 1
    assert pd.read_parquet(io.BytesIO(backend.content(container, "df.parquet"))).loc[102, "revenue"] == 99.5


def test_in_place_edits_of_arrays_are_noticed(backend, container, registry) -> None:
    arr = np.zeros(1000)
    send(backend, container, registry, arr=arr)
    arr[500] = 1.0
    [again] = send(backend, container, registry, arr=arr)
    assert again.status == "replaced"


def test_another_format_replaces_the_old_file(backend, container, registry) -> None:
    df = sales()
    [first] = send(backend, container, registry, df=df)
    [second] = asyncio.run(
        ContainerFiles(backend, container, registry).push([PushRequest("df", df, fmt="csv")])
    )
    assert second.status == "replaced" and second.filename == "df.csv"
    assert first.file_id not in {f.id for f in asyncio.run(backend.list_files(container))}
    assert [e.filename for e in registry] == ["df.csv"]


def test_a_file_the_model_deleted_is_uploaded_again_without_reserializing(
    backend, container, registry, encodes
) -> None:
    df = sales()
    [first] = send(backend, container, registry, df=df)
    backend.remove_path(container, first.path)
    [again] = send(backend, container, registry, df=df)
    assert again.status == "uploaded"
    assert backend.count("upload") == 2
    assert encodes == ["df"]  # the spooled bytes went up again
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(backend.content(container, "df.parquet"))), df)


@pytest.mark.parametrize(
    "edit",
    [
        lambda df: df.__setitem__("region", df["region"].cat.rename_categories(str.upper)),
        lambda df: df.__setitem__("note", df["note"].str.upper()),
        lambda df: df.__setitem__("day", df["day"] + pd.Timedelta(seconds=1)),
        lambda df: df.__setitem__("units", df["units"].fillna(0)),
        lambda df: setattr(df, "columns", [*df.columns[:-1], "other"]),
        lambda df: setattr(df, "index", df.index + 1),
        lambda df: df.__setitem__("obj", [{"a": 1}, None, 2, "x"]),
    ],
    ids=["categories", "strings", "tz-datetimes", "nullable-ints", "column-names", "index", "object-column"],
)
def test_fingerprints_see_every_kind_of_change(edit) -> None:
    df = sales()
    df["obj"] = [{"a": 1}, None, 2, "y"]
    before = prepare(PushRequest("df", df, allow_pickle=True)).fingerprint
    assert prepare(PushRequest("df", df.copy(), allow_pickle=True)).fingerprint == before
    edit(df)
    assert prepare(PushRequest("df", df, allow_pickle=True)).fingerprint != before


def test_fingerprints_cover_multiindex_frames() -> None:
    df = sales().reset_index().set_index(["region", "order_id"])
    before = prepare(PushRequest("df", df)).fingerprint
    swapped = df.swaplevel()
    assert prepare(PushRequest("df", swapped)).fingerprint != before
    assert prepare(PushRequest("df", df.copy())).fingerprint == before


# ---- container changes and always_push --------------------------------------------------------


def test_pushed_files_come_back_in_a_new_container(backend, container, registry, tmp_path, encodes) -> None:
    source = tmp_path / "rates.csv"
    source.write_text("currency,rate\nEUR,1.1\n")
    asyncio.run(
        ContainerFiles(backend, container, registry).push(
            [
                PushRequest("df", sales()),
                PushRequest("arr", np.arange(5)),
                *push_items([str(source)], {}, cwd=tmp_path),
            ]
        )
    )
    backend.expire(container)
    fresh = asyncio.run(backend.create_container()).id
    outcomes = asyncio.run(ContainerFiles(backend, fresh, registry).reupload())
    assert [o.status for o in outcomes] == ["reuploaded"] * 3
    # Variables come back from the spool, not re-encoded; the file is re-read from disk.
    assert encodes == ["df", "arr", "rates.csv", "rates.csv"]
    assert np.load(io.BytesIO(backend.content(fresh, "arr.npy"))).tolist() == [0, 1, 2, 3, 4]
    cards = registry.cards(fresh)
    for o in outcomes:
        assert o.path in cards
    assert registry.cards(container) == ""


def test_reupload_reads_the_current_file_and_drops_vanished_ones(
    backend, container, registry, tmp_path
) -> None:
    keep, gone, grown = tmp_path / "keep.txt", tmp_path / "gone.txt", tmp_path / "grown.txt"
    keep.write_text("v1")
    gone.write_text("bye")
    grown.write_text("small")
    paths = [str(keep), str(gone), str(grown)]
    asyncio.run(
        ContainerFiles(backend, container, registry, size_cap=100).push(push_items(paths, {}, cwd=tmp_path))
    )
    keep.write_text("v2 is longer")
    gone.unlink()
    grown.write_text("x" * 500)
    fresh = asyncio.run(backend.create_container()).id
    outcomes = {
        o.name: o for o in asyncio.run(ContainerFiles(backend, fresh, registry, size_cap=100).reupload())
    }
    assert outcomes["keep.txt"].status == "reuploaded"
    assert backend.content(fresh, "keep.txt") == b"v2 is longer"
    assert outcomes["gone.txt"].status == "missing" and "no longer exists" in outcomes["gone.txt"].note
    assert outcomes["grown.txt"].status == "skipped"
    assert "over the 100 B upload limit" in outcomes["grown.txt"].note
    assert "gone.txt" not in registry.cards() and "grown.txt" not in registry.cards()


def test_always_push_folders_keep_their_layout_and_skip_hidden_files(
    backend, container, registry, tmp_path
) -> None:
    folder = tmp_path / "refdata"
    (folder / "fx").mkdir(parents=True)
    (folder / "regions.csv").write_text("code,name\nN,North\n")
    (folder / "fx" / "rates.json").write_text('{"EUR": 1.1}')
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / ".DS_Store").write_bytes(b"junk")
    items = always_push_items([folder])
    assert [i.name for i in items] == ["refdata/regions.csv", "refdata/fx/rates.json"]
    outcomes = asyncio.run(ContainerFiles(backend, container, registry).push(items))
    assert {o.filename for o in outcomes} == {"refdata/regions.csv", "refdata/fx/rates.json"}
    assert all(e.origin == "always_push" for e in registry)
    card = registry.cards()
    assert "code (str), name (str)" in card  # the CSV was peeked at for its columns
    with pytest.raises(VariableError, match="not an existing file or folder"):
        always_push_items([tmp_path / "nope"])


# ---- limits, failures, concurrency, progress --------------------------------------------------


def test_the_size_cap_is_checked_before_anything_is_uploaded(backend, container, registry) -> None:
    big = np.zeros(200_000)  # 1,600,128 bytes as .npy
    with pytest.raises(VariableError) as info:
        asyncio.run(
            ContainerFiles(backend, container, registry, size_cap=2**20).push(
                [PushRequest("small", [1, 2]), PushRequest("big", big)]
            )
        )
    message = str(info.value)
    assert "`big` is 1.5 MB as big.npy, over the 1.0 MB upload limit" in message
    assert backend.count("upload") == 0 and len(registry) == 0


def test_a_failed_upload_keeps_the_others_and_is_retried_next_time(backend, container, registry) -> None:
    backend.fail_uploads.add("b.json")
    with pytest.raises(BackendError) as info:
        send(backend, container, registry, a=[1], b=[2], c=[3])
    # The error says exactly what is in the container now, and what to do.
    assert str(info.value).startswith("Not pushed: b.json (The server failed while uploading b.json.).")
    assert "In the container now: a.json, c.json." in str(info.value) and "Run it again" in str(info.value)
    assert sorted(e.name for e in registry) == ["a", "c"]
    assert "b.json" not in registry.cards()
    backend.fail_uploads.clear()
    outcomes = send(backend, container, registry, a=[1], b=[2], c=[3])
    assert [o.status for o in outcomes] == ["unchanged", "uploaded", "unchanged"]


def test_uploads_run_concurrently_within_the_bound(container, registry) -> None:
    slow = FakeBackend(upload_delay=0.05)
    cid = asyncio.run(slow.create_container()).id
    items = [PushRequest(f"v{i}", [i]) for i in range(9)]
    asyncio.run(ContainerFiles(slow, cid, registry, concurrency=3).push(items))
    assert slow.peak_uploads == 3


def test_two_variables_cannot_claim_one_file_name(backend, container, registry) -> None:
    items = [PushRequest("a", [1], filename="same.json"), PushRequest("b", [2], filename="same.json")]
    with pytest.raises(VariableError, match=r"would both become /mnt/data/same\.json"):
        asyncio.run(ContainerFiles(backend, container, registry).push(items))


def test_large_pushes_show_progress_and_small_ones_stay_quiet(backend, container, registry) -> None:
    stream = io.StringIO()
    asyncio.run(
        ContainerFiles(backend, container, registry, progress=TextProgress(stream)).push(
            [PushRequest("tiny", [1])]
        )
    )
    assert stream.getvalue() == ""
    asyncio.run(
        ContainerFiles(backend, container, registry, progress=TextProgress(stream)).push(
            [PushRequest("big", np.random.default_rng(0).random(1_000_000))]
        )
    )
    lines = stream.getvalue().split("\r")
    assert lines[1].startswith("[........................] 0 B/7.6 MB uploading big.npy (")
    final = lines[-1].rstrip()
    assert final.startswith("pushed big.npy: 7.6 MB in ") and final.endswith(" s")


# ---- the schema card ---------------------------------------------------------------------------


def test_the_card_tells_the_model_enough_to_skip_exploring(backend, container, registry) -> None:
    wide = pd.DataFrame(np.arange(3 * 60).reshape(3, 60), columns=[f"c{i}" for i in range(60)])
    send(backend, container, registry, df=sales(), wide=wide)
    card = registry.get("df").card
    path = registry.get("df").path
    assert card.startswith(f"- {path}: pandas DataFrame, 4 rows x 5 columns")
    assert f"load: import pandas as pd; df = pd.read_parquet('{path}')" in card
    day = str(sales()["day"].dtype)  # datetime64[us, UTC] on pandas 3, [ns, UTC] before
    assert f"region (category), revenue (float64), units (Int64), day ({day}), note (str)" in card
    assert "index order_id (int64, unique): 101, 102, 103, …" in card
    assert "sample (3 of 4 rows):" in card and "143.25" in card
    wide_card = registry.get("wide").card
    assert "c39 (int64), … 20 more" in wide_card
    assert len(wide_card) < 2500  # bounded: cards go with every prompt
    assert registry.cards().startswith("Files from the notebook in /mnt/data:\n- ")


def test_cards_describe_arrays_json_and_text(backend, container, registry) -> None:
    send(
        backend,
        container,
        registry,
        arr=np.arange(20.0).reshape(4, 5),
        cfg={"k": 1, "mode": "fast"},
        readme="Title\nbody",
    )
    cards = registry.cards()
    assert "numpy array float64, shape (4, 5)" in cards
    assert "JSON object with 2 keys" in cards and "keys: 'k', 'mode'" in cards
    assert "text, 10 characters, 2 lines" in cards and "starts: 'Title'" in cards


# ---- which names a prompt or a %ci_push line means ---------------------------------------------


def namespace(tmp_path: Path) -> dict[str, Any]:
    data_file = tmp_path / "orders.csv"
    data_file.write_text("a\n1\n")
    return {
        "df": sales(),
        "arr": np.arange(3),
        "price": np.arange(3),
        "cfg": {"a": 1},
        "np": np,
        "_": sales(),
        "orders_path": data_file,
        "missing_path": tmp_path / "missing.csv",
        "sales_df": sales(),
    }


def test_a_prompt_pushes_the_data_like_names_it_mentions(tmp_path: Path) -> None:
    ns = namespace(tmp_path)
    prompt = "Plot `df.price` by region vs arr and cfg, use np, _ and orders_path, missing_path; df again"
    assert prompt_variables(prompt, ns) == ["df", "arr", "orders_path"]


def test_an_unknown_variable_suggests_close_names(tmp_path: Path) -> None:
    with pytest.raises(VariableError) as info:
        resolve_variables(["sales_dff"], namespace(tmp_path))
    assert "There is no variable `sales_dff`" in str(info.value)
    assert "Did you mean `sales_df`" in str(info.value)


def test_ci_push_arguments_name_variables_files_or_folders(tmp_path: Path) -> None:
    ns = namespace(tmp_path)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "x.txt").write_text("x")
    items = push_items(["df", "orders.csv", "inputs"], ns, cwd=tmp_path)
    assert [(i.name, i.origin) for i in items] == [
        ("df", "variable"),
        ("orders.csv", "path"),
        ("inputs/x.txt", "path"),
    ]
    with pytest.raises(VariableError, match="Did you mean `sales_df`"):
        push_items(["sales_dfx"], ns, cwd=tmp_path)
    with pytest.raises(VariableError, match="neither a variable in the notebook nor an existing file"):
        push_items(["data/none.csv"], ns, cwd=tmp_path)
    with pytest.raises(VariableError, match="--as names one file"):
        push_items(["df", "arr"], ns, filename="x.parquet", cwd=tmp_path)
    with pytest.raises(VariableError, match="Nothing to push"):
        push_items([], ns)


def test_pushed_json_is_plain_json(backend, container, registry) -> None:
    send(backend, container, registry, cfg={"name": "Zoë", "values": [1.5, None]})
    assert json.loads(backend.content(container, "cfg.json")) == {"name": "Zoë", "values": [1.5, None]}


def test_the_progress_bar_is_a_widget_in_jupyter_and_text_elsewhere() -> None:
    from ci_magic.variables.progress import TextProgress, WidgetProgress, default_progress

    assert isinstance(default_progress(), TextProgress)  # no kernel here
    bar = WidgetProgress()
    bar.update(3 * 2**20, 12 * 2**20, "uploading df.parquet (0.5 s)")
    assert bar._bar.value == 250
    assert bar._label.value == "3.0 MB/12.0 MB uploading df.parquet (0.5 s)"
    bar.close("pushed df.parquet: 12.0 MB in 1.1 s")


def test_polars_frames_go_as_parquet_the_container_reads_with_pandas(
    backend, container, registry, tmp_path
) -> None:
    pl = pytest.importorskip("polars")
    frame = pl.DataFrame({"city": ["Oslo", "Lima", None], "temp": [4.5, 19.0, 11.0]})
    assert prompt_variables("average temp in frame", {"frame": frame}) == ["frame"]
    [outcome] = send(backend, container, registry, frame=frame)
    assert outcome.filename == "frame.parquet"
    loaded = load_like_the_model(registry.get("frame"), backend.content(container, "frame.parquet"), tmp_path)
    pd.testing.assert_frame_equal(loaded, frame.to_pandas())
    assert "polars DataFrame (loads as pandas), 3 rows x 2 columns" in registry.get("frame").card
    assert send(backend, container, registry, frame=frame.clone())[0].status == "unchanged"
    assert (
        send(backend, container, registry, frame=frame.with_columns(pl.col("temp") + 1))[0].status
        == "replaced"
    )


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a pandas object's buffers were hashed."""
    from ci_magic.variables import fingerprint

    calls: list[int] = []
    original = fingerprint.frame_parts

    def counting(frame: Any) -> Any:
        calls.append(1)
        return original(frame)

    monkeypatch.setattr(fingerprint, "frame_parts", counting)
    return calls


def test_an_untouched_frame_is_recognized_without_hashing_it_again(
    backend, container, registry, hashed
) -> None:
    df = sales()
    send(backend, container, registry, df=df)
    assert len(hashed) == 1
    assert [o.status for o in send(backend, container, registry, df=df)] == ["unchanged"]
    assert len(hashed) == 1  # copy-on-write proved it unchanged: same object, same buffers
    df.loc[101, "revenue"] = 1.0
    assert [o.status for o in send(backend, container, registry, df=df)] == ["replaced"]
    assert len(hashed) == 2


def test_frames_the_snapshot_cannot_vouch_for_are_hashed_every_time(
    backend, container, registry, hashed, monkeypatch
) -> None:
    from ci_magic.variables import snapshot

    with_objects = pd.DataFrame({"tags": [["a"], ["b"]]})  # mutable cells: only hashing can tell
    send(backend, container, registry, obj=with_objects)
    with_objects.loc[0, "tags"].append("c")
    assert [o.status for o in send(backend, container, registry, obj=with_objects)] == ["replaced"]
    monkeypatch.setattr(snapshot, "SNAPSHOT_MAX_BYTES", 10)  # too big to keep a second reference to
    df = sales()
    send(backend, container, registry, df=df)
    send(backend, container, registry, df=df)
    assert len(hashed) == 2 + 2


def test_the_snapshot_lets_go_when_the_frame_is_replaced_or_deleted(backend, container, registry) -> None:
    import gc

    df = sales()
    send(backend, container, registry, df=df)
    first = registry.get("df").snapshot
    assert first is not None and first._held
    df = sales().head(2)  # the notebook rebinds the name; the old frame is garbage now
    gc.collect()
    assert first._held == []
    send(backend, container, registry, df=df)
    second = registry.get("df").snapshot
    send(backend, container, registry, df=df.copy())  # equal content, another object: new snapshot
    assert second._held == [] and registry.get("df").snapshot is not second
    registry.close()
    assert registry.get("df") is None


def test_replacing_a_file_the_backend_no_longer_has_is_not_an_error(container, registry) -> None:
    class Forgetful(FakeBackend):
        async def delete_file(self, container_id: str, file_id: str) -> None:
            from ci_magic.errors import ContainerFileError

            raise ContainerFileError(f"Container {container_id} has no file with id {file_id!r}.")

    backend = Forgetful()
    cid = asyncio.run(backend.create_container()).id
    asyncio.run(ContainerFiles(backend, cid, registry).push([PushRequest("cfg", {"v": 1})]))
    [again] = asyncio.run(ContainerFiles(backend, cid, registry).push([PushRequest("cfg", {"v": 2})]))
    assert again.status == "replaced"
    assert json.loads(backend.content(cid, "cfg.json")) == {"v": 2}


def test_the_private_spool_exists_only_while_needed(backend, container) -> None:
    registry = PushRegistry()
    send(backend, container, registry, cfg={"v": 1})
    spool = registry.get("cfg").spool
    assert spool is not None and spool.read_bytes() == b'{"v": 1}'
    send(backend, container, registry, cfg={"v": 2})
    assert not spool.exists()  # the replaced bytes are gone
    folder = registry.spool_dir
    registry.close()
    assert not folder.exists()


# ---- folders into fresh containers, and frames too big to send -----------------------------------


class FolderMakingBackend(FakeBackend):
    """Makes a missing parent folder on upload as a file system does: look, then create.

    Between "not there" and "create" another upload can make the folder first; the loser then
    fails with FileExistsError, as ``os.mkdir`` does on the local sandbox's data folder.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folders: set[tuple[str, str]] = set()

    async def upload_file(self, container_id: str, filename: str, source: Path | bytes) -> Any:
        parts = filename.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = (container_id, "/".join(parts[:depth]))
            if folder not in self.folders:
                await asyncio.sleep(0.002)  # the window between the check and the mkdir
                if folder in self.folders:
                    raise FileExistsError(17, "File exists", parts[depth - 1])
                self.folders.add(folder)
        return await super().upload_file(container_id, filename, source)


def reference_folder(tmp_path: Path, folders: int = 4, files: int = 6) -> Path:
    root = tmp_path / "refdata"
    for k in range(folders):
        for sub in (f"region{k}", f"region{k}/daily"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for i in range(files):
                (root / sub / f"rates{i}.csv").write_text(f"day,rate\n{k},{i}\n")
    return root


def test_a_folder_pushed_into_a_fresh_container_arrives_whole(tmp_path, registry) -> None:
    backend = FolderMakingBackend()
    root = reference_folder(tmp_path)
    for _ in range(5):
        container = asyncio.run(backend.create_container()).id
        items = push_items([str(root)], {}, cwd=tmp_path)
        outcomes = asyncio.run(ContainerFiles(backend, container, registry, concurrency=8).push(items))
        assert {o.status for o in outcomes} == {"uploaded"}
        listed = {f.name for f in asyncio.run(backend.list_files(container))}
        assert listed == {i.filename for i in items} and len(listed) == 48


@pytest.mark.slow
def test_a_folder_pushed_into_new_local_containers_never_races_itself(tmp_path) -> None:
    """20 fresh containers of the real local sandbox, each sent a folder with nested sub-folders."""
    from ci_magic.backends.local.backend import LocalBackend
    from ci_magic.backends.local.sandbox import SandboxManager

    root = reference_folder(tmp_path, folders=3, files=8)
    backend = LocalBackend(SandboxManager(tmp_path / "containers", pool_size=0), model_client=None, model="")

    async def twenty_pushes() -> list[int]:
        counts = []
        try:
            for _ in range(20):
                info = await backend.create_container(
                    name="fresh", memory_limit="1g", expires_after_minutes=5
                )
                items = push_items([str(root)], {}, cwd=tmp_path)
                registry = PushRegistry(tmp_path / "spool")
                await ContainerFiles(backend, info.id, registry, concurrency=8).push(items)
                registry.close()
                counts.append(len(await backend.list_files(info.id)))
                await backend.delete_container(info.id)
        finally:
            await backend.aclose()
        return counts

    assert asyncio.run(twenty_pushes()) == [48] * 20


def test_a_frame_too_big_for_the_cap_is_refused_before_it_is_encoded(backend, container, registry) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((2_000_000, 5)), columns=list("abcde"))  # 80 MB, incompressible
    cap = 8 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(VariableError) as info:
            asyncio.run(
                ContainerFiles(backend, container, registry, size_cap=cap).push([PushRequest("frame", frame)])
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "`frame` is " in message and "over the 8.0 MB upload limit" in message
    assert "estimated from the value, before encoding it" in message and "upload_size_cap" in message
    assert peak < cap, f"{peak / 2**20:.1f} MB allocated: the frame was encoded before it was refused"
    assert backend.count("upload") == 0 and len(registry) == 0


def test_a_big_frame_that_compresses_well_still_goes(backend, container, registry) -> None:
    frame = pd.DataFrame({"zeros": np.zeros(6_000_000), "ones": np.ones(6_000_000)})  # 96 MB in memory
    [outcome] = asyncio.run(
        ContainerFiles(backend, container, registry, size_cap=8 * 2**20).push([PushRequest("frame", frame)])
    )
    assert outcome.status == "uploaded" and outcome.size < 8 * 2**20
    assert outcome.line.startswith(f"frame -> {outcome.path} (6,000,000 x 2): sent, ")


def test_the_session_sends_pushed_and_always_push_files_to_each_new_container(tmp_path) -> None:
    from ci_magic.session import Session, SessionSettings

    backend = FakeBackend()
    rates = tmp_path / "rates.csv"
    rates.write_text("currency,rate\nEUR,1.1\n")
    settings = SessionSettings(
        memory_limit="1g", expires_after_minutes=20, output_dir=tmp_path / "out", always_push=(str(rates),)
    )
    session = Session(backend, settings, session_id="t", registry=PushRegistry(tmp_path / "spool"))
    [first_push], notices = asyncio.run(session.push([PushRequest("df", sales())]))
    assert first_push.status == "uploaded"
    assert session.container is not None and notices == []
    first = session.container.id
    assert {f.name for f in asyncio.run(backend.list_files(first))} == {"rates.csv", "df.parquet"}
    backend.expire(first)
    [again], notices = asyncio.run(session.push([PushRequest("df", sales())]))
    assert [n.text for n in notices] == [
        f"Container {first} is expired; started a new one and re-sent your files."
    ]
    assert again.status == "unchanged", "re-sent from the spool when the new container was made"
    second = session.container.id
    assert {f.name for f in asyncio.run(backend.list_files(second))} == {"rates.csv", "df.parquet"}
    assert "/mnt/data/df.parquet" in session.registry.cards(second)
