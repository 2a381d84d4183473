"""Code streams into the cell while the model is still writing the tool call's JSON arguments.

Servers split the arguments anywhere (inside ``\\uXXXX``, between surrogate halves, inside the key),
so these tests split real argument strings at random points, thousands of times, and check that the
streamed characters always form a prefix of the final code and add up to exactly what
``json.loads`` says the code is.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from ci_magic.backends.local.partial_json import CodeArgumentDecoder, ToolArgumentsError

ALPHABET = [
    *"abcdefghijklmnopqrstuvwxyz0123456789 _=()[]{}:,.'+-*/#",
    *['"', "\\", "\n", "\t", "\r", "\b", "\f", "/", "\x00", "\x1f", "\x7f"],
    *["é", "ß", "中", "\u2028", "\ufeff", "😀", "🐍", "𝔘", "\U0010ffff"],
]


def random_code(rng: random.Random) -> str:
    length = rng.choice([0, 1, 2, 5, 20, 80, 300])
    lines = "".join(rng.choice(ALPHABET) for _ in range(length))
    if rng.random() < 0.3:
        lines = 'import pandas as pd\nprint("rows:", len(df))\n' + lines
    return lines


def random_arguments(rng: random.Random, code: str) -> str:
    """The ``{"code": ...}`` object as different models write it."""
    extras: list[tuple[str, object]] = rng.choice(
        [
            [],
            [("language", "python")],
            [("timeout", 30), ("why", 'a "quoted" \\ reason {not: json}')],
            [("options", {"nested": ["a", {"b": "}]"}], "n": -1.5e3}), ("flag", True), ("none", None)],
        ]
    )
    items = list(extras)
    items.insert(rng.randrange(len(items) + 1), ("code", code))
    style = rng.choice(["compact", "spaced", "indented"])
    ensure_ascii = rng.random() < 0.5
    if style == "compact":
        return json.dumps(dict(items), separators=(",", ":"), ensure_ascii=ensure_ascii)
    if style == "spaced":
        return json.dumps(dict(items), ensure_ascii=ensure_ascii)
    return "\n  " + json.dumps(dict(items), indent=rng.choice([1, 4]), ensure_ascii=ensure_ascii) + "\n"


def random_split(rng: random.Random, text: str) -> list[str]:
    if rng.random() < 0.2:
        return list(text)  # one character at a time: every escape is split
    count = min(len(text) - 1, rng.randint(0, 12)) if len(text) > 1 else 0
    bounds = [0, *sorted(rng.sample(range(1, len(text)), count)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(fragments: list[str]) -> tuple[list[str], str]:
    decoder = CodeArgumentDecoder()
    return [decoder.feed(fragment) for fragment in fragments], decoder.finish()


def test_streamed_code_matches_json_loads_for_any_split() -> None:
    rng = random.Random(20240611)
    for _ in range(3000):
        code = random_code(rng)
        arguments = random_arguments(rng, code)
        fragments = random_split(rng, arguments)
        pieces, final = stream(fragments)
        assert final == code == json.loads(arguments)["code"]
        assert "".join(pieces) == code, (arguments, fragments)
        # Nothing is ever shown that the final code then contradicts.
        shown = ""
        for piece in pieces:
            shown += piece
            assert code.startswith(shown)


def test_surrogate_pair_split_between_its_halves_streams_one_character() -> None:
    decoder = CodeArgumentDecoder()
    assert decoder.feed('{"code": "x = \'\\ud83d') == "x = '"
    assert decoder.feed("\\ude") == ""  # the high half is held back until its partner arrives
    assert decoder.feed("00'\"}") == "😀'"
    assert decoder.finish() == "x = '😀'"


def test_lone_surrogates_come_out_as_json_loads_gives_them() -> None:
    for arguments in ['{"code": "a\\ud83db"}', '{"code": "\\ude00"}', '{"code": "\\ud83d\\ud83d\\ude00"}']:
        fragments = list(arguments)
        pieces, final = stream(fragments)
        assert "".join(pieces) == final == json.loads(arguments)["code"]


def test_code_key_written_with_escapes_still_streams() -> None:
    pieces, final = stream(list('{"\\u0063ode": "print(1)"}'))
    assert "".join(pieces) == final == "print(1)"


def test_plain_code_instead_of_json_runs_as_is() -> None:
    # llama.cpp-style servers sometimes hand over the code itself as the arguments string.
    code = "\n import math\nprint(math.pi)\n"
    pieces, final = stream(["\n ", "import ma", "th\nprint(math.pi)\n"])
    assert "".join(pieces) == final == code


def test_bare_json_string_is_the_code() -> None:
    arguments = json.dumps("print('hi')\nx = 1")
    pieces, final = stream(list(arguments))
    assert "".join(pieces) == final == "print('hi')\nx = 1"


def test_raw_newlines_inside_the_string_are_accepted() -> None:
    pieces, final = stream(['{"code": "for i in range(3):\n', '\tprint(i)"}'])
    assert "".join(pieces) == final == "for i in range(3):\n\tprint(i)"


def test_only_the_first_code_key_streams_and_json_loads_picks_the_final_code() -> None:
    decoder = CodeArgumentDecoder()
    assert decoder.feed('{"code": "a", "code": "b"}') == "a"
    assert decoder.finish() == "b"  # CodeDone is authoritative, so the cell shows "b" in the end


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"code": "print(1)', "not valid JSON"),
        ('{"source": "print(1)"}', 'takes one argument, "code"'),
        ('{"code": 42}', 'takes one argument, "code"'),
        ("{}", "got nothing"),
        ("   ", "without code"),
        ("", "without code"),
    ],
)
def test_unusable_arguments_explain_to_the_model_what_to_send(arguments: str, expected: str) -> None:
    decoder = CodeArgumentDecoder()
    decoder.feed(arguments)
    with pytest.raises(ToolArgumentsError) as caught:
        decoder.finish()
    assert expected in str(caught.value)
    assert '{"code": "<python source>"}' in str(caught.value)


def test_text_keeps_the_arguments_exactly_as_received() -> None:
    decoder = CodeArgumentDecoder()
    for fragment in ['{"co', 'de": "\\n', '"}']:
        decoder.feed(fragment)
    assert decoder.text == '{"code": "\\n"}'
