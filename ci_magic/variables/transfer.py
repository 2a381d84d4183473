"""The file operations of one container, on any ``Backend``: push, re-upload, pull, list.

``ContainerFiles`` holds what they all need (the backend, the container, the session's registry
of pushed files, the caps): the session makes one per operation.

Push is all-or-nothing up to the upload: every request is classified and fingerprinted, its file
size estimated from the value and checked against the cap *before* encoding (so an oversized
frame is refused before any large allocation), then encoded and checked again exactly, all
before the first byte leaves. An unchanged variable (same fingerprint, file still there) costs a
fingerprint, or for a pandas object under copy-on-write an O(columns) snapshot check, plus one
listing call for the batch; a changed one replaces its old container file. Uploads into
sub-folders cannot race to create the same folder: the first file of each new folder goes alone,
the rest concurrently. When an upload fails, the error says exactly which files are in the
container (recorded, not sent again next time) and which are not.

Pull is bounded twice: the download by the backend's byte cap, and decoding by the size the
decoded object will take, estimated from the file's own metadata before it is decoded.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from ci_magic.backends.base import DEFAULT_DOWNLOAD_SIZE_CAP, Backend, ContainerFile, size_text
from ci_magic.errors import BackendError, CIError, ContainerFileError, FileTooLarge, VariableError
from ci_magic.filenames import download_into, safe_relative_name, variable_name_for
from ci_magic.variables.codecs import CODECS, PICKLE, Prepared, prepare
from ci_magic.variables.formats import FileFormat, format_of, machine_named
from ci_magic.variables.progress import PROGRESS_THRESHOLD, Progress
from ci_magic.variables.registry import PushedFile, PushRegistry, PushRequest
from ci_magic.variables.schema import format_size

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PULL_MEMORY_CAP",
    "DEFAULT_SIZE_CAP",
    "ContainerFiles",
    "FileRow",
    "PulledFile",
    "PushOutcome",
    "decode",
]

DEFAULT_SIZE_CAP = 512 * 1024 * 1024  # what OpenAI's container file upload accepts
DEFAULT_PULL_MEMORY_CAP = 1024 * 1024 * 1024  # the decoded size %ci_pull loads without asking
DEFAULT_CONCURRENCY = 4

PushStatus = Literal["uploaded", "replaced", "unchanged", "reuploaded", "missing", "skipped"]
T = TypeVar("T")


@dataclass(frozen=True)
class PushOutcome:
    """What happened to one pushed name, for the report (one line per name)."""

    name: str
    filename: str
    path: str  # in the container ("" when missing)
    status: PushStatus
    size: int
    file_id: str | None
    seconds: float
    note: str = ""  # e.g. "Parquet cannot hold ...; sent as CSV", or why a re-upload was skipped
    summary: str = ""  # what the value is: "12 x 3", "float64, shape (5,)"

    @property
    def sent(self) -> bool:
        return self.status in ("uploaded", "replaced", "reuploaded")

    @property
    def line(self) -> str:
        """``sales_df -> /mnt/data/sales_df.parquet (12 x 3): sent, 1.2 KB``."""
        what = {
            "unchanged": "unchanged, not sent again",
            "replaced": f"replaced the previous version, {format_size(self.size)}",
            "reuploaded": f"sent again, {format_size(self.size)}",
            "missing": "not sent",
            "skipped": "not sent",
        }.get(self.status, f"sent, {format_size(self.size)}")
        shape = f" ({self.summary})" if self.summary else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.name} -> {self.path or self.filename}{shape}: {what}{note}"


@dataclass(frozen=True)
class PulledFile:
    name: str  # sanitized, relative to the output folder
    path: Path  # the local copy
    container_path: str
    file_id: str
    size: int
    kind: str  # what it decoded to: "dataframe", "ndarray", "arrays", "json", "text", "image", "bytes";
    # "skipped" (pull_all only): over the download cap, not downloaded (``error`` says so, value None)
    value: Any
    variable: str  # the name to bind by default ("" for machine-made names such as cfile_<hex>.png)
    mime: str | None = None  # images: how to display them
    error: str | None = None  # pull_all only: why the bytes could not be decoded, or why it was skipped


@dataclass(frozen=True)
class FileRow:
    """One row of ``%ci_files``."""

    name: str
    size: int | None
    source: Literal["notebook", "model"]
    created: datetime
    file_id: str
    path: str

    def cells(self) -> tuple[str, str, str, str]:
        return self.name, format_size(self.size), self.source, self.created.strftime("%Y-%m-%d %H:%M:%S")


class ContainerFiles:
    """Push, re-upload, pull and list the files of one container, recording pushes in ``registry``."""

    def __init__(
        self,
        backend: Backend,
        container_id: str,
        registry: PushRegistry,
        *,
        size_cap: int = DEFAULT_SIZE_CAP,
        concurrency: int = DEFAULT_CONCURRENCY,
        progress: Progress | None = None,
        download_cap: int = DEFAULT_DOWNLOAD_SIZE_CAP,
        pull_memory_cap: int = DEFAULT_PULL_MEMORY_CAP,
    ) -> None:
        self.backend = backend
        self.container_id = container_id
        self.registry = registry
        self.size_cap = size_cap
        self.concurrency = max(1, concurrency)
        self.progress = progress
        self.download_cap = download_cap
        self.pull_memory_cap = pull_memory_cap

    # ---- push ------------------------------------------------------------------------------------

    async def push(self, requests: Iterable[PushRequest], *, verify: bool = True) -> list[PushOutcome]:
        """Send ``requests`` as files, skipping unchanged ones; one outcome per name.

        ``verify`` lists the container once to confirm "unchanged" files are still there (the model
        may have deleted one). Raises ``VariableError`` before any upload for an unknown type, a
        format that cannot hold the value, or a file over the size cap.
        """
        by_name = {r.name: r for r in requests}  # the same name twice: the last mention wins
        if not by_name:
            return []
        prepared = await asyncio.to_thread(self._prepare_all, list(by_name.values()))
        try:
            return await self._push_prepared(prepared, verify)
        finally:
            # A snapshot keeps a shallow copy of the frame alive: free the ones no entry adopted.
            kept = {id(e.snapshot) for e in self.registry if e.snapshot is not None}
            for p in prepared:
                if p.snapshot is not None and id(p.snapshot) not in kept:
                    p.snapshot.release()

    def _prepare_all(self, requests: Sequence[PushRequest]) -> list[Prepared]:
        prepared = []
        for request in requests:
            previous = self.registry.get(request.name)
            prepared.append(prepare(request, snapshot=previous.snapshot if previous is not None else None))
        claimed: dict[str, str] = {}
        for p in prepared:
            if p.filename in claimed:
                raise VariableError(
                    f"`{claimed[p.filename]}` and `{p.name}` would both become /mnt/data/{p.filename}. "
                    "Give one of them another name with --as."
                )
            claimed[p.filename] = p.name
        return prepared

    async def _push_prepared(self, prepared: Sequence[Prepared], verify: bool) -> list[PushOutcome]:
        cid, registry = self.container_id, self.registry
        unchanged = [p for p in prepared if _same(registry.get(p.name), p)]
        if verify and any(_here(registry.get(p.name), cid) for p in unchanged):
            live = {f.id for f in await self.backend.list_files(cid)}
            for p in unchanged:
                entry = registry.get(p.name)
                if entry is not None and entry.in_container(cid) and entry.file_id not in live:
                    registry.detach(p.name)  # the model deleted it: send it again
        outcomes: dict[str, PushOutcome] = {}
        to_send: list[Prepared] = []
        for p in prepared:
            entry = registry.get(p.name)
            if entry is not None and _same(entry, p) and entry.in_container(cid):
                if p.snapshot is not entry.snapshot:
                    registry.put(replace(entry, snapshot=p.snapshot))
                outcomes[p.name] = _outcome(entry, "unchanged", 0.0, summary=_summary(p))
                continue
            if entry is not None and _same(entry, p) and entry.spool is not None and entry.spool.exists():
                _reuse_spool(p, entry)  # the bytes we sent last time: no encoding
            to_send.append(p)
        for p in to_send:  # before encoding: refuse what cannot fit without allocating it
            self._check_size(p, p.estimated_size(), estimated=True)
        await asyncio.to_thread(_encode_all, to_send)
        for p in to_send:
            self._check_size(p, p.size, estimated=False)
        for p, result in zip(to_send, await self._send_all(to_send, "pushed"), strict=True):
            if isinstance(result, PushOutcome):
                outcomes[p.name] = result
        return [outcomes[p.name] for p in prepared]

    def _check_size(self, p: Prepared, size: int, *, estimated: bool) -> None:
        if size <= self.size_cap:
            return
        how = " (estimated from the value, before encoding it)" if estimated else ""
        raise VariableError(
            f"`{p.name}` is {format_size(size)} as {p.filename}, over the {format_size(self.size_cap)} "
            f"upload limit{how}, so nothing was sent. Push a subset or a sample (e.g. `df.sample(frac=0.1)` "
            "or the columns you need), or raise CodeInterpreter.upload_size_cap if your backend accepts more."
        )

    async def _send_all(self, batch: Sequence[Prepared], verb: str) -> list[PushOutcome | BaseException]:
        """Upload ``batch``, at most ``concurrency`` at a time, with one progress display for all.

        A backend makes a missing sub-folder on upload; two uploads into the same new folder
        would race to make it. So the first file of each folder goes alone, in order (parents
        first), and only then do the others run concurrently.
        """
        first_in_folder: dict[str, Prepared] = {}
        for p in sorted(batch, key=lambda p: p.filename.count("/")):
            folder = p.filename.rpartition("/")[0]
            if folder:
                first_in_folder.setdefault(folder, p)
        pioneers = list(first_in_folder.values())
        rest = [p for p in batch if all(p is not q for q in pioneers)]
        results: dict[int, PushOutcome | BaseException] = {}
        with _Reporter(
            self.progress, [p.filename for p in batch], sum(p.size for p in batch), verb
        ) as reporter:
            for p in pioneers:
                try:
                    results[id(p)] = await self._send(p, reporter)
                except Exception as error:
                    results[id(p)] = error
            for p, result in zip(
                rest,
                await _bounded(self.concurrency, [functools.partial(self._send, p, reporter) for p in rest]),
                strict=True,
            ):
                results[id(p)] = result
            ordered = [results[id(p)] for p in batch]
            _raise_partial(batch, ordered, verb)
        return ordered

    async def _send(self, p: Prepared, reporter: _Reporter) -> PushOutcome:
        cid, registry = self.container_id, self.registry
        started = time.perf_counter()
        # Replace: whatever holds this name or this file name in the container goes first, so a
        # backend that keys files by path never ends up deleting the new upload.
        stale = [
            e for e in registry if (e.name == p.name or e.filename == p.filename) and e.in_container(cid)
        ]
        for old in stale:
            assert old.file_id is not None
            await self._delete_quietly(old.file_id)
            registry.detach(old.name)
        reporter.starting(p.filename)
        assert p.source is not None
        uploading = self.backend.upload_file(cid, p.filename, p.source)
        spool: Path | None = None
        if isinstance(p.source, bytes):
            spool = registry.spool_path(p.name, p.fingerprint)
            # Spool while the upload runs: the copy only matters if this container later expires.
            sent, spooled = await asyncio.gather(
                uploading, asyncio.to_thread(_write_spool, spool, p.source), return_exceptions=True
            )
            if isinstance(sent, BaseException):
                spool.unlink(missing_ok=True)
                raise sent
            if isinstance(spooled, BaseException):
                spool = None  # the file is in the container all the same; only a re-upload would miss it
            created = sent
        else:
            created = await uploading
            spool = p.source if p.kind != "file" else None  # re-sent from an earlier spool
        reporter.advance(p.filename, p.size)
        entry = PushedFile(
            name=p.name,
            filename=p.filename,
            fingerprint=p.fingerprint,
            kind=p.kind,
            fmt=p.fmt,
            size=p.size,
            origin=p.origin,
            card_body=p.card_body,
            reader=p.reader,
            container_id=cid,
            file_id=created.id,
            container_path=created.path,
            spool=spool,
            source_path=p.value if p.kind == "file" else None,
            snapshot=p.snapshot,
        )
        registry.put(entry)
        status: PushStatus = "replaced" if stale else "uploaded"
        return _outcome(entry, status, time.perf_counter() - started, note=p.note, summary=_summary(p))

    async def _delete_quietly(self, file_id: str) -> None:
        """Delete a file we are replacing; one that is already gone (the model removed it) is fine."""
        try:
            await self.backend.delete_file(self.container_id, file_id)
        except ContainerFileError:  # the local sandbox: "has no file with id"
            return
        except BackendError as exc:
            if exc.status_code != 404:
                raise

    async def reupload(self) -> list[PushOutcome]:
        """Restore every registered file in this (new) container, after expiry or ``%ci_reset``.

        Variables come back from the spooled bytes; files pushed by path are re-read from disk (their
        current version). A file whose source is gone (``missing``) or no longer fits the size cap
        (``skipped``) is dropped from the registry, so its card stops being sent; the others still go.
        After an upload error, calling it again retries what is not in the container yet.
        """
        registry = self.registry
        entries = [e for e in registry if not e.in_container(self.container_id)]
        outcomes: dict[str, PushOutcome] = {}
        batch: list[Prepared] = []

        def drop(entry: PushedFile, status: PushStatus, why: str) -> None:
            registry.remove(entry.name)
            outcomes[entry.name] = PushOutcome(
                entry.name, entry.filename, "", status, entry.size, None, 0.0, why
            )

        for entry in entries:
            registry.detach(entry.name)
            if entry.source_path is not None and entry.source_path.is_file():
                request = PushRequest(entry.name, entry.source_path, entry.origin, filename=entry.filename)
                try:
                    p = prepare(request)
                    p.encode()
                    self._check_size(p, p.size, estimated=False)
                except VariableError as exc:
                    drop(entry, "skipped", exc.message)
                    continue
                batch.append(p)
            elif entry.spool is not None and entry.spool.exists():
                codec = next((c for c in (*CODECS, PICKLE) if c.kind == entry.kind), PICKLE)
                p = Prepared(
                    entry.name, None, entry.origin, codec, entry.fmt, entry.filename, entry.fingerprint
                )
                p.snapshot = entry.snapshot
                _reuse_spool(p, entry)
                batch.append(p)
            else:
                drop(entry, "missing", f"{entry.source_path or entry.spool} no longer exists")
        for p, result in zip(batch, await self._send_all(batch, "re-uploaded"), strict=True):
            if isinstance(result, PushOutcome):
                outcomes[p.name] = replace(result, status="reuploaded")
        return [outcomes[e.name] for e in entries]

    # ---- pull and list -------------------------------------------------------------------------

    async def pull(self, name: str, output_dir: Path) -> PulledFile:
        """Download one container file into ``output_dir`` and decode it (never unpickles).

        ``name`` may be a file name, a ``/mnt/data/...`` path, a ``sandbox:`` link or a file id.
        Raises ``ContainerFileError`` when it is not there (listing what is), is too large to
        download or to decode, or cannot be decoded (after saving the bytes, which it points to).
        """
        file = self._find(await self.backend.list_files(self.container_id), name)
        return await self._fetch(file, Path(output_dir), strict=True)

    async def pull_all(self, output_dir: Path, *, include_notebook: bool = False) -> list[PulledFile]:
        """Download every file the model made (``include_notebook``: ours too).

        Undecodable files come back as bytes with ``error`` set, and files over the download cap as
        ``kind="skipped"`` (nothing written, ``error`` the line to show), instead of stopping the
        others; a file name that cannot be saved safely raises ``ContainerFileError`` before anything
        is downloaded.
        """
        files = [
            f
            for f in await self.backend.list_files(self.container_id)
            if include_notebook or self._source_of(f) == "model"
        ]
        for file in files:  # refuse an unsafe name before anything is downloaded or written
            safe_relative_name(self._local_name(file))
        results = await _bounded(
            self.concurrency,
            [functools.partial(self._fetch, f, Path(output_dir), strict=False) for f in files],
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, PulledFile)]

    async def listing(self) -> list[FileRow]:
        """Rows for ``%ci_files``: name, size, source (notebook/model), created; oldest first."""
        rows = []
        for file in await self.backend.list_files(self.container_id):
            entry = self.registry.by_file_id(file.id)
            size = file.bytes if file.bytes is not None else (entry.size if entry is not None else None)
            created = datetime.fromtimestamp(file.created_at, tz=timezone.utc).astimezone()
            rows.append(
                FileRow(self._local_name(file), size, self._source_of(file), created, file.id, file.path)
            )
        return sorted(rows, key=lambda r: (r.created, r.name))

    async def _fetch(self, file: ContainerFile, output_dir: Path, *, strict: bool) -> PulledFile:
        local = safe_relative_name(self._local_name(file))
        try:
            # Streamed to disk and bounded before anything is read into memory.
            saved, size = await download_into(
                self.backend, self.container_id, file.id, output_dir, local, max_bytes=self.download_cap
            )
        except FileTooLarge as error:
            bigger = max(2 * self.download_cap, error.size or 0)
            if not strict:  # pull_all: one line for this file, then the others
                over = f" ({format_size(error.size)})" if error.size is not None else ""
                return PulledFile(
                    name=local,
                    path=Path(output_dir) / local,
                    container_path=file.path,
                    file_id=file.id,
                    size=error.size or 0,
                    kind="skipped",
                    value=None,
                    variable="",
                    error=f"{local}{over} was skipped: over the {format_size(self.download_cap)} download "
                    f"limit (CodeInterpreter.download_size_cap; raise it, e.g. %config "
                    f"CodeInterpreter.download_size_cap = {bigger}).",
                )
            raise ContainerFileError(
                f"{local} was not pulled: {error.message} A file this large is rarely worth holding in the "
                "notebook; ask the model for a smaller extract (a sample, an aggregate, the columns you "
                f"need), or raise the cap, e.g. %config CodeInterpreter.download_size_cap = {bigger} "
                f"({size_text(bigger)})."
            ) from None
        common: dict[str, Any] = {
            "name": local,
            "path": saved,
            "container_path": file.path,
            "file_id": file.id,
            "size": size,
            "variable": "" if machine_named(local) else variable_name_for(local),
        }
        try:
            value, fmt = await asyncio.to_thread(decode, saved, max_bytes=self.pull_memory_cap)
        except ContainerFileError as error:
            if strict:
                raise
            return PulledFile(kind="bytes", value=saved.read_bytes(), error=error.message, **common)
        kind = fmt.holds if fmt is not None and fmt.read is not None else "bytes"
        if kind == "image" and isinstance(value, bytes):  # Pillow is not installed
            kind = "bytes"
        return PulledFile(
            kind=kind, value=value, mime=fmt.mime if kind == "image" and fmt else None, **common
        )

    def _source_of(self, file: ContainerFile) -> Literal["notebook", "model"]:
        if self.registry.by_file_id(file.id) is not None:
            return "notebook"
        return "notebook" if file.source == "user" else "model"

    def _local_name(self, file: ContainerFile) -> str:
        # Our own uploads get a hash prefix on OpenAI; save them under the name the notebook gave them.
        entry = self.registry.by_file_id(file.id)
        return entry.filename if entry is not None else file.name

    def _find(self, files: Sequence[ContainerFile], name: str) -> ContainerFile:
        wanted = name.strip()
        if wanted.startswith("sandbox:"):
            wanted = wanted[len("sandbox:") :]
        rel = wanted[len("/mnt/data/") :] if wanted.startswith("/mnt/data/") else wanted
        tests: list[Callable[[ContainerFile], bool]] = [
            lambda f: f.id == wanted,
            lambda f: f.path == wanted or f.name == rel,
            lambda f: self._local_name(f) == rel,
        ]
        for test in tests:
            match = [f for f in files if test(f)]
            if match:
                return max(match, key=lambda f: f.created_at)  # the newest when a name was written twice
        by_base = [f for f in files if f.name.rsplit("/", 1)[-1] == rel.rsplit("/", 1)[-1]]
        if len(by_base) == 1:
            return by_base[0]
        listing = ", ".join(sorted(self._local_name(f) for f in files)[:30]) or "no files at all"
        more = f" and {len(files) - 30} more" if len(files) > 30 else ""
        raise ContainerFileError(
            f"There is no file {name!r} in the container. It holds: {listing}{more}. Use one of those names "
            "(%ci_files lists them with sizes)."
        )


# ---- decoding ------------------------------------------------------------------------------------


def decode(path: Path, *, max_bytes: int = DEFAULT_PULL_MEMORY_CAP) -> tuple[Any, FileFormat | None]:
    """The object a saved container file holds, by its extension; unknown ones stay bytes.

    Refuses (``ContainerFileError``) a file whose decoded size, estimated from its metadata, is
    over ``max_bytes``, and one that does not parse as its extension says; either way the message
    says where the raw bytes were kept. Never unpickles.
    """
    fmt = format_of(path.name)
    if fmt is None or fmt.read is None:
        return path.read_bytes(), fmt
    try:
        expected = fmt.decoded_size(path) if fmt.decoded_size is not None else path.stat().st_size
        if expected > max_bytes:
            raise _too_big_to_decode(path, fmt, expected, max_bytes)
        return fmt.read(path), fmt
    except ContainerFileError:
        raise
    except Exception as exc:
        missing = f" (install `{exc.name}` to read it)" if isinstance(exc, ImportError) and exc.name else ""
        raise ContainerFileError(
            f"{path.name} could not be read as {fmt.label}{missing}: {type(exc).__name__}: "
            f"{str(exc)[:300]}. The raw bytes were kept at {path}; open them yourself, or ask the model to "
            "write the file again."
        ) from exc


def _too_big_to_decode(path: Path, fmt: FileFormat, expected: int, limit: int) -> ContainerFileError:
    bigger = 2 ** (expected.bit_length())  # the next power of two above the estimate
    hint = {
        "parquet": " (e.g. `pd.read_parquet(path, columns=[...])`, or `ParquetFile(path).iter_batches()`)",
        "feather": " (e.g. `pd.read_feather(path, columns=[...])`)",
    }.get(fmt.ext, "")
    return ContainerFileError(
        f"{path.name} is {format_size(path.stat().st_size)} on disk but would take about "
        f"{format_size(expected)} in memory once decoded (read from its {fmt.label} metadata), over the "
        f"{format_size(limit)} limit for pulling a file into the notebook, so it was not loaded. It was "
        f"saved at {path}: read part of it yourself{hint}, ask the model for a smaller extract, or raise the "
        f"limit with %config CodeInterpreter.pull_memory_cap = {bigger}."
    )


# ---- helpers -------------------------------------------------------------------------------------


def _same(entry: PushedFile | None, p: Prepared) -> bool:
    return entry is not None and entry.fingerprint == p.fingerprint


def _here(entry: PushedFile | None, container_id: str) -> bool:
    return entry is not None and entry.in_container(container_id)


def _reuse_spool(p: Prepared, entry: PushedFile) -> None:
    """Send the bytes we spooled for ``entry`` instead of encoding again."""
    assert entry.spool is not None
    p.source, p.size, p.card_body = entry.spool, entry.size, entry.card_body
    p.filename, p.fmt, p.reader = entry.filename, entry.fmt, entry.reader


def _encode_all(batch: Sequence[Prepared]) -> None:
    for p in batch:
        if not p.encoded or not p.card_body:
            p.encode()


def _summary(p: Prepared) -> str:
    if p.value is None and p.kind != "json":
        return ""
    try:
        return p.codec.summary(p.value)
    except Exception:  # a report line is a courtesy
        return ""


def _outcome(
    entry: PushedFile, status: PushStatus, seconds: float, *, note: str = "", summary: str = ""
) -> PushOutcome:
    return PushOutcome(
        entry.name, entry.filename, entry.path, status, entry.size, entry.file_id, seconds, note, summary
    )


def _raise_partial(batch: Sequence[Prepared], results: Sequence[object], verb: str) -> None:
    """After a failed upload: one error naming what is in the container now and what is not."""
    failed = [(p, r) for p, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
    if not failed:
        return
    first = failed[0][1]
    assert isinstance(first, BaseException)
    if not isinstance(first, Exception):
        raise first  # KeyboardInterrupt, cancellation: not ours to reword
    arrived = [p.filename for p, r in zip(batch, results, strict=True) if isinstance(r, PushOutcome)]
    missing = ", ".join(p.filename for p, _ in failed)
    there = (
        f"In the container now: {', '.join(arrived)}. " if arrived else "None of them is in the container. "
    )
    reason = first.message if isinstance(first, CIError) else f"{type(first).__name__}: {first}"
    message = (
        f"Not {verb}: {missing} ({reason}). {there}Run it again to send what is missing; what arrived is "
        "not sent twice."
    )
    if isinstance(first, CIError):
        error = copy.copy(first)
        error.message, error.args = message, (message,)
        raise error from first
    raise ContainerFileError(message) from first


async def _bounded(limit: int, thunks: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
    semaphore = asyncio.Semaphore(max(1, limit))

    async def run(thunk: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await thunk()

    return await asyncio.gather(*(run(t) for t in thunks), return_exceptions=True)


def _write_spool(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


class _Reporter:
    """Drives a Progress for large transfers: per-file advances plus a ticking clock."""

    def __init__(self, progress: Progress | None, names: Sequence[str], total: int, verb: str) -> None:
        self.active = progress is not None and total >= PROGRESS_THRESHOLD
        self.progress, self.names, self.total, self.verb = progress, names, total, verb
        self.done = 0
        self.current: list[str] = []
        self.started = time.perf_counter()
        self._ticker: asyncio.Task[None] | None = None

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:.1f} s"

    def report(self) -> None:
        if self.active and self.progress is not None and self.current:
            self.progress.update(
                self.done, self.total, f"uploading {', '.join(self.current)} ({self._elapsed()})"
            )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.report()

    def __enter__(self) -> _Reporter:
        if self.active:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    def starting(self, name: str) -> None:
        self.current.append(name)
        self.report()

    def advance(self, name: str, size: int) -> None:
        self.done += size
        self.current.remove(name)
        self.report()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.active and self.progress is not None:
            shown = ", ".join(self.names[:3]) + (
                f" and {len(self.names) - 3} more" if len(self.names) > 3 else ""
            )
            if exc is None:
                self.progress.close(f"{self.verb} {shown}: {format_size(self.total)} in {self._elapsed()}")
            else:
                self.progress.close(f"{self.verb} failed after {self._elapsed()}: {exc}", ok=False)
