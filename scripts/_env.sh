# Shared set-up for scripts/demo.sh and scripts/test.sh; sourced, not run.
# Makes .venv (Python 3.11+), installs the project into it with the extras in $EXTRAS, and makes
# sure Dovecot (Debian's dovecot-imapd) is installed: with apt-get when we are root, otherwise
# it says what to run and stops.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "trio-imappool needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "--- creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "--- installing trio-imappool${EXTRAS:+[$EXTRAS]} into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"

if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "--- installing Dovecot (dovecot-imapd) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd >/dev/null
    else
        echo "Dovecot is needed and missing. Install it, then run this again:" >&2
        echo "    sudo apt-get install dovecot-imapd" >&2
        exit 1
    fi
fi

# The connection budget's tests need Redis (Debian's redis-server); they start their own on a
# free port, never a system service (on Debian the package may start one on 6379: not used).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "--- installing Redis (redis-server) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "Redis is needed and missing. Install it, then run this again:" >&2
        echo "    sudo apt-get install redis-server" >&2
        exit 1
    fi
fi
