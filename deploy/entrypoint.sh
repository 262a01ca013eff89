#!/bin/sh
# Entry point of the cityops image: `docker run cityops ingest …` runs
# `cityops ingest …`.
#
# Secrets. cityops reads only the fixed variable names of DESIGN.md
# (CITYOPS_DATABASE_URL, CITYOPS_MQTT_URL), and those URLs hold passwords.
# Rather than putting them in the environment of the compose file, a service
# sets NAME_FILE to a file (a docker secret under /run/secrets/) that holds
# the URL; this script reads it into NAME, at the edge, then execs cityops so
# that cityops is the process that receives SIGTERM.
set -eu

for name in CITYOPS_DATABASE_URL CITYOPS_MQTT_URL; do
  eval "file=\${${name}_FILE:-}"
  [ -n "$file" ] || continue
  eval "direct=\${${name}:-}"
  if [ -n "$direct" ]; then
    echo "cityops-entrypoint: both $name and ${name}_FILE are set; set one" >&2
    exit 2
  fi
  if [ ! -r "$file" ]; then
    echo "cityops-entrypoint: ${name}_FILE=$file is missing or not readable" >&2
    exit 2
  fi
  # $(...) drops the trailing newline an editor leaves in the file.
  value="$(cat "$file")"
  if [ -z "$value" ]; then
    echo "cityops-entrypoint: ${name}_FILE=$file is empty" >&2
    exit 2
  fi
  export "$name=$value"
  unset "${name}_FILE"
done

exec cityops "$@"
