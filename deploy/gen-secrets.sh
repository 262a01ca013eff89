#!/bin/sh
# Create the secrets of the compose deployment, once (idempotent).
#
#   deploy/gen-secrets.sh [DIR]        DIR defaults to deploy/ (this script's folder)
#
# Writes, only where missing:
#   DIR/secrets/postgres_password      the database password (used when the db volume is created)
#   DIR/secrets/database_url           postgresql://cityops:…@db:5432/cityops
#   DIR/secrets/mqtt_url_ingest        mqtt://cityops-ingest:…@broker:1883   (ingesters, rules)
#   DIR/secrets/mqtt_url_api           mqtt://cityops-api:…@broker:1883
#   DIR/secrets/mqtt_url_simulator     mqtt://cityops-simulator:…@broker:1883
# and sets the three service accounts in DIR/mosquitto/passwd (mosquitto_passwd
# hashes) from those URLs, keeping every other account (devices) in the file.
#
# To rotate a service password: delete its file under secrets/, run this
# again, then reload the broker and restart that service (docs/operations.md).
# The database password is only read when the volume is first initialised;
# rotating it later also needs ALTER ROLE (docs/operations.md).
#
# Permissions: secrets/ is 0700, so other users of this host cannot read the
# files; the files themselves are 0644 because Docker bind-mounts them as they
# are and each container reads them as its own user (cityops 10001,
# postgres 70). The password file is 0640, group 1883 (mosquitto in
# eclipse-mosquitto) when run as root.
set -eu

DIR="${1:-$(cd "$(dirname "$0")" && pwd)}"
SECRETS="$DIR/secrets"
PASSWD="$DIR/mosquitto/passwd"
MOSQUITTO_GID=1883

log() { printf '[gen-secrets] %s\n' "$*"; }

# 32 random bytes as hex: safe in a URL without escaping.
random_password() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# write_once NAME VALUE: create secrets/NAME unless it exists.
write_once() {
  if [ -s "$SECRETS/$1" ]; then
    log "kept    secrets/$1"
    return
  fi
  (umask 022 && printf '%s\n' "$2" >"$SECRETS/$1.tmp")
  mv "$SECRETS/$1.tmp" "$SECRETS/$1"
  log "created secrets/$1"
}

# The password part of mqtt://user:password@host:port.
url_password() { sed -n 's#^[a-z]*://[^:]*:\([^@]*\)@.*#\1#p' "$1"; }

# set_account USER PASSWORD: add or update one account in the password file,
# keeping the others. The password is hashed with `mosquitto_passwd -U` on a
# 0600 scratch file, never put on a command line (visible in `ps`).
set_account() {
  scratch="$(mktemp -d)"
  (umask 077 && printf '%s:%s\n' "$1" "$2" >"$scratch/entry")
  if command -v mosquitto_passwd >/dev/null 2>&1; then
    mosquitto_passwd -U "$scratch/entry"
  elif command -v docker >/dev/null 2>&1; then
    # The broker image's own tool.
    docker run --rm -v "$scratch:/work" eclipse-mosquitto:2 mosquitto_passwd -U /work/entry
  else
    rm -rf "$scratch"
    echo "gen-secrets: neither mosquitto_passwd nor docker found (apt-get install mosquitto)" >&2
    exit 1
  fi
  { grep -v "^$1:" "$PASSWD" || true; cat "$scratch/entry"; } >"$scratch/passwd"
  cat "$scratch/passwd" >"$PASSWD"
  rm -rf "$scratch"
}

mkdir -p "$SECRETS" "$(dirname "$PASSWD")"
chmod 0700 "$SECRETS"

db_password="$(cat "$SECRETS/postgres_password" 2>/dev/null || random_password)"
write_once postgres_password "$db_password"
write_once database_url "postgresql://cityops:$(cat "$SECRETS/postgres_password")@db:5432/cityops"
for account in ingest api simulator; do
  write_once "mqtt_url_$account" "mqtt://cityops-$account:$(random_password)@broker:1883"
done

[ -f "$PASSWD" ] || : >"$PASSWD"
chmod 0600 "$PASSWD"
for account in ingest api simulator; do
  set_account "cityops-$account" "$(url_password "$SECRETS/mqtt_url_$account")"
done
if [ "$(id -u)" = 0 ]; then
  chgrp "$MOSQUITTO_GID" "$PASSWD"
  chmod 0640 "$PASSWD"
else
  # Not root: the container's mosquitto user (uid 1883) must still read it.
  chmod 0644 "$PASSWD"
  log "not root: mosquitto/passwd is world-readable (0644); as root it is 0640, group $MOSQUITTO_GID"
fi
log "set service accounts in mosquitto/passwd (reload a running broker: docker compose kill -s HUP broker)"
