#!/usr/bin/env bash
# Install everything the tests need (Python packages, Dovecot), then lint, type-check, run the
# unit tier (no server, no threads: seconds), build the docs, run the release checks (sdist and
# wheel, a fresh install, the oldest dependency versions) and the integration tier against real
# Dovecot, Cyrus and Redis servers started by the fixtures.
#
# Arguments go to pytest. Options only (-x -q -k ...): each tier runs with them. With test paths
# among them (tests/integration/test_pool.py, a node id), pytest runs just those, once, with the
# ordinary PATH.
EXTRAS="test,docs"
source "$(dirname "$0")/_env.sh"

has_paths=false
previous=""
for arg in "$@"; do
    case "$previous" in
        # Options whose value is the next argument (a value is not a test path).
        -k | -m | -p | -o | -c | -W | --deselect | --ignore | --ignore-glob | --rootdir \
            | --basetemp | --confcutdir | --junit-xml | --junitxml | --timeout | --maxfail)
            previous=""
            continue
            ;;
    esac
    case "$arg" in
        -*) ;;
        *) has_paths=true ;;
    esac
    previous="$arg"
done

echo "--- ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "--- mypy (strict)"
.venv/bin/mypy

if ! $has_paths; then
    # The unit tier must pass where no server can be found: its PATH holds only the venv's
    # programs (on Debian /bin is /usr/bin, where redis-server lives; dovecot is in /usr/sbin).
    # tests/unit/conftest.py fails any unit test that starts a thread, connects or spawns.
    unit_path="$PWD/.venv/bin"
    for program in dovecot doveadm redis-server cyrus imapd; do
        if env PATH="$unit_path" /bin/sh -c "command -v $program" >/dev/null; then
            echo "$program is on the unit tier's PATH ($unit_path): fix scripts/test.sh" >&2
            exit 1
        fi
    done
    echo "--- pytest tests/unit (PATH=$unit_path: no Dovecot, Redis or Cyrus)"
    clock=(.venv/bin/python -c 'import time; print(time.monotonic())')
    unit_start=$("${clock[@]}")
    env PATH="$unit_path" .venv/bin/pytest tests/unit "$@"
    unit_end=$("${clock[@]}")
    .venv/bin/python -c 'import sys; print(f"--- tests/unit took {float(sys.argv[2]) - float(sys.argv[1]):.1f} s")' \
        "$unit_start" "$unit_end"
fi

echo "--- docs (warnings as errors; executes the notebooks against private Dovecots)"
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "--- release checks"
bash scripts/check_package.sh
bash scripts/check_oldest.sh
if $has_paths; then
    echo "--- pytest $*"
    exec .venv/bin/pytest "$@"
fi
echo "--- pytest tests/integration"
exec .venv/bin/pytest tests/integration "$@"
