#!/usr/bin/env bash
# A bounded fuzz run of every decoder that takes outside input (issue #5): the proptest fuzz
# tests (`*/tests/fuzz*.rs`) with FUZZ_SCALE times their default cases and a fresh seed.
#
#   scripts/fuzz.sh                       # FUZZ_SCALE=20, random seed
#   FUZZ_SCALE=100 scripts/fuzz.sh        # longer
#   FUZZ_SEED=123 scripts/fuzz.sh         # replay a run (same seed, same scale)
#
# Exits non-zero on any finding, printing the seed to replay and proptest's minimal failing
# input; proptest also writes it to <crate>/tests/fuzz_*.proptest-regressions, which the next
# `cargo test` replays first (commit it with the fix).
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SCALE="${FUZZ_SCALE:-20}"
seed="${FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
export PROPTEST_RNG_SEED="$seed"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
limit="${FUZZ_TIMEOUT:-600}"
echo "fuzz: FUZZ_SCALE=$FUZZ_SCALE PROPTEST_RNG_SEED=$seed (replay: FUZZ_SEED=$seed FUZZ_SCALE=$FUZZ_SCALE $0)"
start=$(date +%s)
status=0
for target in protocol:fuzz_payloads gateway:fuzz_link gateway:fuzz_inputs \
  supervisor:fuzz_inputs printer-sim:fuzz_firmware; do
  pkg="${target%%:*}" test="${target#*:}"
  t0=$(date +%s)
  log=$(mktemp)
  if timeout "$limit" cargo test -q -p "$pkg" --test "$test" >"$log" 2>&1; then
    echo "fuzz: $pkg/$test ok ($(( $(date +%s) - t0 ))s)"
  else
    status=1
    echo "fuzz: FINDING in $pkg/$test (seed $seed, scale $FUZZ_SCALE):"
    grep -E "panicked|Test failed|minimal failing input|proptest: Saving|^test .* FAILED" -A3 "$log" | head -60 || tail -60 "$log"
  fi
  rm -f "$log"
done
echo "fuzz: done in $(( $(date +%s) - start ))s"
if [ "$status" -ne 0 ]; then
  echo "fuzz: replay with FUZZ_SEED=$seed FUZZ_SCALE=$FUZZ_SCALE $0"
fi
exit "$status"
