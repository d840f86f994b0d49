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
if [[ ",${EXTRAS:-}," == *,test,* ]] && ! command -v redis-server >/dev/null 2>&1; then
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

# Cyrus IMAP, the second test server (trio_imappool.testing.start_cyrus). Its cyrus-imapd package
# conflicts with dovecot-imapd (both provide imap-server), so apt must not install it: its imapd is
# unpacked from the .deb into a cache folder instead; the rest installs normally beside Dovecot.
# Only the tests need it (EXTRAS with "test").
CYRUS_ROOT=${TRIO_IMAPPOOL_CYRUS_ROOT:-/var/cache/trio-imappool/cyrus-imapd}
if [[ ",${EXTRAS:-}," == *,test,* ]] && { [ ! -x "$CYRUS_ROOT/usr/lib/cyrus/bin/imapd" ] \
    || [ ! -x /usr/lib/cyrus/bin/master ] || [ ! -x /usr/sbin/saslpasswd2 ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "--- installing Cyrus IMAP (cyrus-common with apt-get; imapd unpacked into $CYRUS_ROOT)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            cyrus-common cyrus-admin sasl2-bin libsasl2-modules >/dev/null
        cyrus_deb_dir=$(mktemp -d)
        # (apt warns that it downloads "unsandboxed as root": harmless; dpkg -x fails if it did not)
        (cd "$cyrus_deb_dir" && apt-get download -qq cyrus-imapd 2>/dev/null)
        mkdir -p "$CYRUS_ROOT"
        dpkg -x "$cyrus_deb_dir"/cyrus-imapd_*.deb "$CYRUS_ROOT"
        rm -rf "$cyrus_deb_dir"
    else
        echo "Cyrus IMAP (the second test server) is needed and missing. As root, run:" >&2
        echo "    apt-get install cyrus-common cyrus-admin sasl2-bin libsasl2-modules" >&2
        echo "    cd /tmp && apt-get download cyrus-imapd && dpkg -x cyrus-imapd_*.deb $CYRUS_ROOT" >&2
        exit 1
    fi
fi
