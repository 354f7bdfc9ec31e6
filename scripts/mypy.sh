#!/usr/bin/env bash
# Type-check the package under its import names (spacenet.strategy, spacenet.stream).
# The checkout's folders are strategy/ and stream/, mapped by the build backend; mypy
# cannot follow setuptools' editable finder, so it reads them through a tiny tree of
# links laid out as the installed package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=$root/.mypy-src
rm -rf "$stage"
mkdir -p "$stage/spacenet"
ln -s ../../strategy "$stage/spacenet/strategy"
ln -s ../../stream "$stage/spacenet/stream"
cd "$root"
MYPYPATH=$stage exec "$root/.venv/bin/python" -m mypy -p spacenet.strategy -p spacenet.stream "$@"
