#!/usr/bin/env bash
# Make ./.venv ready on any machine: the pinned dependencies live in a cached venv
# outside the checkout (keyed by the lock file's hash, built from nothing when
# absent), and ./.venv is a thin per-checkout overlay that adds them to sys.path and
# holds the editable install of this project. Prints the overlay's python.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SPACENET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spacenet-stream}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
"$py" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "bootstrap: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 2; }
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key=$( (cat "$root/requirements.lock" "$root/scripts/install-deps.sh"; echo "$pyver") | sha256sum | cut -c1-16)
deps=$cache/venv-$key
mkdir -p "$cache"

exec 9>"$cache/.bootstrap.lock"
flock 9
if [ ! -f "$deps/.complete" ]; then
  echo "bootstrap: building the dependency venv $deps (first run on this machine: several minutes)" >&2
  rm -rf "$deps"
  # The same script builds the Docker image's environment (see the Dockerfile).
  PYTHON="$py" "$root/scripts/install-deps.sh" "$deps"
  touch "$deps/.complete"
fi
flock -u 9

venv=$root/.venv
site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.deps" 2>/dev/null)" != "$deps" ]; then
  rm -rf "$venv"
  "$py" -m venv --without-pip "$venv"
  vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  case "$vsite" in
    "$venv"/*) ;;
    *) echo "bootstrap: $venv/bin/python is not a venv (site-packages $vsite); refusing to write there" >&2; exit 2 ;;
  esac
  # addsitedir (not a bare path) so the cached site-packages' own .pth files run too.
  echo "import site; site.addsitedir('$site')" > "$vsite/_spacenet_deps.pth"
  ln -sf "$deps/bin/ruff" "$venv/bin/ruff"
  echo "$deps" > "$venv/.deps"
fi
if ! "$venv/bin/python" -c 'import spacenet.strategy, spacenet.stream' 2>/dev/null \
   || [ "$root/pyproject.toml" -nt "$venv/.installed" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root"
  touch "$venv/.installed"
fi
echo "$venv/bin/python"
