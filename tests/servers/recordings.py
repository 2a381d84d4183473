"""Loading the genuine OpenAI recordings kept outside the repo in ``<repo>/../shared/fixtures/openai``.

Three formats, one result type per kind of data:

- vercel ``*.chunks.txt``: one SSE ``data:`` JSON payload a line (no ``event:`` lines);
- pydantic-ai VCR cassettes (``*.yaml``): the SSE body verbatim in ``response.body.string``,
  the request JSON under ``request.parsed_body``;
- openai-dotnet session records (``*.json`` with ``Entries``): REST request/response pairs;
- a plain non-streamed response object (any other ``*.json``).

Streamed events keep the payload's exact text (``SSEEvent.data``) so a replay can be
byte-faithful; ``SSEEvent.json`` is the parsed form for comparisons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers.responses_stream import SSEEvent

__all__ = [
    "DOTNET_CONTAINER_FILES",
    "DOTNET_CREATE_CONTAINER",
    "DOTNET_FILE_CRUD",
    "DOTNET_LIST_CONTAINERS",
    "FIXTURES_DIR",
    "PYDANTIC_IMAGE_STREAM",
    "VERCEL_CHUNKS",
    "VERCEL_RESPONSE",
    "CassetteInteraction",
    "DotnetEntry",
    "fixtures_available",
    "load_cassette",
    "load_dotnet",
    "load_response",
    "load_stream",
    "parse_sse",
    "resolve_recording",
    "streaming_recordings",
]

FIXTURES_DIR = (Path(__file__).parents[2] / ".." / "shared" / "fixtures" / "openai").resolve()

VERCEL_CHUNKS = "vercel__ai__openai-code-interpreter-tool.1.chunks.txt"
VERCEL_RESPONSE = "vercel__ai__openai-code-interpreter-tool.1.json"
PYDANTIC_IMAGE_STREAM = "pydantic__pydantic-ai__test_openai_responses_code_execution_return_image_stream.yaml"
DOTNET_CREATE_CONTAINER = "openai__openai-dotnet__CanCreateContainer.json"
DOTNET_FILE_CRUD = "openai__openai-dotnet__CanUploadGetAndDeleteContainerFile.json"
DOTNET_LIST_CONTAINERS = "openai__openai-dotnet__ContainerCollectionOptionsCanBeConfigured.json"
DOTNET_CONTAINER_FILES = "openai__openai-dotnet__ContainerFileCollectionOptionsCanBeConfigured.json"


@dataclass(frozen=True)
class CassetteInteraction:
    method: str
    uri: str
    request: dict[str, Any] | None
    status: int
    headers: dict[str, list[str]]
    body: str


@dataclass(frozen=True)
class DotnetEntry:
    method: str
    uri: str
    request_body: Any
    status: int
    headers: dict[str, Any]
    body: Any


def fixtures_available(directory: Path = FIXTURES_DIR) -> bool:
    return (directory / VERCEL_CHUNKS).is_file()


def resolve_recording(name: str | Path, directory: Path = FIXTURES_DIR) -> Path:
    """A path as given if it exists, else the file of that name in the fixtures folder."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = directory / path.name
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no recording {str(name)!r} (looked in {directory})")


def streaming_recordings(directory: Path = FIXTURES_DIR) -> list[Path]:
    return [p for p in (directory / VERCEL_CHUNKS, directory / PYDANTIC_IMAGE_STREAM) if p.is_file()]


def parse_sse(text: str) -> list[SSEEvent]:
    """Split an SSE body into events; a missing ``event:`` line falls back to the payload's type."""
    events: list[SSEEvent] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name: str | None = None
        data_lines: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data_lines.append(line[len("data:") :].removeprefix(" "))
        if not data_lines:
            continue
        data = "\n".join(data_lines)
        if data.startswith("[DONE]"):
            continue
        events.append(SSEEvent(name or json.loads(data)["type"], data))
    return events


def _load_chunks(path: Path) -> list[SSEEvent]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            events.append(SSEEvent(json.loads(line)["type"], line))
    return events


def load_cassette(path: Path) -> list[CassetteInteraction]:
    import yaml  # only the cassette needs PyYAML; keep the server importable without it

    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    interactions = []
    for item in document["interactions"]:
        request, response = item["request"], item["response"]
        interactions.append(
            CassetteInteraction(
                method=request["method"],
                uri=request["uri"],
                request=request.get("parsed_body"),
                status=int(response["status"]["code"]),
                headers=response.get("headers", {}),
                body=response["body"]["string"],
            )
        )
    return interactions


def load_dotnet(path: Path) -> list[DotnetEntry]:
    document = json.loads(path.read_text(encoding="utf-8"))
    return [
        DotnetEntry(
            method=entry["RequestMethod"],
            uri=entry["RequestUri"],
            request_body=entry.get("RequestBody"),
            status=int(entry["StatusCode"]),
            headers=entry.get("ResponseHeaders", {}),
            body=entry.get("ResponseBody"),
        )
        for entry in document["Entries"]
    ]


def load_stream(path: Path) -> list[SSEEvent]:
    """The streamed events of a ``.chunks.txt`` file or of the first SSE body in a cassette."""
    if path.name.endswith(".chunks.txt"):
        return _load_chunks(path)
    if path.suffix in (".yaml", ".yml"):
        for interaction in load_cassette(path):
            if interaction.body.lstrip().startswith(("event:", "data:")):
                return parse_sse(interaction.body)
        raise ValueError(f"{path.name}: no SSE body in the cassette")
    raise ValueError(f"{path.name}: not a streaming recording (.chunks.txt or .yaml cassette)")


def load_response(path: Path) -> dict[str, Any]:
    """A non-streamed ``/v1/responses`` body."""
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("object") != "response":
        raise ValueError(f"{path.name}: not a response object")
    return document
