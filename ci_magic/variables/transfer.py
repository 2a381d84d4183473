"""The file operations the session runs, on any ``Backend``: push, re-upload, pull, list.

Push is all-or-nothing up to the upload: every item is classified, fingerprinted, encoded and
checked against the size cap before the first byte leaves, so a bad variable or an oversized frame
changes nothing in the container. An unchanged variable (same fingerprint, file still there) costs
a fingerprint, or for a pandas object under copy-on-write an O(columns) snapshot check, plus one
listing call for the batch; a changed one replaces its old container file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from ci_magic.backends.base import DEFAULT_DOWNLOAD_SIZE_CAP, Backend, ContainerFile, size_text
from ci_magic.errors import BackendError, ContainerFileError, FileTooLarge, VariableError
from ci_magic.filenames import download_into, safe_relative_name, variable_name_for
from ci_magic.variables.codecs import DecodedFile, EncodedValue, Prepared, decode, prepare
from ci_magic.variables.progress import PROGRESS_THRESHOLD, Progress
from ci_magic.variables.registry import PushedFile, PushItem, PushRegistry
from ci_magic.variables.schema import card_body, format_size

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_SIZE_CAP",
    "FileRow",
    "PulledFile",
    "PushOutcome",
    "list_files",
    "pull",
    "pull_all",
    "push",
    "reupload_all",
]

DEFAULT_SIZE_CAP = 512 * 1024 * 1024  # what OpenAI's container file upload accepts
DEFAULT_CONCURRENCY = 4

PushStatus = Literal["uploaded", "replaced", "unchanged", "reuploaded", "missing", "skipped"]
T = TypeVar("T")


@dataclass(frozen=True)
class PushOutcome:
    name: str
    filename: str
    path: str  # in the container ("" when missing)
    status: PushStatus
    size: int
    file_id: str | None
    seconds: float
    note: str = ""  # e.g. "Parquet cannot hold ...; sent as CSV", or why a re-upload was skipped


@dataclass(frozen=True)
class PulledFile:
    name: str  # sanitized, relative to the output folder
    path: Path  # the local copy
    container_path: str
    file_id: str
    size: int
    kind: str  # decode kind: "dataframe", "ndarray", "arrays", "json", "text", "image", "bytes"
    value: Any
    variable: str  # default name to bind: the file stem as an identifier
    mime: str | None = None  # images: how to display them
    error: str | None = None  # pull_all only: why the bytes could not be decoded (value is the bytes)


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


# ---------------------------------------------------------------------------------------------
# push


@dataclass
class _Job:
    """One file on its way: what it is, and (once encoded or taken from the spool) what to send."""

    item: PushItem
    prepared: Prepared
    previous: PushedFile | None
    source: Path | bytes | None = None
    size: int = 0
    body: tuple[str, ...] = ()
    filename: str = ""
    fmt: str = ""
    reader: str = ""
    note: str = ""

    def reuse(self, entry: PushedFile) -> _Job:
        """Send the bytes we spooled for ``entry`` instead of encoding again."""
        assert entry.spool is not None
        self.source, self.size, self.body = entry.spool, entry.size, entry.card_body
        self.filename, self.fmt, self.reader = entry.filename, entry.fmt, entry.reader
        return self

    def encode(self) -> None:
        encoded: EncodedValue = self.prepared.encode()
        self.source, self.size = encoded.source, encoded.size
        self.body = tuple(card_body(self.item.value, encoded))
        self.filename, self.fmt, self.reader, self.note = (
            encoded.filename,
            encoded.fmt,
            encoded.reader,
            encoded.note,
        )


async def _bounded(limit: int, thunks: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
    semaphore = asyncio.Semaphore(max(1, limit))

    async def run(thunk: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await thunk()

    return await asyncio.gather(*(run(t) for t in thunks), return_exceptions=True)


async def _send_all(
    backend: Backend,
    container_id: str,
    registry: PushRegistry,
    jobs: Sequence[_Job],
    progress: Progress | None,
    verb: str,
    concurrency: int,
) -> list[PushOutcome | BaseException]:
    """Upload ``jobs`` at most ``concurrency`` at a time, with one progress display for all."""
    with _Reporter(progress, [j.filename for j in jobs], sum(j.size for j in jobs), verb) as reporter:
        return await _bounded(
            concurrency,
            [lambda job=job: _send(backend, container_id, registry, job, reporter) for job in jobs],
        )


def _raise_first(results: Iterable[object]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _check_batch(items: Sequence[PushItem]) -> list[PushItem]:
    by_name: dict[str, PushItem] = {}
    for item in items:
        by_name[item.name] = item  # the same name twice: the last mention wins
    return list(by_name.values())


def _prepare_all(items: Sequence[PushItem], registry: PushRegistry) -> list[Prepared]:
    prepared = []
    for i in items:
        previous = registry.get(i.name)
        snapshot = previous.snapshot if previous is not None else None
        prepared.append(
            prepare(
                i.value,
                i.name,
                fmt=i.fmt,
                filename=i.filename,
                allow_pickle=i.allow_pickle,
                snapshot=snapshot,
            )
        )
    seen: dict[str, str] = {}
    for p in prepared:
        if p.filename in seen:
            raise VariableError(
                f"`{seen[p.filename]}` and `{p.name}` would both become /mnt/data/{p.filename}. "
                "Give one of them another name with --as."
            )
        seen[p.filename] = p.name
    return prepared


def _encode_missing(jobs: Sequence[_Job]) -> None:
    for job in jobs:
        if job.source is None:
            job.encode()


def _check_size(job: _Job, size_cap: int) -> None:
    if job.size > size_cap:
        raise VariableError(
            f"`{job.item.name}` is {format_size(job.size)} as {job.prepared.filename}, over the "
            f"{format_size(size_cap)} upload limit, so nothing was sent. Push a subset or a sample (e.g. "
            "`df.sample(frac=0.1)` or the columns you need), or raise CodeInterpreter.upload_size_cap if "
            "your backend accepts more."
        )


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


async def _delete_quietly(backend: Backend, container_id: str, file_id: str) -> None:
    """Delete a file we are replacing; one that is already gone (the model removed it) is fine."""
    try:
        await backend.delete_file(container_id, file_id)
    except ContainerFileError:  # the local sandbox: "has no file with id"
        return
    except BackendError as exc:
        if exc.status_code != 404:
            raise


async def _live_file_ids(backend: Backend, container_id: str) -> set[str]:
    return {f.id for f in await backend.list_files(container_id)}


def _write_spool(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


async def push(
    backend: Backend,
    container_id: str,
    registry: PushRegistry,
    items: Iterable[PushItem],
    *,
    size_cap: int = DEFAULT_SIZE_CAP,
    progress: Progress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    verify: bool = True,
) -> list[PushOutcome]:
    """Send ``items`` to ``container_id`` as files, skipping unchanged ones; one outcome per item.

    ``verify`` lists the container once to confirm "unchanged" files are still there (the model
    may have deleted one). Raises ``VariableError`` before any upload for an unknown type, a
    format that cannot hold the value, or a file over ``size_cap``; an upload failure raises the
    backend's error after the other uploads finish (those are kept and recorded).
    """
    items = _check_batch(list(items))
    if not items:
        return []
    prepared = await asyncio.to_thread(_prepare_all, items, registry)
    try:
        return await _push_prepared(
            backend, container_id, registry, items, prepared, size_cap, progress, concurrency, verify
        )
    finally:
        # A snapshot keeps a shallow copy of the frame alive: free the ones no entry adopted.
        kept = {id(e.snapshot) for e in registry if e.snapshot is not None}
        for prep in prepared:
            if prep.snapshot is not None and id(prep.snapshot) not in kept:
                prep.snapshot.release()


async def _push_prepared(
    backend: Backend,
    container_id: str,
    registry: PushRegistry,
    items: Sequence[PushItem],
    prepared: Sequence[Prepared],
    size_cap: int,
    progress: Progress | None,
    concurrency: int,
    verify: bool,
) -> list[PushOutcome]:
    jobs = [_Job(item, prep, registry.get(item.name)) for item, prep in zip(items, prepared, strict=True)]

    unchanged = [
        j for j in jobs if j.previous is not None and j.previous.fingerprint == j.prepared.fingerprint
    ]
    if verify and any(j.previous.in_container(container_id) for j in unchanged if j.previous is not None):
        live = await _live_file_ids(backend, container_id)
        for job in unchanged:
            if (
                job.previous is not None
                and job.previous.in_container(container_id)
                and job.previous.file_id not in live
            ):
                registry.detach(job.item.name)
                job.previous = registry.get(job.item.name)
    outcomes: dict[str, PushOutcome] = {}
    to_send: list[_Job] = []
    for job in jobs:
        prev = job.previous
        same = prev is not None and prev.fingerprint == job.prepared.fingerprint
        if same and prev is not None and prev.in_container(container_id):
            if job.prepared.snapshot is not prev.snapshot:
                registry.put(replace(prev, snapshot=job.prepared.snapshot))
            outcomes[job.item.name] = PushOutcome(
                job.item.name, prev.filename, prev.path, "unchanged", prev.size, prev.file_id, 0.0
            )
        elif same and prev is not None and prev.spool is not None and prev.spool.exists():
            to_send.append(job.reuse(prev))
        else:
            to_send.append(job)

    await asyncio.to_thread(_encode_missing, to_send)
    for job in to_send:
        _check_size(job, size_cap)

    results = await _send_all(backend, container_id, registry, to_send, progress, "pushed", concurrency)
    for job, result in zip(to_send, results, strict=True):
        if isinstance(result, PushOutcome):
            outcomes[job.item.name] = result
    _raise_first(results)
    return [outcomes[item.name] for item in items]


async def _send(
    backend: Backend, container_id: str, registry: PushRegistry, job: _Job, reporter: _Reporter
) -> PushOutcome:
    started = time.perf_counter()
    # Replace: whatever holds this name or this file name in the container goes first, so a backend
    # that keys files by path never ends up deleting the new upload.
    stale = [
        e
        for e in registry
        if (e.name == job.item.name or e.filename == job.filename) and e.in_container(container_id)
    ]
    for old in stale:
        assert old.file_id is not None
        await _delete_quietly(backend, container_id, old.file_id)
        registry.detach(old.name)
    reporter.starting(job.filename)
    assert job.source is not None
    uploading = backend.upload_file(container_id, job.filename, job.source)
    spool: Path | None = None
    if isinstance(job.source, bytes) and job.item.origin == "variable":
        spool = registry.spool_path(job.item.name, job.prepared.fingerprint)
        # Spool while the upload runs: the copy only matters if this container later expires.
        created, _ = await asyncio.gather(uploading, asyncio.to_thread(_write_spool, spool, job.source))
    else:
        created = await uploading
        if job.previous is not None and job.source == job.previous.spool:
            spool = job.previous.spool
    reporter.advance(job.filename, job.size)
    entry = PushedFile(
        name=job.item.name,
        filename=job.filename,
        fingerprint=job.prepared.fingerprint,
        kind=job.prepared.kind,
        fmt=job.fmt,
        size=job.size,
        origin=job.item.origin,
        card_body=job.body,
        reader=job.reader,
        container_id=container_id,
        file_id=created.id,
        container_path=created.path,
        spool=spool,
        source_path=job.prepared.value if job.prepared.kind == "file" else None,
        snapshot=job.prepared.snapshot,
    )
    registry.put(entry)
    return PushOutcome(
        entry.name,
        entry.filename,
        entry.path,
        "replaced" if stale else "uploaded",
        entry.size,
        entry.file_id,
        time.perf_counter() - started,
        job.note,
    )


async def reupload_all(
    backend: Backend,
    new_container_id: str,
    registry: PushRegistry,
    *,
    size_cap: int = DEFAULT_SIZE_CAP,
    progress: Progress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[PushOutcome]:
    """Restore every registered file in a new container (after expiry or ``%ci_reset``).

    Variables come back from the spooled bytes; files pushed by path are re-read from disk (their
    current version). A file whose source is gone (``missing``) or no longer fits the size cap
    (``skipped``) is dropped from the registry, so its card stops being sent; the others still go.
    After an upload error, calling it again retries what is not in the container yet.
    """
    entries = [e for e in registry if not e.in_container(new_container_id)]
    outcomes: dict[str, PushOutcome] = {}
    jobs: list[_Job] = []

    def drop(entry: PushedFile, status: PushStatus, why: str) -> None:
        registry.remove(entry.name)
        outcomes[entry.name] = PushOutcome(entry.name, entry.filename, "", status, entry.size, None, 0.0, why)

    for entry in entries:
        registry.detach(entry.name)
        if entry.source_path is not None and entry.source_path.is_file():
            item = PushItem(entry.name, entry.source_path, entry.origin, filename=entry.filename)
            try:
                job = _Job(item, prepare(entry.source_path, entry.name, filename=entry.filename), None)
                job.encode()
                _check_size(job, size_cap)
            except VariableError as exc:
                drop(entry, "skipped", exc.message)
                continue
            jobs.append(job)
        elif entry.spool is not None and entry.spool.exists():
            prep = Prepared(
                None,
                entry.name,
                entry.kind,
                entry.fmt,
                entry.filename,
                entry.fingerprint,
                snapshot=entry.snapshot,
            )
            jobs.append(_Job(PushItem(entry.name, None, entry.origin), prep, entry).reuse(entry))
        else:
            drop(entry, "missing", f"{entry.source_path or entry.spool} no longer exists")
    results = await _send_all(backend, new_container_id, registry, jobs, progress, "re-uploaded", concurrency)
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, PushOutcome):
            outcomes[job.item.name] = replace(result, status="reuploaded")
    _raise_first(results)
    return [outcomes[e.name] for e in entries]


# ---------------------------------------------------------------------------------------------
# pull and list


def _source_of(file: ContainerFile, registry: PushRegistry | None) -> Literal["notebook", "model"]:
    if registry is not None and registry.by_file_id(file.id) is not None:
        return "notebook"
    return "notebook" if file.source == "user" else "model"


def _local_name(file: ContainerFile, registry: PushRegistry | None) -> str:
    # Our own uploads get a hash prefix on OpenAI; save them under the name the notebook gave them.
    entry = registry.by_file_id(file.id) if registry is not None else None
    return entry.filename if entry is not None else file.name


def _find(files: Sequence[ContainerFile], name: str, registry: PushRegistry | None) -> ContainerFile:
    wanted = name.strip()
    if wanted.startswith("sandbox:"):
        wanted = wanted[len("sandbox:") :]
    rel = wanted[len("/mnt/data/") :] if wanted.startswith("/mnt/data/") else wanted
    for test in (
        lambda f: f.id == wanted,
        lambda f: f.path == wanted or f.name == rel,
        lambda f: _local_name(f, registry) == rel,
    ):
        match = [f for f in files if test(f)]
        if match:
            return max(match, key=lambda f: f.created_at)  # the newest when a name was written twice
    by_base = [f for f in files if f.name.rsplit("/", 1)[-1] == rel.rsplit("/", 1)[-1]]
    if len(by_base) == 1:
        return by_base[0]
    listing = ", ".join(sorted(_local_name(f, registry) for f in files)[:30]) or "no files at all"
    more = f" and {len(files) - 30} more" if len(files) > 30 else ""
    raise ContainerFileError(
        f"There is no file {name!r} in the container. It holds: {listing}{more}. Use one of those names "
        "(%ci_files lists them with sizes)."
    )


async def _fetch(
    backend: Backend,
    container_id: str,
    file: ContainerFile,
    output_dir: Path,
    registry: PushRegistry | None,
    *,
    strict: bool,
    max_bytes: int = DEFAULT_DOWNLOAD_SIZE_CAP,
) -> PulledFile:
    local = safe_relative_name(_local_name(file, registry))
    try:
        # Streamed to disk and bounded before anything is read into memory.
        saved, _ = await download_into(backend, container_id, file.id, output_dir, local, max_bytes=max_bytes)
    except FileTooLarge as error:
        raise ContainerFileError(
            f"{local} was not pulled: {error.message} A file this large is rarely worth holding in the "
            "notebook; ask the model for a smaller extract (a sample, an aggregate, the columns you "
            f"need), or raise the cap, e.g. %config CodeInterpreter.download_size_cap = "
            f"{max(2 * max_bytes, error.size or 0)} ({size_text(max(2 * max_bytes, error.size or 0))})."
        ) from None
    data = await asyncio.to_thread(saved.read_bytes)
    decoded = await asyncio.to_thread(_decode_or_error, local, data, saved)
    common = {
        "name": local,
        "path": saved,
        "container_path": file.path,
        "file_id": file.id,
        "size": len(data),
        "variable": variable_name_for(local),
    }
    if isinstance(decoded, ContainerFileError):
        if strict:
            raise decoded
        return PulledFile(kind="bytes", value=data, error=decoded.message, **common)
    if isinstance(decoded, BaseException):
        raise decoded
    return PulledFile(kind=decoded.kind, value=decoded.value, mime=decoded.mime, **common)


def _decode_or_error(local: str, data: bytes, kept_at: Path) -> DecodedFile | BaseException:
    try:
        return decode(local, data, kept_at=kept_at)
    except Exception as error:  # handed back like gather(return_exceptions=True) did
        return error


async def pull(
    backend: Backend,
    container_id: str,
    name: str,
    output_dir: Path,
    *,
    registry: PushRegistry | None = None,
    max_bytes: int = DEFAULT_DOWNLOAD_SIZE_CAP,
) -> PulledFile:
    """Download one container file into ``output_dir`` and decode it (never unpickles).

    ``name`` may be a file name, a ``/mnt/data/...`` path, a ``sandbox:`` link or a file id.
    Raises ``ContainerFileError`` when it is not there (listing what is) or cannot be decoded
    (after saving the bytes, which the message points to).
    """
    files = await backend.list_files(container_id)
    file = _find(files, name, registry)
    return await _fetch(
        backend, container_id, file, Path(output_dir), registry, strict=True, max_bytes=max_bytes
    )


async def pull_all(
    backend: Backend,
    container_id: str,
    output_dir: Path,
    *,
    registry: PushRegistry | None = None,
    include_notebook: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_bytes: int = DEFAULT_DOWNLOAD_SIZE_CAP,
) -> list[PulledFile]:
    """Download every file the model made (``include_notebook``: ours too).

    Undecodable files come back as bytes with ``error`` set instead of stopping the others; a file
    name that cannot be saved safely raises ``ContainerFileError`` before anything is downloaded.
    """
    files = [
        f
        for f in await backend.list_files(container_id)
        if include_notebook or _source_of(f, registry) == "model"
    ]
    for file in files:  # refuse an unsafe name before anything is downloaded or written
        safe_relative_name(_local_name(file, registry))
    results = await _bounded(
        concurrency,
        [
            lambda f=f: _fetch(
                backend, container_id, f, Path(output_dir), registry, strict=False, max_bytes=max_bytes
            )
            for f in files
        ],
    )
    _raise_first(results)
    return [r for r in results if isinstance(r, PulledFile)]


async def list_files(
    backend: Backend, container_id: str, registry: PushRegistry | None = None
) -> list[FileRow]:
    """Rows for ``%ci_files``: name, size, source (notebook/model), created; oldest first."""
    rows = []
    for file in await backend.list_files(container_id):
        entry = registry.by_file_id(file.id) if registry is not None else None
        size = file.bytes if file.bytes is not None else (entry.size if entry is not None else None)
        created = datetime.fromtimestamp(file.created_at, tz=timezone.utc).astimezone()
        rows.append(
            FileRow(
                _local_name(file, registry), size, _source_of(file, registry), created, file.id, file.path
            )
        )
    return sorted(rows, key=lambda r: (r.created, r.name))
