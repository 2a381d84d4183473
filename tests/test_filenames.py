"""A file name chosen by the model never writes outside the output folder."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path

import pytest

from ci_magic import filenames
from ci_magic.backends.base import open_download_target
from ci_magic.errors import ContainerFileError, FileTooLarge
from ci_magic.filenames import download_into, safe_relative_name, save_into, variable_name_for
from tests.fakes import FakeBackend


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/mnt/data/report.csv", "report.csv"),
        ("report.csv", "report.csv"),
        ("sandbox:/mnt/data/charts/q1.png", "charts/q1.png"),
        ("/mnt/data/out//./clean.csv", "out/clean.csv"),
        ("out\\clean.csv", "out/clean.csv"),
        ("/mnt/data/données/été.csv", "données/été.csv"),
        ("/mnt/data/📈 growth.png", "📈 growth.png"),
        ("/mnt/data/.hidden", "_hidden"),
    ],
)
def test_container_paths_become_relative_names(name: str, expected: str) -> None:
    assert safe_relative_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Where shells, IPython, git and desktop sessions read start-up code and settings.
        (".ipython/profile_default/startup/00-run.py", "_ipython/profile_default/startup/00-run.py"),
        (".bashrc", "_bashrc"),
        ("repo/.git/hooks/pre-commit", "repo/_git/hooks/pre-commit"),
        ("/mnt/data/.config/autostart/x.desktop", "_config/autostart/x.desktop"),
        ("..pth", "_.pth"),
        ("out/...", "out/_.."),
    ],
)
def test_no_saved_file_or_folder_is_a_dot_name(name: str, expected: str, tmp_path: Path) -> None:
    assert safe_relative_name(name) == expected
    saved = save_into(tmp_path, name, b"import os")
    assert saved == tmp_path / expected and saved.read_bytes() == b"import os"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_unicode_names_are_normalized_to_one_spelling() -> None:
    decomposed = unicodedata.normalize("NFD", "café.csv")
    assert decomposed != "café.csv"
    assert safe_relative_name(decomposed) == "café.csv"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../secrets.txt", "'..'"),
        ("/mnt/data/../../etc/passwd", "'..'"),
        ("out/../../escape.csv", "'..'"),
        ("..\\..\\Windows\\win.ini", "'..'"),
        ("/etc/passwd", "absolute path outside /mnt/data"),
        ("C:\\Users\\me\\x.csv", "absolute path outside /mnt/data"),
        ("a\x00b.csv", "U+0000"),
        ("line\nbreak.csv", "U+000A"),
        ("evil\u202egnp.exe", "U+202E"),
        ("", "empty"),
        ("   ", "empty"),
        ("/mnt/data/", "empty"),
        ("/mnt/data", "data folder itself"),
        ("nul.txt", "reserved device name"),
        ("out/CON", "reserved device name"),
        ("x" * 300 + ".csv", "longer than 255 bytes"),
    ],
)
def test_unsafe_names_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ContainerFileError) as info:
        safe_relative_name(name)
    message = str(info.value)
    assert reason in message
    assert "Nothing was written" in message
    assert "\n" not in message  # one paragraph


def test_save_into_writes_sub_folders_and_replaces_atomically(tmp_path: Path) -> None:
    first = save_into(tmp_path, "/mnt/data/out/clean.csv", b"a,b\n1,2\n")
    assert first == tmp_path / "out" / "clean.csv"
    assert first.read_bytes() == b"a,b\n1,2\n"
    again = save_into(tmp_path, "out/clean.csv", b"a,b\n3,4\n")
    assert again.read_bytes() == b"a,b\n3,4\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clean.csv"]  # no temp files left


def test_save_into_refuses_traversal_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "output"
    with pytest.raises(ContainerFileError):
        save_into(folder, "../escaped.txt", b"x")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.fixture(params=["dir_fd", "resolving"])
def save_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both implementations: O_NOFOLLOW walking (POSIX) and the resolve-and-check fallback (Windows)."""
    if request.param == "resolving":
        monkeypatch.setattr(filenames, "_HAVE_DIR_FD", False)
    elif not filenames._HAVE_DIR_FD:
        pytest.skip("this platform has no dir_fd support")
    return request.param


def test_a_symlinked_folder_inside_the_output_folder_is_not_followed(tmp_path: Path, save_mode: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "output"
    folder.mkdir()
    (folder / "charts").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ContainerFileError) as info:
        save_into(folder, "/mnt/data/charts/plot.png", b"png")
    assert "symlink" in str(info.value)
    assert list(outside.iterdir()) == []


def output_with_a_planted_link(tmp_path: Path) -> tuple[Path, Path]:
    """An output folder whose report.txt is a symlink to a precious file outside it: (folder, victim)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "output"
    folder.mkdir()
    (folder / "report.txt").symlink_to(victim)
    return folder, victim


def test_a_symlink_at_the_destination_is_replaced_not_written_through(tmp_path: Path, save_mode: str) -> None:
    folder, victim = output_with_a_planted_link(tmp_path)
    saved = save_into(folder, "report.txt", b"from the model")
    assert victim.read_bytes() == b"precious"
    assert not saved.is_symlink()
    assert saved.read_bytes() == b"from the model"


def test_an_existing_folder_at_the_destination_is_refused(tmp_path: Path, save_mode: str) -> None:
    (tmp_path / "result").mkdir()
    with pytest.raises(ContainerFileError) as info:
        save_into(tmp_path, "result", b"data")
    assert "existing folder" in str(info.value)
    assert (tmp_path / "result").is_dir()


def test_the_output_folder_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_into(link, "a.txt", b"ok")
    assert (real / "a.txt").read_bytes() == b"ok"


@pytest.mark.parametrize(
    ("filename", "identifier"),
    [
        ("clean.csv", "clean"),
        ("/mnt/data/out/sales report-2024.csv", "sales_report_2024"),
        ("2024_totals.parquet", "f_2024_totals"),
        ("class.json", "class_"),
        ("données.csv", "données"),
        (".env", "env"),
        ("---.txt", "pulled"),
    ],
)
def test_pulled_files_bind_to_an_identifier_from_their_stem(filename: str, identifier: str) -> None:
    assert variable_name_for(filename) == identifier
    assert identifier.isidentifier()


# ---- download_into: how every container file reaches the disk ----------------------------------------


def model_file(backend: FakeBackend, path: str, data: bytes) -> tuple[str, str]:
    container = asyncio.run(backend.create_container())
    return container.id, backend.add_model_file(container.id, path, data).id


def test_a_download_lands_under_its_safe_name_and_nothing_else_is_left(
    tmp_path: Path, save_mode: str
) -> None:
    backend = FakeBackend()
    cid, fid = model_file(backend, "/mnt/data/out/report.csv", b"a,b\n1,2\n")
    path, size = asyncio.run(
        download_into(backend, cid, fid, tmp_path, "/mnt/data/out/report.csv", max_bytes=100)
    )
    assert (path, size) == (tmp_path / "out" / "report.csv", 8)
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "report.csv"], "no temporary file left"


def test_a_download_over_the_cap_writes_nothing(tmp_path: Path, save_mode: str) -> None:
    backend = FakeBackend()
    cid, fid = model_file(backend, "/mnt/data/big.bin", b"x" * 1000)
    with pytest.raises(FileTooLarge) as info:
        asyncio.run(download_into(backend, cid, fid, tmp_path, "big.bin", max_bytes=999))
    assert info.value.limit == 999
    assert list(tmp_path.iterdir()) == []


def test_a_download_replaces_a_symlink_at_its_destination(tmp_path: Path, save_mode: str) -> None:
    folder, victim = output_with_a_planted_link(tmp_path)
    backend = FakeBackend()
    cid, fid = model_file(backend, "/mnt/data/report.txt", b"from the model")
    path, _ = asyncio.run(download_into(backend, cid, fid, folder, "report.txt", max_bytes=100))
    assert victim.read_bytes() == b"precious" and not path.is_symlink()
    assert path.read_bytes() == b"from the model"


def test_a_download_named_to_climb_out_is_refused_before_it_starts(tmp_path: Path, save_mode: str) -> None:
    backend = FakeBackend()
    cid, fid = model_file(backend, "/mnt/data/x.txt", b"x")
    with pytest.raises(ContainerFileError, match="climbs out"):
        asyncio.run(download_into(backend, cid, fid, tmp_path / "output", "../x.txt", max_bytes=100))
    assert backend.count("download") == 0 and not (tmp_path / "x.txt").exists()


def test_the_download_target_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "target").symlink_to(victim)
    with pytest.raises(FileExistsError):
        open_download_target(tmp_path / "target")
    assert victim.read_bytes() == b"precious"
