#!/usr/bin/env bash
# The atheris campaign in chunks of at most 9 minutes, each under the shared heavy-job lock:
#   bench/fuzz/campaign.sh [TARGET ...]        (default: every target; stops a target at 1,000,000 inputs)
# Logs: bench/fuzz/logs/<target>-<n>.log; crashes: bench/fuzz/crashes/; totals: bench/fuzz/logs/totals.tsv
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GOAL=${GOAL:-1000000}
CHUNK_S=${CHUNK_S:-540}
STOP_AT=${STOP_AT:-}                      # epoch seconds after which no new chunk starts
LOCK=${LOCK:-/work/notes/heavy.lock}
mkdir -p bench/fuzz/logs bench/fuzz/crashes bench/fuzz/corpus
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(text dataset image coco spec query cub)
runs_of() { cat bench/fuzz/logs/"$1"-*.log 2>/dev/null | grep -ao 'Done [0-9]* in' | awk '{s+=$2} END {print s+0}'; }
for t in "${targets[@]}"; do
  n=0
  while [ "$(runs_of "$t")" -lt "$GOAL" ]; do
    [ -n "$STOP_AT" ] && [ "$(date +%s)" -ge "$STOP_AT" ] && { echo "deadline: stop"; break 2; }
    n=$((n + 1)); while [ -e "bench/fuzz/logs/$t-$n.log" ]; do n=$((n + 1)); done
    left=$((GOAL - $(runs_of "$t")))
    flock "$LOCK" nice -n 5 timeout $((CHUNK_S + 60)) "$PY" bench/fuzz/fuzz.py "$t" "bench/fuzz/corpus/$t" \
      -atheris_runs="$left" -max_total_time="$CHUNK_S" -timeout=10 -rss_limit_mb=4096 \
      -artifact_prefix="bench/fuzz/crashes/$t-" -print_final_stats=1 > "bench/fuzz/logs/$t-$n.log" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) $t chunk $n rc=$rc total=$(runs_of "$t")"
    if [ $rc -ne 0 ]; then echo "  $t: stopped with rc=$rc (crash or timeout): see bench/fuzz/logs/$t-$n.log"; break; fi
  done
  printf '%s\t%s\n' "$t" "$(runs_of "$t")" >> bench/fuzz/logs/totals.tsv
done
rm -rf /dev/shm/lavise-fuzz-* 2>/dev/null
