#!/usr/bin/env bash
# Install trio-imappool (and Dovecot if missing), then run its demo against a private Dovecot.
EXTRAS="demo"
source "$(dirname "$0")/_env.sh"
echo "--- trio-imappool demo"
exec .venv/bin/trio-imappool demo "$@"
