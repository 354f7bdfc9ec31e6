#!/usr/bin/env bash
# Install the pinned dependency closure (requirements.lock, nothing floating) into a
# new virtual environment at DEST. This is the one install path of the project:
# scripts/bootstrap.sh builds the cached venv of the README's commands (and so CI's)
# with it, and the Dockerfile builds the image's /opt/venv with it, so the tested
# environment and the container's cannot drift apart.
#
#   PYTHON=python3.11 scripts/install-deps.sh DEST
#
# DEST must not exist yet (or be an empty folder). The project itself is installed
# afterwards, with --no-deps: editable by bootstrap.sh, as a wheel by the Dockerfile.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: [PYTHON=python3.11] $0 DEST" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$1
py=${PYTHON:-python3}
"$py" -m venv "$dest"
"$dest/bin/python" -m pip install -q --disable-pip-version-check "pip==26.3"
"$dest/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.lock"
