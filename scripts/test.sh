#!/usr/bin/env bash
# Install everything the tests need (Python packages, Dovecot), then lint, type-check, build the
# docs, run the release checks (sdist and wheel, a fresh install, the oldest dependency
# versions) and the whole suite against real Dovecot servers started by the fixtures.
EXTRAS="test,docs"
source "$(dirname "$0")/_env.sh"
echo "--- ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "--- mypy (strict)"
.venv/bin/mypy
echo "--- docs (warnings as errors; executes the notebooks against private Dovecots)"
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "--- release checks"
bash scripts/check_package.sh
bash scripts/check_oldest.sh
echo "--- pytest"
exec .venv/bin/pytest "$@"
