#!/usr/bin/env bash
# Install everything the tests need (Python packages, Dovecot), then lint, type-check and run
# the whole suite against real Dovecot servers started by the fixtures.
EXTRAS="test"
source "$(dirname "$0")/_env.sh"
echo "--- ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "--- mypy (strict)"
.venv/bin/mypy
echo "--- release checks"
bash scripts/check_package.sh
bash scripts/check_oldest.sh
echo "--- pytest"
exec .venv/bin/pytest "$@"
