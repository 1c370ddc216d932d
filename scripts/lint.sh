#!/usr/bin/env bash
# Lint, format and dependency contracts (pyproject.toml: [tool.ruff], [tool.importlinter]).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
