#!/usr/bin/env bash
# Run a fast part of the suite against the oldest declared dependency versions
# (scripts/oldest-constraints.txt): the modules that touch imapclient's and imaplib's internals
# (the pooled client, the pipelined fetch, the IDLE reader) and the pool's core. Run by
# scripts/test.sh; keeps its own virtualenv in .venv-oldest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv-oldest/bin/python ]; then
    "$PYTHON" -m venv .venv-oldest
fi
echo "--- oldest versions: installing into .venv-oldest"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# pip has no "lowest" resolution: the constraints file pins each dependency to its lower bound.
.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check \
    -c scripts/oldest-constraints.txt -e ".[testing]" \
    "pytest>=8" "pytest-trio>=0.8" "pytest-timeout>=2.3" >"$log" 2>&1 || {
    cat "$log"
    exit 1
}
.venv-oldest/bin/python -m pip freeze --disable-pip-version-check 2>/dev/null |
    grep -i -E "^(trio|trio-util|trio_util|imapclient|outcome)==" | tr '\n' ' '
echo
echo "--- oldest versions: pytest (a part of the suite)"
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider \
    tests/unit/test_config.py tests/integration/test_connection.py tests/integration/test_pool.py tests/integration/test_fanout.py \
    tests/integration/test_idle.py tests/integration/test_typing.py::test_the_typed_commands_are_the_connection_commands_with_imapclients_parameters
