#!/bin/sh
# Gateway container with a SoftHSM2 token: the token comes initialised, like a blank card from
# a card bureau (deploy/compose-init.sh), in SOFTHSM_TOKENS; this writes the SoftHSM2
# configuration pointing at it on first start (as gateway/softhsm.py's make_softhsm_dir
# does), then serves. The station never holds a PIN, a PUK or the transport PUK key.
set -eu
CONF=${SOFTHSM2_CONF:-/var/lib/cardline/softhsm/softhsm2.conf}
TOKENS=${SOFTHSM_TOKENS:-/var/lib/softhsm-tokens}
if [ ! -f "$CONF" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n' \
      "$TOKENS" > "$CONF"
fi
export SOFTHSM2_CONF="$CONF"
exec cardline gateway serve "$@"
