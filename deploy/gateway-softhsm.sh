#!/bin/sh
# Gateway container with a SoftHSM2 token: creates the token on first start, then serves.
# The token's PINs come from a Docker secret file (two lines: SO PIN, user PIN), never from
# the environment.
set -eu
PINS=${TOKEN_PINS_FILE:-/run/secrets/token_pins}
CONF=${SOFTHSM2_CONF:-/tokens/softhsm2.conf}
if [ ! -f "$CONF" ]; then
  python - "$CONF" "$PINS" "${TOKEN_LABEL:-station-token}" <<'PY'
import pathlib, sys
from gateway.drivers import softhsm_setup
conf, pins, label = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
so_pin, user_pin = pins.read_text().split()[:2]
made = softhsm_setup.make_softhsm_dir(conf.parent)
softhsm_setup.init_token(made, label, so_pin, user_pin)
PY
fi
export SOFTHSM2_CONF="$CONF"
exec cardline gateway serve "$@"
