# Sourced by scripts/demo and scripts/test: make .venv and install the project
# into it, skipping the install when neither the packaging files nor the
# compiled sources changed (a pull that changes the C core rebuilds it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "balloonlab needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
STAMP=.venv/.balloonlab-installed
WANT="$(cat pyproject.toml setup.py guestd/*.c hostd/*.c | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "setup: installing balloonlab into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e ".[test,plots]" >&2
    echo "$WANT" > "$STAMP"
fi
# Bytecode, compiled once here (up-to-date files are skipped): Python still reads it when the
# environment sets PYTHONDONTWRITEBYTECODE, which would otherwise have every launcher, host and
# fork server start compile the project's sources again (~0.1 s of CPU each).
.venv/bin/python -m compileall -q -j 0 balloonlab hostd guestd proto scripts >/dev/null \
    || echo "setup: compileall reported errors (the tests will name them)" >&2
export OPENBLAS_NUM_THREADS=1
VPY="$ROOT/.venv/bin/python"
