#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
