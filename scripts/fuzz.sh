#!/usr/bin/env bash
# Coverage-guided fuzzing of every target of fuzz/ (see fuzz/src/lib.rs) with
# AFL++ through afl.rs, each for a bounded time:
#
#   ./scripts/fuzz.sh                 # every target, AGORA_FUZZ_SECS (default 20) each
#   AGORA_FUZZ_SECS=3600 ./scripts/fuzz.sh h1_request
#
# Installs cargo-afl (and builds AFL++ for this rustc) on first use. A crash
# fails the run; its input is copied to fuzz/crashes/<target>/, where the
# replay test (fuzz/tests/replay.rs) keeps it once the bug is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

AFL_VERSION=0.18.2
secs="${AGORA_FUZZ_SECS:-20}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(h1_request h1_chunked api_key flow_import snapshot_delta stripe_signature)

if ! cargo afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
  log "installing cargo-afl $AFL_VERSION (builds AFL++ once, about a minute)"
  cargo install cargo-afl --locked --version "$AFL_VERSION" --quiet
fi
# AFL++'s runtime for this rustc; says so and fails harmlessly when it is built.
cargo afl config --build >/dev/null 2>&1 || true

# Instrumented builds stay apart from the workspace's own.
export CARGO_TARGET_DIR="${AGORA_FUZZ_TARGET_DIR:-$PWD/target/afl}"
log "building the fuzz targets with AFL instrumentation"
cargo afl build --quiet --manifest-path fuzz/afl/Cargo.toml

findings="$CARGO_TARGET_DIR/findings"
mkdir -p "$findings"
failed=0
for target in "${targets[@]}"; do
  out="$findings/$target"
  rm -rf "$out"
  AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    AFL_QUIET=1 \
    cargo afl fuzz -V "$secs" -t 2000 -i "fuzz/corpus/$target" -o "$out" \
      -- "$CARGO_TARGET_DIR/debug/$target" >"$out.log" 2>&1 \
    || { log "$target: afl-fuzz failed to run"; tail -20 "$out.log"; failed=1; continue; }
  stats="$out/default/fuzzer_stats"
  stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  crashes=$(stat saved_crashes)
  log "$target: $(stat execs_done) execs in $(stat run_time) s ($(stat execs_per_sec)/s), $(stat corpus_count) paths, $crashes crashes"
  if [ "${crashes:-0}" != 0 ]; then
    mkdir -p "fuzz/crashes/$target"
    for f in "$out"/default/crashes/id:*; do
      cp "$f" "fuzz/crashes/$target/$(sha256sum "$f" | cut -c1-16)"
    done
    log "$target: crash inputs copied to fuzz/crashes/$target/"
    failed=1
  fi
done
exit "$failed"
