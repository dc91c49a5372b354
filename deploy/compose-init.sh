#!/bin/sh
# Prepares, once, the files docker-compose.yml mounts, under DIR (default var/compose):
#   DIR/pki                 the development PKI with its CA key: stays on this machine
#   DIR/orchestrator-tls    ca.crt, orchestrator.crt/.key, crl.pem  -> orchestrator /etc/cardline/tls
#                           (the PKI's bundle: `cardline pki revoke` keeps its crl.pem current)
#   DIR/station-N-tls       ca.crt, station-N.crt/.key, crl.pem     -> station-N /etc/cardline/tls
#                           (each station enrolled at site hq: the example processes select it)
#   DIR/station-N-softhsm   station-N's software token, initialised here as a card bureau
#                           would: its SO PIN the transport PUK for its serial, derived from
#                           the transport PUK key, which no station ever sees
#   DIR/secrets/            transport-puk.key, ca-passphrase, postgres-password, pgpass
# Secrets are made here and written by cardline or the shell: never on a command line or in
# the environment. Run it as root to hand the files to the containers' users (uid 10001 for
# cardline, 999 for postgres); otherwise make them readable by those uids yourself.
set -eu
DIR=${1:-var/compose}
STATIONS="station-1 station-2"
if [ -e "$DIR/pki" ]; then
  echo "$DIR/pki exists: remove $DIR to start over" >&2
  exit 1
fi
umask 077
mkdir -p "$DIR/secrets"
cardline pki init --dir "$DIR/pki" --orchestrator-name orchestrator --orchestrator-dir "$DIR/orchestrator-tls" >/dev/null
cardline tokens new-transport-key "$DIR/secrets/transport-puk.key" >/dev/null
openssl rand -base64 32 > "$DIR/secrets/ca-passphrase"     # the local CA key's, outside its directory
for station in $STATIONS; do
  cardline gateway enroll --pki-dir "$DIR/pki" --gateway-id "$station" --site hq --out "$DIR/$station-tls" >/dev/null
  # A transport user PIN nobody needs (the holder sets the PIN at production).
  openssl rand -hex 4 | cardline tokens init --softhsm-dir "$DIR/$station-softhsm" --label "$station" \
      --transport-puk-key "$DIR/secrets/transport-puk.key" --pins-file - >/dev/null
  rm "$DIR/$station-softhsm/softhsm2.conf"            # names this machine's path; the station writes its own
done
password=$(openssl rand -hex 16)
printf '%s\n' "$password" > "$DIR/secrets/postgres-password"
printf 'postgres:5432:cardline:cardline:%s\n' "$password" > "$DIR/secrets/pgpass"
if [ "$(id -u)" = 0 ]; then
  chown -R 10001:10001 "$DIR/orchestrator-tls" "$DIR/secrets"
  for station in $STATIONS; do chown -R 10001:10001 "$DIR/$station-tls" "$DIR/$station-softhsm"; done
  chown 999:999 "$DIR/secrets/postgres-password"
fi
echo "prepared $DIR: docker compose up --build; then cardline --tls-dir $DIR/pki readers"
