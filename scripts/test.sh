#!/usr/bin/env bash
# The test command (README): install the pinned CPU environment, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
black --check -q .
flake8 .
python -m pytest tests -q "$@"
