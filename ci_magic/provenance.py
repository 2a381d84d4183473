"""Provenance: what a %%ci / %%ci_exec cell did, saved with its output in the notebook.

Each turn's record goes into the output metadata of the cell's status line under the
``ci_magic`` key, so it is written into the .ipynb and survives nbconvert. It is plain JSON
(schema below, versioned by ``version``; readers ignore keys they do not know, and a new key
never changes the meaning of an old one)::

    {"schema": "ci-magic/provenance", "version": 1, "kind": "ci" | "exec" | "replay",
     "backend": "openai", "model": "gpt-5-mini", "container_id": "cntr_...",
     "response_ids": ["resp_..."], "started_at": "2026-12-01T23:40:00.120Z", "ended_at": "...",
     "prompt": "...",
     "calls": [{"code": "...", "ok": true, "error": null, "seconds": 0.21}],
     "inputs": [{"name": "df", "path": "/mnt/data/df.parquet", "fingerprint": "..."}],
     "files": [{"name": "squares.csv", "path": "/mnt/data/squares.csv", "size": 1192, "sha256": "..."}],
     "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
     "cost": {"currency": "USD", "tokens": 0.0031, "container": 0.0075, "container_minutes": 5.0,
              "total": 0.0106, "estimate": true},
     "timings": {"wall": 4.2, "first_code": 0.8, "model": 2.9, "code": 0.4}}

No secrets are part of it: no keys, headers or environment, only what the cell already shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ci_magic.costs import CostLedger
from ci_magic.result import Result, ResultBuilder
from ci_magic.transcript import TurnEntry

if TYPE_CHECKING:
    from ci_magic.variables.registry import PushedFile

__all__ = [
    "METADATA_KEY",
    "SCHEMA",
    "SCHEMA_VERSION",
    "cell_provenance",
    "file_sha256",
    "record_turn",
]

METADATA_KEY = "ci_magic"
SCHEMA = "ci-magic/provenance"
SCHEMA_VERSION = 1
HASH_CHUNK = 1024 * 1024


def record_turn(
    result: Result,
    entry: TurnEntry,
    builder: ResultBuilder,
    *,
    backend: str,
    ledger: CostLedger,
    inputs: Sequence[PushedFile],
    memory_limit: str,
    container_created_at: float | None,
    started_at: float,
) -> dict[str, Any]:
    """Fill ``result``'s timings, cost and provenance (and the transcript entry's file hashes)."""
    ended_at = started_at + result.wall_time
    timings = result.timings
    measured = builder.call_seconds
    for call in entry.calls:  # backends that report no "running" status: timed from the complete code
        if call.seconds is None and call.call_id in measured:
            call.seconds = measured[call.call_id]
    timings.code = entry.code_seconds
    if builder.stream_seconds is not None:
        timings.model = max(0.0, builder.stream_seconds - timings.code)
    ledger.add_times(model_seconds=timings.model or 0.0, code_seconds=timings.code)
    result.cost = ledger.charge(
        backend=backend,
        model=result.model or entry.model,
        usage=result.usage,
        container_id=result.container_id,
        memory_limit=memory_limit,
        container_created_at=container_created_at or started_at,
        now=ended_at,
    )
    hashes = {saved.name: file_sha256(saved.path) for saved in result.files if not saved.displayed}
    for file in entry.files:
        file.sha256 = hashes.get(file.name)
    container = result.container_id
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "kind": entry.kind,
        "backend": backend,
        "model": result.model or entry.model,
        "container_id": container,
        "response_ids": [rid for rid in [result.response_id] if rid],
        "started_at": _iso(started_at),
        "ended_at": _iso(ended_at),
        "prompt": result.prompt if entry.kind == "ci" else "",
        "calls": [
            {"code": call.code, "ok": call.ok, "error": call.error, "seconds": _round(call.seconds)}
            for call in entry.calls
        ],
        "inputs": [
            {"name": item.name, "path": item.path, "fingerprint": item.fingerprint}
            for item in inputs
            if container is not None and item.container_id == container
        ],
        "files": [
            {"name": f.name, "path": f.container_path, "size": f.size, "sha256": f.sha256}
            for f in entry.files
        ],
        "usage": {
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "total_tokens": result.usage.total_tokens,
        },
        "cost": result.cost.to_json(),
        "timings": {
            "wall": _round(result.wall_time),
            "first_code": _round(timings.first_code),
            "model": _round(timings.model),
            "code": _round(timings.code),
        },
    }
    result.provenance = record
    return record


def file_sha256(path: Path) -> str | None:
    """The file's SHA-256 (read in chunks; the file is a local copy bounded by the download caps)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def cell_provenance(notebook: Mapping[str, Any], execution_count: int) -> list[dict[str, Any]]:
    """The provenance records of the cell shown as ``In [execution_count]`` in a saved notebook
    (one per %%ci / %%ci_exec turn it ran, in order); [] when it has none."""
    records: list[dict[str, Any]] = []
    for cell in notebook.get("cells") or []:
        if not isinstance(cell, Mapping) or cell.get("execution_count") != execution_count:
            continue
        for output in cell.get("outputs") or []:
            found = (output.get("metadata") or {}).get(METADATA_KEY) if isinstance(output, Mapping) else None
            if isinstance(found, Mapping) and found.get("schema") == SCHEMA:
                records.append(dict(found))
    return records


def read_notebook(path: Path) -> dict[str, Any]:
    """A saved notebook as JSON (an .ipynb is JSON: no code in it is run by reading it)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
