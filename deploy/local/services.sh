#!/usr/bin/env bash
# Makes sure Redis (6379), RabbitMQ (5672) and PostgreSQL (5432) answer on 127.0.0.1,
# that the `refreshd` database exists, and that chromium + chromedriver (for the
# portal's browser tests) are installed. Uses running services; starts installed ones;
# on a Debian-like machine without them, installs them with apt-get (as root).
# Idempotent, and quick when everything is up.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, check command..., up to 60 s
  local name=$1; shift
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "$name did not come up within 60 s"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

apt_updated=0
install_pkgs() {
  command -v apt-get >/dev/null || die "$* not installed and no apt-get here: install them by hand"
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

redis_up() { port_open 6379 && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
ensure_redis() {
  redis_up && return 0
  command -v redis-server >/dev/null || install_pkgs redis-server redis-tools
  redis_up && return 0
  log "starting redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/refreshd.log
  wait_for redis redis_up
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
ensure_postgres() {
  if ! command -v pg_isready >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    pg_up 2>/dev/null || install_pkgs postgresql postgresql-client
  fi
  if ! pg_up; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # Local development and CI connect as `postgres` over TCP without a password.
    if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      log "allowing trust auth on 127.0.0.1 in $hba"
      as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    log "starting postgresql $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for postgresql pg_up
  fi
  psql_q() { psql -h 127.0.0.1 -U postgres -d postgres -tAq -c "$1"; }
  wait_for "postgresql login" psql_q "SELECT 1"
  if [ "$(psql_q "SELECT 1 FROM pg_database WHERE datname = 'refreshd'")" != "1" ]; then
    log "creating database refreshd"
    psql_q "CREATE DATABASE refreshd" || [ "$(psql_q "SELECT 1 FROM pg_database WHERE datname = 'refreshd'")" = "1" ]
  fi
}

rabbit_up() { port_open 5672; }
# Debian's init script stops the broker through this file (`rabbitmqctl stop PIDFILE`
# waits for that process to exit, forever when the file is missing).
RABBIT_PID_FILE=/var/run/rabbitmq/pid
ensure_rabbitmq() {
  if ! rabbit_up; then
    command -v rabbitmq-server >/dev/null || install_pkgs rabbitmq-server
  fi
  if ! rabbit_up; then
    log "starting rabbitmq"
    if [ -x /etc/init.d/rabbitmq-server ]; then
      as_root service rabbitmq-server start
    else
      as_root rabbitmq-server -detached
    fi
    wait_for rabbitmq rabbit_up
  fi
  # The port opens before the broker accepts logins; wait for the node to be ready.
  wait_for "rabbitmq node" as_root rabbitmq-diagnostics -q check_running
  adopt_rabbitmq
}

# A broker started other than by the init script (by hand, or by the machine's own
# start-up) is handed to it, so that `service rabbitmq-server restart` works: its pid
# goes into the pid file the script reads. Not needed under systemd.
adopt_rabbitmq() {
  [ -x /etc/init.d/rabbitmq-server ] || return 0
  [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && return 0
  if as_root test -s "$RABBIT_PID_FILE" \
    && as_root kill -0 "$(as_root cat "$RABBIT_PID_FILE")" 2>/dev/null; then
    return 0
  fi
  pid=$(as_root rabbitmqctl -q eval 'list_to_integer(os:getpid()).') || return 0
  log "handing the running rabbitmq (pid $pid) to its init script"
  as_root mkdir -p "$(dirname "$RABBIT_PID_FILE")"
  echo "$pid" | as_root tee "$RABBIT_PID_FILE" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$(dirname "$RABBIT_PID_FILE")"
}

# The portal's browser tests drive a headless Chromium over WebDriver (chromedriver).
ensure_browser() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    && [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && return 0
  install_pkgs --no-install-recommends chromium chromium-driver fonts-dejavu-core
}

ensure_redis
ensure_postgres
ensure_rabbitmq
ensure_browser
log "redis, rabbitmq, postgresql and chromium are ready"
