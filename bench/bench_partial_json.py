"""Issue 13 item 7: ``partial_json.CodeArgumentDecoder`` against jiter's partial mode, on real streams.

jiter (installed with openai) parses incomplete JSON (``partial_mode="trailing-strings"``), so a
decoder can re-parse the whole argument text at each fragment and show what the ``code`` string
grew by. Measured here on the tool-call argument streams recorded from llama-server and
llama-cpp-python (``../shared/fixtures/chat/``), on a 10 KB code split the way models stream it,
and on a raw newline inside the string (small local models send those; ``json.loads(strict=False)``
takes them): time per stream (best of N) and whether the streamed code equals the final code.

Run: python bench/bench_partial_json.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jiter

from ci_magic.backends.local.partial_json import CodeArgumentDecoder

FIXTURES = REPO.parent / "shared" / "fixtures" / "chat"


class JiterDecoder:
    """The same job with jiter's partial mode: re-parse the whole text, emit what the code grew by."""

    def __init__(self) -> None:
        self.text = ""
        self.shown = ""

    def feed(self, fragment: str) -> str:
        self.text += fragment
        stripped = self.text.lstrip()
        if not stripped:
            return ""
        if stripped[0] not in '{"':
            new = self.text[len(self.shown) :]
            self.shown = self.text
            return new
        try:
            value = jiter.from_json(self.text.encode(), partial_mode="trailing-strings")
        except ValueError:
            return ""  # a raw control character or a lone surrogate: nothing until the end
        code = value if isinstance(value, str) else value.get("code", "") if isinstance(value, dict) else ""
        if not isinstance(code, str) or not code.startswith(self.shown):
            return ""
        new = code[len(self.shown) :]
        self.shown = code
        return new


def fragments(name: str) -> list[str]:
    out = []
    for line in (FIXTURES / f"{name}.response.txt").read_text().splitlines():
        if line.startswith("data: ") and "[DONE]" not in line:
            for choice in json.loads(line[6:])["choices"]:
                for call in choice["delta"].get("tool_calls") or []:
                    if call["function"].get("arguments"):
                        out.append(call["function"]["arguments"])
    return out


def run(make: Callable[[], Any], frags: list[str], repeat: int) -> tuple[str, float]:
    best = float("inf")
    shown = ""
    for _ in range(repeat):
        started = time.perf_counter()
        decoder = make()
        shown = "".join(decoder.feed(fragment) for fragment in frags)
        best = min(best, time.perf_counter() - started)
    return shown, best


def main() -> int:
    if not FIXTURES.is_dir():
        print(f"skipped: {FIXTURES} (the recordings) is absent")
        return 0
    code = (REPO / "ci_magic" / "backends" / "local" / "text_calls.py").read_text()  # real Python, quotes
    text = json.dumps({"code": code})
    rng = random.Random(1)
    split, start = [], 0
    while start < len(text):
        size = rng.randint(1, 6)
        split.append(text[start : start + size])
        start += size
    streams = {
        name: fragments(name)
        for name in ("ls-smol-qwen25tpl-t0-copy-new-2", "lcp-gemma-chatmlfc-namedfirst-nullfix-3")
    }
    streams[f"{len(code)}-character code in {len(split)} fragments"] = split
    streams["a raw newline inside the string"] = ['{"code": "a = 1', "\n", 'print(a)"}']
    for name, frags in streams.items():
        expected = json.loads("".join(frags), strict=False)["code"]
        ours, ours_s = run(CodeArgumentDecoder, frags, 20)
        theirs, jiter_s = run(JiterDecoder, frags, 3 if len(frags) > 100 else 20)
        print(
            f"{name}: {len(frags)} fragments | partial_json {ours_s * 1e3:.3f} ms, streams exactly: "
            f"{ours == expected} | jiter {jiter_s * 1e3:.3f} ms, streams exactly: {theirs == expected} | "
            f"jiter/partial_json {jiter_s / ours_s:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
