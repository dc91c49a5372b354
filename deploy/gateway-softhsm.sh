#!/bin/sh
# Gateway container with a SoftHSM2 token: creates the token on first start, then serves.
# The token's PINs come from a secret file (two lines: SO PIN — the transport PUK the
# orchestrator's card templates authenticate with —, then a transport user PIN), never from
# the environment or the command line.
set -eu
PINS=${TOKEN_PINS_FILE:-/run/secrets/token-pins}
CONF=${SOFTHSM2_CONF:-/var/lib/cardline/softhsm/softhsm2.conf}
if [ ! -f "$CONF" ]; then
  cardline tokens init --softhsm-dir "$(dirname "$CONF")" --label "${TOKEN_LABEL:-station-token}" \
      --pins-file "$PINS"
fi
export SOFTHSM2_CONF="$CONF"
exec cardline gateway serve "$@"
