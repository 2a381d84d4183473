#!/usr/bin/env bash
# Installs ci-magic into ./.venv and runs notebooks/quickstart.ipynb headless.
# By default the notebook talks to the bundled OpenAI-compatible test server (no key, no network);
# pass --use-env to run it against whatever OPENAI_API_KEY / OPENAI_BASE_URL / CI_MAGIC_* say.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python scripts/run_quickstart.py "$@"
