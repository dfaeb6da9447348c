#!/usr/bin/env bash
# Agora's test command: prepares what the suite needs, runs all of it, then
# fuzzes each fuzz target for a bounded time (scripts/fuzz.sh).
#
#   ./scripts/test.sh            # the whole suite
#   ./scripts/test.sh -p agora-config   # extra arguments go to `cargo test`
#
# Needs: a Rust toolchain, cmake, ClickHouse and Redis server binaries, and either a running
# Postgres on 127.0.0.1:5432 or root on a Debian-like system (Postgres, cmake and
# Debian's clickhouse-server are then installed as needed; the tests start their own
# ClickHouse servers, so none has to be running).
# Override the server with TEST_PG_ADMIN_URL=postgres://user:pass@host:port/postgres.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/prereqs.sh

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
command -v curl >/dev/null || apt_install curl
ensure_cmake
command -v psql >/dev/null || apt_install postgresql-client

# The metering tests start private ClickHouse servers from Debian's package.
if ! command -v clickhouse-server >/dev/null && [ ! -x /usr/sbin/clickhouse-server ] \
   && [ -z "${AGORA_CLICKHOUSE_SERVER:-}" ]; then
  apt_install clickhouse-server
fi
log "ClickHouse server binary: ${AGORA_CLICKHOUSE_SERVER:-$(command -v clickhouse-server || echo /usr/sbin/clickhouse-server)}"

# The shared-limit tests start private Redis servers (nothing kept on disk).
if ! command -v redis-server >/dev/null && [ -z "${AGORA_REDIS_SERVER:-}" ]; then
  apt_install redis-server
fi

# tests/deploy.rs checks deploy/ with promtool (Debian's prometheus) and
# docker-compose's `config` (Debian's docker-compose, without the engine).
command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
command -v docker-compose >/dev/null || apt_install --no-install-recommends docker-compose

export TEST_PG_ADMIN_URL="${TEST_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

pg_ok() { psql "$TEST_PG_ADMIN_URL" -Atqc 'select 1' >/dev/null 2>&1; }

if ! pg_ok; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  for cluster in /etc/postgresql/*/main; do
    version=$(basename "$(dirname "$cluster")")
    log "starting Postgres $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  done
  for _ in $(seq 1 60); do
    pg_ok && break
    # A fresh Debian install refuses password-less TCP logins: give the test
    # role a password over the local socket and use it.
    if [ "$(id -u)" = 0 ] && [ "$TEST_PG_ADMIN_URL" = "postgres://postgres@127.0.0.1:5432/postgres" ] \
       && su postgres -c "psql -Atqc 'select 1'" >/dev/null 2>&1; then
      su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'agora-test'\"" >/dev/null
      export TEST_PG_ADMIN_URL="postgres://postgres:agora-test@127.0.0.1:5432/postgres"
      continue
    fi
    sleep 0.5
  done
  pg_ok || { log "Postgres is not reachable at ${TEST_PG_ADMIN_URL%%@*}@…; the suite needs it"; exit 1; }
fi
log "Postgres ready"

# Databases left by failed tests of earlier runs.
stale=$(psql "$TEST_PG_ADMIN_URL" -Atqc "select datname from pg_database where datname like 'agora_t_%'")
for db in $stale; do
  psql "$TEST_PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null
done

fixtures="$(cd .. && pwd)/shared/fixtures"
if [ -d "$fixtures/langflow" ] && [ -d "$fixtures/langflow-wire" ]; then
  log "Langflow compatibility fixtures found at $fixtures: those cases run"
else
  log "Langflow compatibility fixtures not found at $fixtures: those cases do not run (the project's own fixtures still do)"
fi

# Python tools the suite runs, each installed once from PyPI with uv into a
# cached venv: `pypi_tool NAME VERSION` leaves it in $venv.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/agora"
pypi_tool() {
  local name=$1 version=$2
  venv="$cache/$name-$version"
  installed() {
    "$venv/bin/python" -c \
      "import importlib.metadata as m, sys; sys.exit(m.version('$name') != '$version')" 2>/dev/null
  }
  installed && return 0
  command -v python3 >/dev/null || apt_install python3 python3-venv
  local uv="$cache/uv/bin/uv"
  if [ ! -x "$uv" ]; then
    log "installing uv from PyPI into $cache/uv"
    python3 -m venv "$cache/uv" && "$cache/uv/bin/pip" install --quiet uv || return 1
  fi
  log "installing $name $version into $venv (once)"
  rm -rf "$venv"
  "$uv" venv --quiet --python python3 "$venv" \
    && "$uv" pip install --quiet --python "$venv/bin/python" "$name==$version" \
    && installed
}

# A real Langflow for tests/langflow.rs (about a minute to install); the test
# starts it itself.
LANGFLOW_VERSION=1.13.0
if [ "${AGORA_SKIP_LANGFLOW:-}" = 1 ]; then
  log "AGORA_SKIP_LANGFLOW=1: the real-Langflow cases will NOT run"
else
  pypi_tool langflow "$LANGFLOW_VERSION" \
    || { log "Langflow could not be installed: set AGORA_SKIP_LANGFLOW=1 to run without the Langflow cases"; exit 1; }
  export AGORA_LANGFLOW="$venv/bin/langflow"
  log "Langflow $LANGFLOW_VERSION: $AGORA_LANGFLOW"
fi

# schemathesis, which tests/openapi.rs runs against the live OpenAPI document.
pypi_tool schemathesis 4.32.5 || { log "schemathesis could not be installed"; exit 1; }
export AGORA_SCHEMATHESIS="$venv/bin/schemathesis"

# kubernetes-validate, which tests/deploy.rs runs over deploy/kubernetes/.
pypi_tool kubernetes-validate 1.37.0 || { log "kubernetes-validate could not be installed"; exit 1; }
export AGORA_KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"

# A real browser for tests/widget.rs: Debian's Chromium, driven by
# playwright-core and checked by axe-core from npm (no browser is downloaded).
if [ "${AGORA_SKIP_BROWSER:-}" = 1 ]; then
  log "AGORA_SKIP_BROWSER=1: the widget's browser cases will NOT run"
else
  [ -x "${AGORA_CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium
  command -v npm >/dev/null || apt_install nodejs npm
  if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/axe-core ]; then
    log "installing playwright-core and axe-core from npm into tests/browser"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  log "browser: ${AGORA_CHROMIUM:-/usr/bin/chromium}"
fi

log "running the suite (Postgres and SQLite)"
cargo test --workspace --all-targets "$@"

# Coverage-guided fuzzing of the parsers, a bounded time per target (their
# corpora and found crashes were replayed above, by fuzz/tests/replay.rs).
if [ $# -gt 0 ]; then
  log "arguments given: the fuzz runs are left out"
elif [ "${AGORA_SKIP_FUZZ:-}" = 1 ]; then
  log "AGORA_SKIP_FUZZ=1: the fuzz targets will NOT run"
else
  AGORA_FUZZ_SECS="${AGORA_FUZZ_SECS:-20}" scripts/fuzz.sh
fi
