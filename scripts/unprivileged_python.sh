#!/usr/bin/env bash
# As root: print an interpreter the user `nobody` can run with ci-magic importable, so the local
# sandbox's isolation tests also run unprivileged. The project's .venv usually sits on a Python
# under /root (pyenv), which nobody cannot read; Debian's /usr/bin/python3 of the same minor
# version, pointed at .venv's packages, can. Prints nothing where that is not possible.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = "0" ] && [ -x /usr/bin/python3 ] || exit 0
version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
[ "$(version /usr/bin/python3)" = "$(version .venv/bin/python)" ] || exit 0
target=$(mktemp -d /tmp/ci-magic-unprivileged.XXXXXX)
/usr/bin/python3 -m venv --without-pip "$target" >/dev/null 2>&1 || exit 0
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ours=$("$target/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$PWD" "$purelib" > "$ours/ci-magic-packages.pth"
chmod -R a+rX "$target"
echo "$target/bin/python"
