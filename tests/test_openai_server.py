"""The OpenAI-compatible test server, driven by the real ``openai`` SDK over real HTTP.

Shapes are checked against the genuine recordings in ``<repo>/../shared/fixtures/openai``, never
against hand-written expectations; those tests skip when the recordings are absent.
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, get_args

import openai
import pytest
from openai import OpenAI
from openai.types.responses import ResponseStreamEvent
from pydantic import ValidationError

from tests.servers.containers import sandbox_problem
from tests.servers.openai_server import OpenAIServer
from tests.servers.recordings import (
    DOTNET_CONTAINER_FILES,
    DOTNET_CREATE_CONTAINER,
    DOTNET_FILE_CRUD,
    DOTNET_LIST_CONTAINERS,
    FIXTURES_DIR,
    PYDANTIC_IMAGE_STREAM,
    VERCEL_CHUNKS,
    VERCEL_RESPONSE,
    fixtures_available,
    load_cassette,
    load_dotnet,
    load_response,
    load_stream,
    parse_sse,
)
from tests.servers.replay import Replay
from tests.servers.responses_stream import SSEEvent
from tests.servers.scripted import Call, Scripted, Text

REPO = Path(__file__).parents[1]
needs_sandbox = pytest.mark.skipif(
    sandbox_problem() is not None, reason=f"local sandboxes cannot start here: {sandbox_problem()}"
)
needs_recordings = pytest.mark.skipif(
    not fixtures_available(), reason=f"the genuine OpenAI recordings are not at {FIXTURES_DIR}"
)
EVENT_CLASSES = {
    get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in get_args(get_args(ResponseStreamEvent)[0])
}
OUTPUTS = ["code_interpreter_call.outputs"]


def client_for(server: OpenAIServer, **options: Any) -> OpenAI:
    return OpenAI(base_url=server.url, api_key="test", **options)


@pytest.fixture
def client(openai_server: OpenAIServer) -> Iterator[OpenAI]:
    with client_for(openai_server) as sdk:
        yield sdk


def code_tool(container: str | dict[str, str]) -> list[dict[str, Any]]:
    return [{"type": "code_interpreter", "container": container}]


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path in a JSON value; list elements are told apart by their ``type``."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= key_paths(child, path)
    elif isinstance(value, list):
        for child in value:
            if isinstance(child, dict):
                paths |= key_paths(child, f"{prefix}[{child.get('type', '*')}]")
    return paths


def sdk_problems(events: Iterable[dict[str, Any]]) -> set[str]:
    """Where events fail strict validation against the SDK's model for their type.

    Genuine recordings fail too (newer SDKs require fields OpenAI did not send then), so tests
    demand only that ours fail nowhere the recordings do not.
    """
    problems: set[str] = set()
    for event in events:
        try:
            EVENT_CLASSES[event["type"]].model_validate(event)
        except ValidationError as error:
            problems |= {
                f"{event['type']}: {'.'.join(map(str, e['loc']))} {e['type']}" for e in error.errors()
            }
    return problems


def group_key(event: dict[str, Any]) -> str:
    """An event type, refined by the kind of item or part it carries."""
    for field in ("item", "part", "annotation"):
        if isinstance(event.get(field), dict):
            return f"{event['type']}:{event[field].get('type')}"
    return event["type"]


def paths_by_group(events: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for event in events:
        groups[group_key(event)] |= key_paths(event)
    return groups


def stream_raw(server: OpenAIServer, body: dict[str, Any]) -> list[SSEEvent]:
    """POST /v1/responses with plain http.client and split the SSE body exactly as sent."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request(
        "POST",
        "/v1/responses",
        json.dumps({**body, "stream": True}),
        {"Authorization": "Bearer test", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    text = response.read().decode()
    connection.close()
    events = parse_sse(text)
    assert all(event.type == event.json["type"] for event in events), "event: line and payload type differ"
    return events


def raw_request(
    server: OpenAIServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body, headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


# The scripted turns retell each recording's story, so both streams carry the same kinds of items.
DICE_TURN = [
    Call(
        "import random\n\nsums = [random.randint(1, 6) + random.randint(1, 6) for _ in range(10000)]\n"
        "min(sums), max(sums), sum(sums)\n"
    ),
    Call(
        "import csv\nwith open('/mnt/data/sums.csv', 'w', newline='') as f:\n"
        "    csv.writer(f).writerows([[s] for s in sums])\nlen(sums)\n"
    ),
    Call("sums[:5]\n"),
    Text("I rolled two dice 10,000 times.\n\n[Download the sums](sandbox:/mnt/data/sums.csv)"),
]
PLOT_TURN = [
    Call(
        "import numpy as np\nimport matplotlib.pyplot as plt\n\nx = np.linspace(-5, 5, 101)\n"
        "fig, ax = plt.subplots()\nax.plot(x, x**2)\nout_path = '/mnt/data/parabola.png'\n"
        "fig.savefig(out_path)\nout_path"
    ),
    Text("Here is the chart.\nDownload: [the chart](sandbox:/mnt/data/parabola.png)"),
]


# -- shapes: the scripted stream against the recordings ------------------------------------------


@needs_recordings
@pytest.mark.parametrize(
    ("recording", "turn"), [(VERCEL_CHUNKS, DICE_TURN), (PYDANTIC_IMAGE_STREAM, PLOT_TURN)]
)
def test_scripted_stream_has_the_recorded_keys_for_every_event_type(openai_server, recording, turn):
    path = FIXTURES_DIR / recording
    recorded = [event.json for event in load_stream(path)]
    request: dict[str, Any] = {"model": "gpt-5", "input": "Run it", "include": OUTPUTS}
    if path.suffix == ".yaml":  # the cassette holds the real request: same include list, tool_choice
        request = {**load_cassette(path)[0].request, "stream": True}
    openai_server.responder = Scripted([turn], reasoning="first" if path.suffix == ".yaml" else "each")
    ours = [
        event.json for event in stream_raw(openai_server, {**request, "tools": code_tool({"type": "auto"})})
    ]

    expected, actual = paths_by_group(recorded), paths_by_group(ours)
    assert set(actual) == set(expected)
    for group, paths in expected.items():
        assert actual[group] == paths, (
            f"{group}: missing {paths - actual[group]}, extra {actual[group] - paths}"
        )
    assert sdk_problems(ours) <= sdk_problems(recorded)
    assert [event["sequence_number"] for event in ours] == list(range(len(ours)))


@needs_recordings
def test_obfuscation_pads_each_delta_to_sixteen_characters_like_the_recordings(openai_server):
    openai_server.responder = Scripted([DICE_TURN])
    ours = [
        e.json
        for e in stream_raw(
            openai_server,
            {"model": "gpt-5", "input": "x", "include": OUTPUTS, "tools": code_tool({"type": "auto"})},
        )
    ]
    recorded = [e.json for e in load_stream(FIXTURES_DIR / VERCEL_CHUNKS)]

    def padded_lengths(events: list[dict[str, Any]]) -> set[int]:
        return {len(e["delta"]) + len(e["obfuscation"]) for e in events if "obfuscation" in e}

    assert padded_lengths(ours) == padded_lengths(recorded)


@needs_recordings
def test_non_streamed_response_has_the_recorded_keys(openai_server, client):
    openai_server.responder = Scripted([DICE_TURN])
    recorded = load_response(FIXTURES_DIR / VERCEL_RESPONSE)
    raw = client.responses.with_raw_response.create(
        model="gpt-5-nano", input="Roll two dice", include=OUTPUTS, tools=code_tool({"type": "auto"})
    )
    ours = json.loads(raw.text)
    assert key_paths(ours) == key_paths(recorded)
    assert list(ours) == list(recorded)  # key order too, though clients must not rely on it


# -- replay of genuine recordings ---------------------------------------------------------------


@needs_recordings
@pytest.mark.parametrize("recording", [VERCEL_CHUNKS, PYDANTIC_IMAGE_STREAM])
def test_replay_streams_the_recorded_events_into_typed_sdk_events(openai_server, client, recording):
    recorded = load_stream(FIXTURES_DIR / recording)
    openai_server.responder = Replay(recording)
    container = client.containers.create(name="replay")
    first = client.responses.create(model="gpt-5", input="first", tools=code_tool(container.id))

    events = list(
        client.responses.create(
            model="gpt-5",
            input="again",
            previous_response_id=first.id,
            tools=code_tool(container.id),
            stream=True,
        )
    )

    assert [e.type for e in events] == [e.type for e in recorded]
    assert [e.sequence_number for e in events] == [e.json["sequence_number"] for e in recorded]
    assert all(type(event) is EVENT_CLASSES[event.type] for event in events)
    assert sdk_problems(event.to_dict() for event in events) <= sdk_problems(e.json for e in recorded)
    completed = events[-1].response
    assert completed.id.startswith("resp_") and completed.id not in (
        first.id,
        recorded[0].json["response"]["id"],
    )
    assert completed.previous_response_id == first.id
    assert {item.container_id for item in completed.output if item.type == "code_interpreter_call"} == {
        container.id
    }
    deltas = [(e.delta, e.obfuscation) for e in events if e.type == "response.output_text.delta"]
    assert deltas == [
        (e.json["delta"], e.json["obfuscation"]) for e in recorded if e.type == "response.output_text.delta"
    ]


@needs_recordings
@pytest.mark.parametrize("recording", [VERCEL_CHUNKS, PYDANTIC_IMAGE_STREAM])
def test_replay_is_byte_faithful_apart_from_ids(openai_server, recording):
    recorded = load_stream(FIXTURES_DIR / recording)
    openai_server.responder = Replay(recording)
    sent = stream_raw(openai_server, {"model": "gpt-5", "input": "hi", "tools": code_tool({"type": "auto"})})

    response_id = sent[0].json["response"]["id"]
    container_id = next(
        e.json["item"]["container_id"] for e in sent if e.json.get("item", {}).get("container_id")
    )
    old_response = recorded[0].json["response"]["id"]
    for ours, theirs in zip(sent, recorded, strict=True):
        expected = re.sub(r"cntr_[0-9a-f]+", container_id, theirs.data.replace(old_response, response_id))
        assert ours.data == expected


@needs_recordings
def test_replayed_citations_are_downloadable_with_the_recorded_image(openai_server, client):
    recorded = [e.json for e in load_stream(FIXTURES_DIR / PYDANTIC_IMAGE_STREAM)]
    image_url = next(
        o["url"]
        for e in recorded
        if e["type"] == "response.output_item.done"
        for o in e["item"].get("outputs") or []
        if o["type"] == "image"
    )
    openai_server.responder = Replay(PYDANTIC_IMAGE_STREAM)

    response = client.responses.create(model="gpt-5", input="chart", tools=code_tool({"type": "auto"}))

    annotations = response.output[-1].content[0].annotations
    assert (annotations[0].start_index, annotations[0].end_index) == (0, 0)
    for annotation in annotations:
        data = client.containers.files.content.retrieve(
            annotation.file_id, container_id=annotation.container_id
        ).read()
        assert data == base64.b64decode(image_url.split(",", 1)[1])


@needs_recordings
def test_replayed_csv_citation_is_a_valid_csv(openai_server, client):
    openai_server.responder = Replay(VERCEL_CHUNKS)
    response = client.responses.create(model="gpt-5", input="dice", tools=code_tool({"type": "auto"}))
    [annotation] = response.output[-1].content[0].annotations
    text = response.output[-1].content[0].text
    assert text[annotation.start_index : annotation.end_index] == f"sandbox:/mnt/data/{annotation.filename}"
    data = client.containers.files.content.retrieve(
        annotation.file_id, container_id=annotation.container_id
    ).read()
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert len(rows) > 1 and all(len(row) == len(rows[0]) for row in rows)


@needs_recordings
def test_non_streamed_recording_replays_as_a_stream_and_as_json(openai_server, client):
    recorded = load_response(FIXTURES_DIR / VERCEL_RESPONSE)
    openai_server.responder = Replay(VERCEL_RESPONSE)
    container = client.containers.create(name="replay-json")

    plain = client.responses.create(model="gpt-5", input="x", tools=code_tool(container.id))
    events = list(
        client.responses.create(model="gpt-5", input="x", tools=code_tool(container.id), stream=True)
    )

    assert [item.id for item in plain.output] == [item["id"] for item in recorded["output"]]
    assert events[-1].response.output[-1].content[0].text == recorded["output"][-1]["content"][0]["text"]
    codes = "".join(e.delta for e in events if e.type == "response.code_interpreter_call_code.delta")
    assert codes == "".join(i["code"] for i in recorded["output"] if i["type"] == "code_interpreter_call")


# -- containers and container files ---------------------------------------------------------------


@needs_recordings
def test_container_and_file_objects_have_the_recorded_shapes(openai_server, client, tmp_path):
    create, delete = load_dotnet(FIXTURES_DIR / DOTNET_CREATE_CONTAINER)
    upload, retrieve, content, delete_file = load_dotnet(FIXTURES_DIR / DOTNET_FILE_CRUD)

    created = client.containers.with_raw_response.create(**create.request_body)
    container = json.loads(created.text)
    assert key_paths(container) == key_paths(create.body)
    assert {
        k: container[k]
        for k in ("object", "status", "expires_after", "memory_limit", "name", "network_policy")
    } == {
        k: create.body[k]
        for k in ("object", "status", "expires_after", "memory_limit", "name", "network_policy")
    }
    assert re.fullmatch(r"cntr_[0-9a-f]{48}", container["id"])

    source = tmp_path / "test-get-file.txt"
    source.write_bytes(content.body.encode())
    with source.open("rb") as handle:
        uploaded = json.loads(
            client.containers.files.with_raw_response.create(container["id"], file=handle).text
        )
    assert key_paths(uploaded) == key_paths(upload.body)
    assert (uploaded["bytes"], uploaded["source"]) == (len(content.body), "user")
    # OpenAI prefixes an upload's name with 32 hex digits; the record shows it, so do we.
    upload_path = re.compile(r"/mnt/data/[0-9a-f]{32}-test-get-file\.txt")
    assert upload_path.fullmatch(upload.body["path"]) and upload_path.fullmatch(uploaded["path"])
    fetched = json.loads(
        client.containers.files.with_raw_response.retrieve(uploaded["id"], container_id=container["id"]).text
    )
    assert fetched == uploaded and key_paths(fetched) == key_paths(retrieve.body)

    raw = client.containers.files.content.with_raw_response.retrieve(
        uploaded["id"], container_id=container["id"]
    )
    assert raw.content == content.body.encode()
    assert raw.headers["content-type"] == content.headers["Content-Type"]
    ours = [p.split("=")[0] for p in raw.headers["content-disposition"].split("; ")]
    assert ours == [p.split("=")[0] for p in content.headers["Content-Disposition"].split("; ")]
    stored_name = re.compile(r".*''[0-9a-f]{32}-test-get-file\.txt")
    assert stored_name.fullmatch(raw.headers["content-disposition"])
    assert stored_name.fullmatch(content.headers["Content-Disposition"])

    deleted = client.containers.files.with_raw_response.delete(uploaded["id"], container_id=container["id"])
    assert key_paths(json.loads(deleted.text or "{}")) == key_paths(delete_file.body)
    gone = json.loads(client.containers.with_raw_response.delete(container["id"]).text or "{}")
    assert key_paths(gone) == key_paths(delete.body) and gone["object"] == delete.body["object"]


@needs_recordings
def test_list_pages_have_the_recorded_shape(openai_server, client):
    recorded_containers = load_dotnet(FIXTURES_DIR / DOTNET_LIST_CONTAINERS)[0].body
    recorded_files = load_dotnet(FIXTURES_DIR / DOTNET_CONTAINER_FILES)[0].body
    container = client.containers.create(name="listing")
    client.containers.files.create(container.id, file=("a.txt", b"a"))

    page = json.loads(client.containers.with_raw_response.list(limit=5, order="asc").text)
    files = json.loads(
        client.containers.files.with_raw_response.list(container.id, limit=5, order="asc").text
    )

    assert list(page) == list(recorded_containers) and list(files) == list(recorded_files)
    assert key_paths(page["data"][0]) >= key_paths(
        recorded_containers["data"][0]
    )  # older records lack two fields
    assert key_paths(files["data"][0]) == key_paths(recorded_files["data"][0])


def test_container_files_round_trip_through_the_sdk(openai_server, client, tmp_path):
    container = client.containers.create(
        name="files", expires_after={"anchor": "last_active_at", "minutes": 5}
    )
    report = tmp_path / "report.csv"
    report.write_text("a,b\n1,2\n")

    uploaded = client.containers.files.create(container.id, file=report)
    listed = list(client.containers.files.list(container.id))
    content = client.containers.files.content.retrieve(uploaded.id, container_id=container.id).read()

    assert [(f.id, f.path, f.bytes, f.source) for f in listed] == [(uploaded.id, uploaded.path, 8, "user")]
    assert re.fullmatch(r"/mnt/data/[0-9a-f]{32}-report\.csv", uploaded.path)
    assert content == b"a,b\n1,2\n"
    backend_id = openai_server.backend_container(container.id).id
    on_backend = openai_server.run_on_backend(openai_server.backend.list_files(backend_id))
    assert [(f.path, f.bytes) for f in on_backend] == [(uploaded.path, 8)]
    client.containers.files.delete(uploaded.id, container_id=container.id)
    assert list(client.containers.files.list(container.id)) == []
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.containers.files.retrieve(uploaded.id, container_id=container.id)


def test_container_list_paginates_in_creation_order(openai_server, client):
    created = [client.containers.create(name=f"c{n}").id for n in range(5)]

    first = client.containers.list(limit=2, order="asc")
    everything = [c.id for c in client.containers.list(limit=2, order="asc")]  # the SDK follows has_more
    newest_first = [c.id for c in client.containers.list(order="desc")]

    assert [c.id for c in first.data] == created[:2] and first.has_more
    assert everything == created
    assert newest_first == created[::-1]
    assert [r.query.get("after") for r in openai_server.requests_to("/containers", "GET")][-4:-1] == [
        None,
        [created[1]],
        [created[3]],
    ]


def test_container_expires_after_idle_minutes_and_loses_its_files(openai_server, client):
    openai_server.clock.freeze()  # 59 s means 59 s, not 59 s plus the time the requests take
    container = client.containers.create(
        name="short", expires_after={"anchor": "last_active_at", "minutes": 1}
    )
    client.containers.files.create(container.id, file=("keep.txt", b"x"))
    backend_id = openai_server.backend_container(container.id).id

    openai_server.advance_clock(59)
    assert client.containers.retrieve(container.id).status == "running"
    openai_server.advance_clock(2)
    assert client.containers.retrieve(container.id).status == "expired"
    assert openai_server.run_on_backend(openai_server.backend.get_container(backend_id)) is None
    with pytest.raises(openai.BadRequestError, match=r"Container is expired\."):
        client.responses.create(model="gpt-5", input="hi", tools=code_tool(container.id))


def test_using_a_container_keeps_it_alive_and_expire_forces_it(openai_server, client):
    container = client.containers.create(
        name="busy", expires_after={"anchor": "last_active_at", "minutes": 1}
    )
    openai_server.advance_clock(50)
    client.containers.files.create(container.id, file=("a.txt", b"a"))  # touches last_active_at
    openai_server.advance_clock(50)
    assert client.containers.retrieve(container.id).status == "running"

    openai_server.expire(container.id)
    assert client.containers.retrieve(container.id).status == "expired"
    with pytest.raises(openai.BadRequestError, match="Container is expired"):
        client.containers.files.list(container.id)


def test_auto_container_follows_previous_response_and_reports_its_expiry(openai_server, client):
    openai_server.responder = Scripted([[Call("x = 1"), Text("ok")]] * 3)
    first = client.responses.create(model="gpt-5", input="a", tools=code_tool({"type": "auto"}))
    second = client.responses.create(
        model="gpt-5", input="b", previous_response_id=first.id, tools=code_tool({"type": "auto"})
    )
    assert first.output[1].container_id == second.output[1].container_id

    openai_server.expire(first.output[1].container_id)
    with pytest.raises(openai.BadRequestError, match=r"Container is expired\."):
        client.responses.create(
            model="gpt-5", input="c", previous_response_id=second.id, tools=code_tool({"type": "auto"})
        )


# -- the scripted model really executes ------------------------------------------------------------


def test_variables_persist_between_calls_and_turns(openai_server, client):
    openai_server.responder = Scripted(
        [[Call("x = 41"), Text("Set x.")], [Call("print(x + 1)"), Text("Printed.")]]
    )
    container = client.containers.create(name="state")

    first = client.responses.create(
        model="gpt-5", input="set", tools=code_tool(container.id), include=OUTPUTS
    )
    second = client.responses.create(
        model="gpt-5",
        input="use",
        tools=code_tool(container.id),
        include=OUTPUTS,
        previous_response_id=first.id,
    )

    assert first.output[1].outputs == []
    assert second.output[1].outputs[0].logs == "42\n"


def test_outputs_are_null_unless_the_request_includes_them(openai_server, client):
    openai_server.responder = Scripted([[Call("print('hi')"), Text("ok")]])
    response = client.responses.create(model="gpt-5", input="x", tools=code_tool({"type": "auto"}))
    assert response.output[1].outputs is None and response.output[1].status == "completed"


def test_a_shown_plot_is_an_image_output_and_a_zero_length_citation(openai_server, client):
    openai_server.responder = Scripted(
        [
            [
                Call(
                    "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()\n"
                    "import pandas as pd\n"
                    "pd.DataFrame({'n': [1, 2, 3]}).to_csv('/mnt/data/table.csv', index=False)"
                ),
                Text("Plotted. [table](sandbox:/mnt/data/table.csv)"),
            ]
        ]
    )

    events = list(
        client.responses.create(
            model="gpt-5", input="plot", tools=code_tool({"type": "auto"}), include=OUTPUTS, stream=True
        )
    )

    call = next(
        e.item
        for e in events
        if e.type == "response.output_item.done" and e.item.type == "code_interpreter_call"
    )
    [image] = call.outputs
    png = base64.b64decode(image.url.removeprefix("data:image/png;base64,"))
    assert image.type == "image" and png.startswith(b"\x89PNG\r\n\x1a\n")
    figure, table = [e.annotation for e in events if e.type == "response.output_text.annotation.added"]
    assert (figure.start_index, figure.end_index) == (0, 0)
    assert figure.filename == f"{figure.file_id}.png"
    text = "Plotted. [table](sandbox:/mnt/data/table.csv)"
    assert text[table.start_index : table.end_index] == "sandbox:/mnt/data/table.csv"
    files = client.containers.files
    assert files.content.retrieve(figure.file_id, container_id=call.container_id).read() == png
    assert files.content.retrieve(table.file_id, container_id=call.container_id).read() == b"n\n1\n2\n3\n"
    listed = {f.path: (f.source, f.bytes) for f in files.list(call.container_id)}
    assert listed["/mnt/data/table.csv"] == ("assistant", None)


def test_errors_and_trailing_expressions_are_logged_like_a_notebook(openai_server, client):
    openai_server.responder = Scripted(
        [[Call("print('before')\n1 / 0"), Call("'/mnt/data/x' + '.png'"), Text("ok")]]
    )
    response = client.responses.create(
        model="gpt-5", input="x", include=OUTPUTS, tools=code_tool({"type": "auto"})
    )
    failing, expression = [item for item in response.output if item.type == "code_interpreter_call"]
    assert failing.outputs[0].logs.startswith("before\n") and "Traceback" in failing.outputs[0].logs
    assert failing.outputs[0].logs.rstrip().endswith("ZeroDivisionError: division by zero")
    assert expression.outputs[0].logs == "'/mnt/data/x.png'\n"


@needs_sandbox
def test_a_call_that_runs_too_long_is_interrupted_and_the_process_lives_on():
    turns = [[Call("n = 7\nimport time\ntime.sleep(30)"), Text("slow")], [Call("print(n)"), Text("fast")]]
    with OpenAIServer(Scripted(turns), exec_timeout=1.0) as server, client_for(server) as client:
        container = client.containers.create(name="slow")
        started = time.monotonic()
        slow = client.responses.create(
            model="gpt-5", input="a", tools=code_tool(container.id), include=OUTPUTS
        )
        fast = client.responses.create(
            model="gpt-5", input="b", tools=code_tool(container.id), include=OUTPUTS
        )
        took = time.monotonic() - started  # not counting the server's shutdown
    # The code sleeps 30 s: both turns well within that means it was stopped, with room for a cold
    # sandbox kernel to start on a busy machine (the first turn starts it).
    assert took < 20, took
    assert "stopped after 1 s" in slow.output[1].outputs[0].logs
    assert fast.output[1].outputs[0].logs == "7\n"


def test_deleting_a_container_deletes_its_backend_container(openai_server, client):
    openai_server.responder = Scripted([[Call("x = 1"), Text("set")]])
    container = client.containers.create(name="doomed")
    assert openai_server.backend_container(container.id) is None, "started lazily, on first use"
    client.responses.create(model="gpt-5", input="x", tools=code_tool(container.id))
    backend_id = openai_server.backend_container(container.id).id

    client.containers.delete(container.id)

    assert openai_server.run_on_backend(openai_server.backend.get_container(backend_id)) is None
    with pytest.raises(openai.NotFoundError, match=f"Container with id '{container.id}' not found"):
        client.containers.retrieve(container.id)


@needs_sandbox
def test_the_server_serves_any_backend_even_another_openai_server(openai_server, tmp_path):
    """The seam ARCHITECTURE.md keeps: containers, files and code on any Backend. Here the backend is
    ci-magic's openai backend, talking to a second server (whose containers are local sandboxes)."""
    from ci_magic.backends.openai_backend import OpenAIBackend

    upstream = openai.AsyncOpenAI(base_url=openai_server.url, api_key="test")
    model = Scripted(
        lambda request: [Call(f"print(len(open({request['input']!r}).read().split()))"), Text("")]
    )
    with OpenAIServer(model, backend=OpenAIBackend(upstream)) as proxy, client_for(proxy) as client:
        container = client.containers.create(name="proxied")
        uploaded = client.containers.files.create(container.id, file=("rows.txt", b"a\nb\nc\n"))
        response = client.responses.create(
            model="gpt-5", input=uploaded.path, tools=code_tool(container.id), include=OUTPUTS
        )
        content = client.containers.files.content.retrieve(uploaded.id, container_id=container.id).read()

    assert response.output[1].outputs[0].logs == "3\n"
    assert content == b"a\nb\nc\n"
    upstream_calls = openai_server.requests_to("/responses", "POST")
    assert len(upstream_calls) == 1 and "print(len(open(" in json.dumps(upstream_calls[0].json)
    assert openai_server.requests_to("/containers", "POST")[0].json["name"] == "proxied"


def test_forced_tool_choice_runs_exactly_the_fenced_code(openai_server, client):
    prompt = "Run this code exactly:\n```python\nvalues = [6, 7]\nprint(values[0] * values[1])\n```"
    response = client.responses.create(
        model="gpt-5",
        input=prompt,
        tools=code_tool({"type": "auto"}),
        tool_choice={"type": "code_interpreter"},
        include=OUTPUTS,
    )
    [call] = [item for item in response.output if item.type == "code_interpreter_call"]
    assert call.code == "values = [6, 7]\nprint(values[0] * values[1])\n"
    assert call.outputs[0].logs == "42\n"


def test_quickstart_builds_plots_and_saves_the_squares(openai_server, client):
    prompt = "Load the numbers 1..100, plot their squares and save the table as squares.csv"
    response = client.responses.create(
        model="gpt-5", input=prompt, tools=code_tool({"type": "auto"}), include=OUTPUTS
    )

    calls = [item for item in response.output if item.type == "code_interpreter_call"]
    assert len(calls) == 2
    assert "square" in calls[0].outputs[0].logs and calls[1].outputs[0].type == "image"
    link = response.output[-1].content[0].annotations[-1]
    data = client.containers.files.content.retrieve(link.file_id, container_id=link.container_id).read()
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert rows[0] == ["n", "square"] and rows[-1] == ["100", "10000"]


def test_quickstart_summarises_a_pushed_parquet_file(openai_server, client, tmp_path):
    import pandas as pd

    path = tmp_path / "sales.parquet"
    pd.DataFrame({"units": [3, 5, 8], "region": ["n", "s", "e"]}).to_parquet(path)
    container = client.containers.create(name="data")
    uploaded = client.containers.files.create(container.id, file=path)

    response = client.responses.create(
        model="gpt-5",
        input=f"Describe {uploaded.path} please",
        tools=code_tool(container.id),
        include=OUTPUTS,
    )

    first = next(item for item in response.output if item.type == "code_interpreter_call")
    assert first.outputs[0].logs.startswith("(3, 2)\n")
    [*_, summary] = response.output[-1].content[0].annotations
    assert summary.filename == "sales_summary.csv"


# -- errors, faults, knobs -------------------------------------------------------------------------


def test_rate_limit_then_success_is_retried_by_the_sdk(openai_server):
    openai_server.responder = Scripted([[Text("Hello.")]])
    openai_server.fail_next("/responses", 429, retry_after=0.01)
    with client_for(openai_server, max_retries=2) as client:
        response = client.responses.create(model="gpt-5", input="hi")

    attempts = openai_server.requests_to("/responses", "POST")
    assert [r.status for r in attempts] == [429, 200]
    assert attempts[1].headers.get("x-stainless-retry-count") == "1"
    assert response.output_text == "Hello."


def test_server_errors_exhaust_retries_with_the_openai_error_shape(openai_server):
    openai_server.fail_next("/containers", 503, times=3, retry_after=0.01)
    with (
        client_for(openai_server, max_retries=2) as client,
        pytest.raises(openai.InternalServerError) as raised,
    ):
        client.containers.create(name="x")
    assert raised.value.status_code == 503 and set(raised.value.body) == {"message", "type", "param", "code"}
    assert len(openai_server.requests_to("/containers", "POST")) == 3


def test_a_cut_stream_raises_in_the_sdk(openai_server, client):
    openai_server.responder = Scripted([[Text("This answer never finishes streaming.")]])
    openai_server.cut_stream_after(4)
    stream = client.responses.create(model="gpt-5", input="hi", stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for event in stream:
            received.append(event.type)
    assert len(received) == 4 and "response.completed" not in received


def test_event_delay_spaces_out_streamed_events(openai_server, client):
    openai_server.responder = Scripted([[Text("abcdefghijklmnopqrstuvwxyz")]], reasoning="none")
    openai_server.event_delay = 0.02
    stamps = [time.monotonic() for _ in client.responses.create(model="gpt-5", input="x", stream=True)]
    assert stamps[-1] - stamps[0] >= 0.02 * (len(stamps) - 1) * 0.9


def test_requests_without_a_key_get_401_in_the_openai_error_shape(openai_server):
    status, _, body = raw_request(openai_server, "GET", "/v1/models")
    error = json.loads(body)["error"]
    assert status == 401 and set(error) == {"message", "type", "param", "code"}
    assert "didn't provide an API key" in error["message"]


def test_unknown_models_are_404_once_an_allow_list_is_set(openai_server, client):
    openai_server.require_model("gpt-5-mini")
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="gpt-9", input="hi")
    assert raised.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == ["gpt-5-mini"]


def test_malformed_json_is_a_400(openai_server):
    status, _, body = raw_request(
        openai_server,
        "POST",
        "/v1/responses",
        b"{not json",
        {"Authorization": "Bearer t", "Content-Type": "application/json"},
    )
    assert status == 400 and "could not parse the JSON body" in json.loads(body)["error"]["message"]
    recorded = openai_server.requests_to("/responses")[-1]
    assert (recorded.method, recorded.status, recorded.json) == ("POST", 400, None)


def test_unknown_previous_response_is_a_400(openai_server, client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="gpt-5", input="x", previous_response_id="resp_nope")
    assert raised.value.code == "previous_response_not_found"


@needs_sandbox
def test_the_cli_serves_the_quickstart_scenario_until_terminated():
    command = [sys.executable, "-m", "tests.servers.openai_server", "--port", "0", "--scenario", "quickstart"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            match = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+/v1)\n", process.stdout.readline())
            assert match
            with OpenAI(base_url=match.group(1), api_key="test") as client:
                response = client.responses.create(
                    model="gpt-5", input="What files are there?", tools=code_tool({"type": "auto"})
                )
            assert response.status == "completed" and "/mnt/data" in response.output_text
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0


def test_the_async_client_streams_two_containers_at_once(openai_server):
    import asyncio

    openai_server.responder = Scripted(lambda request: [Call(f"print({request['input']!r})"), Text("ok")])

    async def run(client: openai.AsyncOpenAI, word: str) -> str:
        stream = await client.responses.create(
            model="gpt-5", input=word, include=OUTPUTS, stream=True, tools=code_tool({"type": "auto"})
        )
        async for event in stream:
            if event.type == "response.completed":
                return event.response.output[1].outputs[0].logs
        raise AssertionError("no response.completed")

    async def both() -> list[str]:
        async with openai.AsyncOpenAI(base_url=openai_server.url, api_key="test") as client:
            return await asyncio.gather(run(client, "left"), run(client, "right"))

    assert asyncio.run(both()) == ["left\n", "right\n"]
