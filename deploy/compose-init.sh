#!/bin/sh
# Prepares, once, the files docker-compose.yml mounts, under DIR (default var/compose):
#   DIR/pki                 the development PKI with its CA key: stays on this machine
#   DIR/orchestrator-tls    ca.crt, orchestrator.crt/.key, crl.pem  -> orchestrator /etc/cardline/tls
#   DIR/station-N-tls       ca.crt, station-N.crt/.key, crl.pem     -> station-N /etc/cardline/tls
#                           (each station enrolled at site hq: the example processes select it)
#   DIR/secrets/            transport-puk, token-pins-station-N, postgres-password, pgpass
# Secrets are made here with openssl and written by the shell: never on a command line or in
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
mkdir -p "$DIR/secrets" "$DIR/orchestrator-tls"
cardline pki init --dir "$DIR/pki" --orchestrator-name orchestrator >/dev/null
cp "$DIR/pki/ca.crt" "$DIR/pki/orchestrator.crt" "$DIR/pki/orchestrator.key" "$DIR/pki/crl.pem" "$DIR/orchestrator-tls/"
openssl rand -hex 4 > "$DIR/secrets/transport-puk"
for station in $STATIONS; do
  cardline gateway enroll --pki-dir "$DIR/pki" --gateway-id "$station" --site hq --out "$DIR/$station-tls" >/dev/null
  { cat "$DIR/secrets/transport-puk"; openssl rand -hex 4; } > "$DIR/secrets/token-pins-$station"
done
password=$(openssl rand -hex 16)
printf '%s\n' "$password" > "$DIR/secrets/postgres-password"
printf 'postgres:5432:cardline:cardline:%s\n' "$password" > "$DIR/secrets/pgpass"
if [ "$(id -u)" = 0 ]; then
  chown -R 10001:10001 "$DIR/orchestrator-tls" "$DIR/secrets"
  for station in $STATIONS; do chown -R 10001:10001 "$DIR/$station-tls"; done
  chown 999:999 "$DIR/secrets/postgres-password"
fi
echo "prepared $DIR: docker compose up --build; then cardline --tls-dir $DIR/pki readers"
