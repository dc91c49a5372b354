#!/bin/sh
# Gateway container with a SoftHSM2 token: creates the token on first start, then serves.
# The token's PINs come from a Docker secret file (two lines: SO PIN, user PIN), never from
# the environment.
set -eu
PINS=${TOKEN_PINS_FILE:-/run/secrets/token_pins}
CONF=${SOFTHSM2_CONF:-/tokens/softhsm2.conf}
if [ ! -f "$CONF" ]; then
  cardline tokens init --softhsm-dir "$(dirname "$CONF")" --label "${TOKEN_LABEL:-station-token}" \
      --pins-file "$PINS"
fi
export SOFTHSM2_CONF="$CONF"
exec cardline gateway serve "$@"
