#!/usr/bin/env bash
# The Python SDK's checks, as CI runs them: a fresh virtual environment, `pip install` of this
# package with its test extras (pytest, mypy), mypy --strict on the package, then pytest, whose
# fixture starts real konord processes (built here: cargo build -p konor-node --bins).
# Usage: sdk/python/test.sh [PYTEST ARGS...]. KONOR_PY_VENV picks the venv dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${KONOR_PY_VENV:-$repo/target/python-venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$here[test]"
(cd "$repo" && cargo build --quiet -p konor-node --bins)
"$venv/bin/python" -m mypy --strict "$here/src/konorkestra"
cd "$here"
# Run from outside src/ so the tests import the installed package, as a user's code would.
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
