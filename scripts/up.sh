#!/usr/bin/env bash
# Runs Agora on this machine: builds it (installing cmake first when it is
# missing) and starts `agora up` — control plane, gateway and demo data on
# embedded SQLite. Extra arguments go to `agora up` (e.g. --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
ensure_cmake
exec cargo run --release -- up "$@"
