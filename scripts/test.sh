#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: make .venv, install ckptd with its test extras and
# the Debian tools the tests drive (scripts/setup.sh), then run pytest. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
