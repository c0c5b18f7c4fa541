#!/bin/bash
# Container health probe: exits 0 when GET /health on this container answers
# 200 (the model is loaded), 1 otherwise. Plain bash over /dev/tcp, so the
# image needs no curl. The port comes from SOFTPROMPT_ADDR (default 8080);
# SOFTPROMPT_HEALTH_URL_PATH picks another path (e.g. /ready).
set -u
addr="${SOFTPROMPT_ADDR:-0.0.0.0:8080}"
port="${addr##*:}"
path="${SOFTPROMPT_HEALTH_URL_PATH:-/health}"
exec 3<>"/dev/tcp/127.0.0.1/${port}" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
# Status line: HTTP/1.x CODE REASON
read -r -t 5 _proto code _reason <&3 || exit 1
exec 3<&-
[ "$code" = 200 ]
