#!/usr/bin/env bash
# Installs ci-magic with its test tools into ./.venv, plus the Debian packages the tests use
# (bubblewrap for the local sandbox, Chromium + ChromeDriver for the JupyterLab browser test).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES="bubblewrap libseccomp2 util-linux chromium chromium-driver tmux"

if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ]; then
      echo "== apt-get install$missing"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "note: not root; the tests that need$missing will skip (sudo apt-get install$missing)"
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,browser]"
.venv/bin/python -c "import ci_magic, pytest, nbclient"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "== installed: $(.venv/bin/python --version), ci-magic $(.venv/bin/python -c 'import ci_magic; print(ci_magic.__version__)')"
