#!/usr/bin/env bash
# The atheris campaign in chunks of at most CHUNK_S seconds, each chunk under the shared heavy-job lock
# and spent on the targets in order (cheap parsers first, two at a time) until each has GOAL inputs:
#   bench/fuzz/campaign.sh [TARGET ...]        (default: every target)
# Logs: bench/fuzz/logs/<target>-<n>.log ("Done N in" = inputs run); crashes: bench/fuzz/crashes/<target>-crash-*
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GOAL=${GOAL:-1000000}
CHUNK_S=${CHUNK_S:-540}
STOP_AT=${STOP_AT:-}                      # epoch seconds after which no new chunk starts
LOCK=${LOCK:-/work/notes/heavy.lock}
mkdir -p bench/fuzz/logs bench/fuzz/crashes bench/fuzz/corpus
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(text dataset image coco spec query cub)
export PY GOAL CHUNK_S TARGETS="${targets[*]}"

runs_of() { cat bench/fuzz/logs/"$1"-*.log 2>/dev/null | grep -aoE 'Done [0-9]+ (runs )?in' | awk '{s+=$2} END {print s+0}'; }
export -f runs_of

lane() {  # the targets given, in order, until the chunk's end time $T_END
  for t in "$@"; do
    [ -e "bench/fuzz/logs/$t.stopped" ] && continue
    left=$((GOAL - $(runs_of "$t"))); [ "$left" -le 0 ] && continue
    secs=$((T_END - $(date +%s))); [ "$secs" -lt 30 ] && break
    n=1; while [ -e "bench/fuzz/logs/$t-$n.log" ]; do n=$((n + 1)); done
    nice -n 5 timeout $((secs + 90)) "$PY" bench/fuzz/fuzz.py "$t" "bench/fuzz/corpus/$t" \
      -atheris_runs="$left" -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
      -artifact_prefix="bench/fuzz/crashes/$t-" -print_final_stats=1 > "bench/fuzz/logs/$t-$n.log" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) $t part $n rc=$rc total=$(runs_of "$t")"
    [ $rc -ne 0 ] && { echo "rc=$rc" > "bench/fuzz/logs/$t.stopped"; echo "  $t stopped (crash or timeout): bench/fuzz/logs/$t-$n.log"; }
  done
}
export -f lane

chunk() {  # one locked chunk of CHUNK_S seconds: two lanes (the machine's two cores), cheap targets first
  export T_END=$(( $(date +%s) + CHUNK_S ))
  set -- $TARGETS
  a=(); b=(); i=0
  for t in "$@"; do if [ $((i % 2)) -eq 0 ]; then a+=("$t"); else b+=("$t"); fi; i=$((i + 1)); done
  lane "${a[@]}" & lane "${b[@]}" & wait
}
export -f chunk

while :; do
  todo=0
  for t in "${targets[@]}"; do
    [ -e "bench/fuzz/logs/$t.stopped" ] || [ "$(runs_of "$t")" -ge "$GOAL" ] || todo=1
  done
  [ $todo -eq 0 ] && break
  [ -n "$STOP_AT" ] && [ "$(date +%s)" -ge "$STOP_AT" ] && { echo "deadline: stop"; break; }
  flock "$LOCK" bash -c chunk
done
for t in "${targets[@]}"; do printf '%s\t%s\n' "$t" "$(runs_of "$t")"; done > bench/fuzz/logs/totals.tsv
rm -rf /dev/shm/lavise-fuzz-* 2>/dev/null
