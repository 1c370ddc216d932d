#!/usr/bin/env bash
# The main job on the embedded file:// store, twice: the first run trains from scratch and its
# checkpoints are stored; the second restores the latest one and resumes from it.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .

demo=$PWD/.demo
rm -rf "$demo"
export XDG_DATA_HOME=$demo/data  # the embedded default store lands in $XDG_DATA_HOME/ckptd/store
export CKPTD_LOG_FORMAT=console
run() {
  .venv/bin/ckptd run --config examples/demo.yaml --job-id "$1" \
    --checkpoint-dir "$demo/$1/checkpoints" --restore-dir "$demo/$1/loaded" --metrics-addr 127.0.0.1:0 \
    -- .venv/bin/python examples/train.py
}

echo "== job run-1: trains from scratch"
run run-1
echo
echo "== job run-2: restores the latest checkpoint of project 'demo' and resumes"
run run-2
echo
echo "== what was stored (every checkpoint, though training kept only two on disk)"
(cd "$XDG_DATA_HOME/ckptd/store" && find training_projects -type f | sort)
