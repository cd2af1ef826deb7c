#!/usr/bin/env bash
# Sums the figures the hardening and fault tests left in DIR (one file per
# test, `key value` lines) and prints the closing line of a test run.
#   scripts/hardening-figures.sh [DIR]     (default target/zfsync-figures)
set -euo pipefail
dir=${1:-target/zfsync-figures}
if ! ls "$dir"/*.txt >/dev/null 2>&1; then
    echo "hardening: no figures in $dir (were the end-to-end tests run?)"
    exit 0
fi
cat "$dir"/*.txt | awk '
    { sum[$1] += $2; if ($1 == "receiver_peak_kib" && $2 > peak) peak = $2 }
    END {
        lost = "0"
        if (sum["lost"] > 0) lost = sum["lost"] " snapshots LOST"
        printf "hardening: %d hostile inputs tried, %d refused; %d faults injected, %d runs completed afterwards; bytes lost: %s; writes outside the target: %d; receiver peak memory %d KiB\n", sum["hostile_tried"], sum["hostile_refused"], sum["faults"], sum["completed"], lost, sum["outside_writes"], peak
    }'
