#!/usr/bin/env bash
# The release checks, run by scripts/test.sh (after _env.sh made .venv):
#   1. build the sdist and the wheel from this checkout and check them with `twine check`;
#   2. the wheel holds LICENSE and the pytest plugin's top-level module;
#   3. a fresh virtualenv takes the wheel WITHOUT extras: the package imports, the command
#      answers, and the pytest plugin, trustme missing, says which extra to install;
#   4. then with the `demo` extra, `trio-imappool demo` runs against a private Dovecot.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "--- package: build sdist and wheel"
rm -rf dist
.venv/bin/python -m build --quiet --outdir dist . >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}
ls dist
.venv/bin/python -m twine check --strict dist/*

wheel=$(realpath dist/*.whl)
listing=$(.venv/bin/python -m zipfile -l "$wheel")
for member in "LICENSE" "_trio_imappool_pytest_plugin.py" "trio_imappool/py.typed" \
    "trio_imappool/_version.py"; do
    if ! grep -q "$member" <<<"$listing"; then
        echo "the wheel lacks $member" >&2
        exit 1
    fi
done
sdist_listing=$(tar -tzf dist/*.tar.gz)
for member in LICENSE CHANGELOG.md; do
    if ! grep -q "/$member\$" <<<"$sdist_listing"; then
        echo "the sdist lacks $member" >&2
        exit 1
    fi
done

echo "--- package: the wheel in a fresh virtualenv, no extras"
"${PYTHON:-python3}" -m venv "$work/venv"
pip_install() {
    "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
        >"$work/pip.log" 2>&1 || {
        cat "$work/pip.log"
        exit 1
    }
}
pip_install "$wheel"
cd "$work"  # away from the checkout, so that only the installed package is found
version=$("$work/venv/bin/python" -c 'import trio_imappool; print(trio_imappool.__version__)')
echo "imported trio_imappool $version"
if "$work/venv/bin/trio-imappool" --help 2>/dev/null | grep -q -- "--version"; then
    "$work/venv/bin/trio-imappool" --version | grep -F "$version"
else
    echo "(trio-imappool has no --version yet; the import above checked the version)"
fi
pip_install pytest  # a user's test tool, not an extra of ours
"$work/venv/bin/python" - <<'PY'
import contextlib
import sys

import _trio_imappool_pytest_plugin as plugin

heavy = [m for m in ("trio_imappool", "trio", "imapclient", "trustme") if m in sys.modules]
assert heavy == [], f"the pytest plugin imported {heavy}"
try:
    import trustme  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("trustme came with a plain install")
with contextlib.ExitStack() as stack:
    try:
        plugin._start(stack)
    except BaseException as exc:  # pytest's Failed
        assert "trio-imappool[testing]" in str(exc), exc
    else:
        raise AssertionError("the fixture started without trustme")
print("the pytest plugin is light and names the testing extra")
PY

echo "--- package: a trivial test suite with and without the plugin (wall time, for the record;"
echo "    tests/integration/test_plugin.py is the gate: the plugin's run imports nothing more)"
mkdir "$work/suite"
printf '[pytest]\n' >"$work/suite/pytest.ini"
printf 'def test_trivial():\n    assert True\n' >"$work/suite/test_trivial.py"
(cd "$work/suite" && "$work/venv/bin/python" - <<'PY'
import subprocess
import sys
import time

def run(*extra):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
                   check=True, capture_output=True)
    return time.perf_counter() - start

with_plugin, without = [], []
for _ in range(5):
    with_plugin.append(run())
    without.append(run("-p", "no:trio_imappool"))
print(f"fastest of 5: {min(with_plugin) * 1000:.0f} ms with the plugin, "
      f"{min(without) * 1000:.0f} ms without ({(min(with_plugin) - min(without)) * 1000:+.0f} ms)")
PY
)

echo "--- package: trio-imappool demo from the wheel (demo extra)"
pip_install "$wheel[demo]"
"$work/venv/bin/trio-imappool" demo --no-progress --folders 2 --messages 20 >"$work/demo.log" 2>&1 || {
    cat "$work/demo.log"
    exit 1
}
tail -n 3 "$work/demo.log"
