#!/usr/bin/env bash
# Install everything cityops needs on a fresh Debian 12 machine, idempotently.
#
#   scripts/install.sh            system packages, TimescaleDB, virtualenv
#   scripts/install.sh --no-system   only the virtualenv (no root needed)
#
# Each step checks whether its result is already there and skips itself if so,
# so running the script again is cheap.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CITYOPS_BUILD_CACHE:-$ROOT/.cityops/build}"
VENV="$ROOT/.venv"
PG_MAJOR="${PG_MAJOR:-15}"
TIMESCALEDB_VERSION="2.19.3"
SYSTEM=1
[ "${1:-}" = "--no-system" ] && SYSTEM=0

log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

APT_PACKAGES=(
  mosquitto mosquitto-clients
  "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" postgresql-client
  build-essential cmake dpkg-dev libssl-dev
  python3-venv
  chromium fonts-ipafont-gothic
  # deploy/ checks (tests/cityops/test_deploy.py): compose v1 validates
  # deploy/docker-compose.yml without a daemon; systemd-analyze verifies the units.
  docker-compose systemd
)

install_apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "system packages present"
    return
  fi
  log "installing system packages: ${missing[*]}"
  as_root apt-get update -qq
  # Debian's postinst scripts start the services they install; keep the ones
  # already configured here and let later steps start what cityops needs.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

pg_extension_dir() { "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" --sharedir; }

timescaledb_installed() {
  [ -f "$(pg_extension_dir)/extension/timescaledb--$TIMESCALEDB_VERSION.sql" ] &&
    [ -f "$("/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" --pkglibdir)/timescaledb-$TIMESCALEDB_VERSION.so" ]
}

# TimescaleDB is not packaged for Debian 12. Debian 13 ships its source; fetch
# it through a private apt configuration (a deb-src entry only, so no trixie
# binary can reach this system) and build the Apache-2 edition against the
# local PostgreSQL headers.
build_timescaledb() {
  if timescaledb_installed; then
    log "TimescaleDB $TIMESCALEDB_VERSION present"
    return
  fi
  log "building TimescaleDB $TIMESCALEDB_VERSION from Debian 13 source"
  local apt_dir="$CACHE/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/src"
  cat >"$apt_dir/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
  local opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache::archives=$apt_dir/archives"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "APT::Get::List-Cleanup=0"
  )
  apt-get "${opts[@]}" update -qq
  local src="$apt_dir/src"
  if ! ls -d "$src"/timescaledb-"$TIMESCALEDB_VERSION"* >/dev/null 2>&1; then
    # _apt drops privileges for downloads; let it write into the cache.
    chmod 0777 "$src" 2>/dev/null || true
    (cd "$src" && apt-get "${opts[@]}" source -qq timescaledb)
  fi
  local dir
  dir="$(ls -d "$src"/timescaledb-"$TIMESCALEDB_VERSION"*/ | head -n 1)"
  local build="$dir/build"
  rm -rf "$build"
  cmake -S "$dir" -B "$build" \
    -DPG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" \
    -DAPACHE_ONLY=1 -DUSE_TELEMETRY=OFF -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
    -DWARNINGS_AS_ERRORS=OFF -DCMAKE_BUILD_TYPE=Release >"$CACHE/timescaledb-cmake.log"
  cmake --build "$build" -j "$(nproc)" >"$CACHE/timescaledb-build.log"
  as_root cmake --install "$build" >"$CACHE/timescaledb-install.log"
  timescaledb_installed || { echo "TimescaleDB build finished but the extension is not installed" >&2; exit 1; }
}

# The system cluster (if there is one) loads TimescaleDB so that
# CITYOPS_DATABASE_URL may point at it. The embedded cluster of `cityops up`
# and of the tests writes its own configuration.
configure_system_postgres() {
  command -v pg_lsclusters >/dev/null || return 0
  local conf="/etc/postgresql/$PG_MAJOR/main/postgresql.conf"
  [ -f "$conf" ] || return 0
  local dropin="/etc/postgresql/$PG_MAJOR/main/conf.d/timescaledb.conf"
  if [ ! -f "$dropin" ] || ! grep -q "shared_preload_libraries = 'timescaledb'" "$dropin"; then
    log "loading TimescaleDB into the system PostgreSQL cluster"
    as_root mkdir -p "$(dirname "$dropin")"
    printf "shared_preload_libraries = 'timescaledb'\ntimescaledb.telemetry_level = off\n" | as_root tee "$dropin" >/dev/null
    grep -qE "^include_dir = 'conf.d'" "$conf" || echo "include_dir = 'conf.d'" | as_root tee -a "$conf" >/dev/null
    as_root chown -R postgres:postgres "$(dirname "$dropin")"
    as_root pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" main restart || \
      as_root pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" main start
  fi
  pg_lsclusters | grep -qE "^$PG_MAJOR +main .*online" || \
    as_root pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" main start
}

install_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.cityops-installed"
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log "installing Python dependencies"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    touch "$stamp"
  else
    log "Python dependencies present"
  fi
}

install_console() {
  [ -f "$ROOT/console/package.json" ] || return 0
  command -v npm >/dev/null || { log "npm missing: console not built (the API still serves)"; return 0; }
  local console="$ROOT/console"
  if [ ! -d "$console/node_modules" ] || [ "$console/package-lock.json" -nt "$console/node_modules" ]; then
    log "installing console packages from the npm registry (package-lock.json)"
    (cd "$console" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules)
  fi
  # Build when the bundle is missing or any source is newer than it.
  if [ ! -f "$console/dist/index.html" ] || \
     [ -n "$(find "$console/src" "$console/index.html" "$console/package-lock.json" \
             -newer "$console/dist/index.html" -print -quit)" ]; then
    log "building the console"
    (cd "$console" && npm run build --silent)
  else
    log "console build up to date"
  fi
}

mkdir -p "$CACHE"
if [ "$SYSTEM" = 1 ]; then
  install_apt_packages
  build_timescaledb
  configure_system_postgres
fi
install_venv
install_console
log "done"
