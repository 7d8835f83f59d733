#!/usr/bin/env bash
# Runs every fuzz target coverage-guided until 10 million executions or 30 minutes, JOBS at a
# time, then minimizes each corpus. Logs: fuzz/logs/<target>.log (not committed).
# Usage: fuzz/run-all.sh [RUNS] [SECONDS] [JOBS]   (defaults 10000000 1800 2)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10000000}
seconds=${2:-1800}
jobs=${3:-2}
targets=(gossip_value socket_frame peer_message sync gossip config_file record_file)
mkdir -p fuzz/logs
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O --fuzz-dir fuzz/libfuzzer
run_one() {
    local target=$1
    cargo fuzz run -s none -O --fuzz-dir fuzz/libfuzzer "$target" "fuzz/corpus/$target" -- \
        -runs="$runs" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        > "fuzz/logs/$target.log" 2>&1 || echo "$target FAILED (see fuzz/logs/$target.log)"
    grep -E 'Done [0-9]+ runs|stat::number_of_executed_units' "fuzz/logs/$target.log" | tail -2 | sed "s/^/$target: /"
}
for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
    run_one "$target" &
done
wait
for target in "${targets[@]}"; do
    cargo fuzz cmin -s none -O --fuzz-dir fuzz/libfuzzer "$target" "fuzz/corpus/$target" > "fuzz/logs/$target.cmin.log" 2>&1 || true
done
