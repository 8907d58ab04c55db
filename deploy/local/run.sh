#!/usr/bin/env bash
# `make run`: builds refreshd, migrates the dev namespace, starts every role in one
# process (`refreshd dev`: bank simulator, ingress, worker), then shows it working: a
# dev token, a demo consent registered against the simulator, a refresh requested, and
# the status events arriving, and where to open the dashboard and how to sign in. It
# keeps running for you to try the API and the portal; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export REFRESHD_ENV=${REFRESHD_ENV:-dev}
export REFRESHD_CONFIG_DIR=${REFRESHD_CONFIG_DIR:-$PWD/config}
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "run: installing $tool" >&2; apt-get install -y -qq "$tool" >/dev/null; }
done

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

api=${REFRESHD__HTTP__BIND:-127.0.0.1:8080}
sim=${REFRESHD__BANK_SIM__BIND:-127.0.0.1:8090}
# The demo's bank is the simulator, wherever it listens.
export REFRESHD__PROVIDERS__SIM__BASE_URL=${REFRESHD__PROVIDERS__SIM__BASE_URL:-http://$sim/open-banking/v3.1/aisp}
# A second `make run` would otherwise talk to the first one and then fail to bind.
for addr in "$api" "$sim"; do
  if port_open "$addr"; then
    if curl -sf --max-time 2 "http://$api/healthz" >/dev/null 2>&1; then
      echo "run: a refreshd is already running on http://$api (another \`make run\`?)." >&2
      echo "run: use that one, or stop it (Ctrl-C in its terminal) and run again." >&2
    else
      echo "run: $addr is in use by another program; free it, or set" >&2
      echo "run: REFRESHD__HTTP__BIND / REFRESHD__BANK_SIM__BIND to free addresses." >&2
    fi
    exit 1
  fi
done

say "building refreshd (a first build compiles every dependency: several minutes, ~10 on 2 cores)"
cargo build -p refreshd --bins
# Where cargo put the binaries (CARGO_TARGET_DIR or build.target-dir may move them).
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=$target_dir/debug
[ -x "$bin/refreshd" ] || { echo "run: no refreshd in $bin after the build" >&2; exit 1; }

say "migrating the dev namespace"
"$bin/refreshd" migrate

say "starting refreshd dev (API on http://$api)"
"$bin/refreshd" dev &
dev=$!
events=""
cleanup() {
  [ -n "$events" ] && kill "$events" 2>/dev/null || true
  kill -TERM "$dev" 2>/dev/null || true
  wait "$dev" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM
for _ in $(seq 1 120); do
  curl -sf "http://$api/readyz" >/dev/null && break
  kill -0 "$dev" 2>/dev/null || { echo "run: refreshd dev exited" >&2; exit 1; }
  sleep 0.5
done

token=$("$bin/refreshctl" token --tenant demo)
say "dev token for tenant 'demo' (valid 24 h):"
echo "$token"

say "status events (one line each; \`refreshctl events --json\` prints them raw):"
"$bin/refreshctl" events 2>/dev/null > >(jq -R -r --unbuffered -f deploy/local/events.jq | sed -u 's/^/  event: /') &
events=$!
sleep 1

say "registering a demo consent against the bank simulator (starts its initial load)"
consent_json=$(curl -sS -X POST "http://$api/v1/consents" -H "authorization: Bearer $token" \
  -H 'content-type: application/json' \
  -d '{"providerId":"sim","bankConsentId":"demo","accessToken":"demo","expiresAt":"2099-01-01T00:00:00Z"}')
consent=$(printf '%s' "$consent_json" | sed -n 's/.*"consentId":"\([0-9a-f-]*\)".*/\1/p')
echo "  consent $consent"
for _ in $(seq 1 60); do
  curl -sS "http://$api/v1/consents/$consent" -H "authorization: Bearer $token" | grep -q '"refreshing":false' && break
  sleep 0.5
done

say "requesting a refresh: POST /v1/consents/$consent/refresh"
curl -sS -X POST "http://$api/v1/consents/$consent/refresh" -H "authorization: Bearer $token"
echo
sleep 3

say "the dashboard: http://$api/dashboard"
cat <<PORTAL
  Open it in a browser and sign in with the dev token above (paste it into the
  "API token" field). For an operator's view of every tenant, sign in with
  $bin/refreshctl token --admin
PORTAL

say "refreshd dev is running. Try:"
# The portal, where this build has one.
if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$api/dashboard/login")" = "200" ]; then
  echo "  dashboard: http://$api/dashboard (sign in with the token above)"
fi
cat <<TRY
  export TOKEN=$token
  curl -s http://$api/v1/consents/$consent -H "authorization: Bearer \$TOKEN"
  curl -s -X POST http://$api/v1/consents/$consent/refresh -H "authorization: Bearer \$TOKEN"
  curl -s http://$api/v1/consents/$consent/refreshes -H "authorization: Bearer \$TOKEN"
  curl -s http://$api/openapi.json
  curl -sN http://$api/v1/events -H "authorization: Bearer \$TOKEN"
Ctrl-C stops it.
TRY
wait "$dev"
