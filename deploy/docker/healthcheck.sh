#!/usr/bin/env bash
# The image's HEALTHCHECK: GET $REFRESHD_HEALTH_URL (http://host:port/path), healthy on a
# 200. Uses bash's /dev/tcp, so the runtime image needs no HTTP client.
set -euo pipefail
url=${REFRESHD_HEALTH_URL:-http://127.0.0.1:8080/healthz}
rest=${url#http://}
hostport=${rest%%/*}
path=/${rest#*/}
[ "$rest" = "$hostport" ] && path=/
host=${hostport%%:*}
port=${hostport##*:}
[ "$host" = "$hostport" ] && port=80
exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&3
read -r _ status _ <&3
[ "$status" = "200" ]
