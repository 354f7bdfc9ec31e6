#!/bin/bash
# Service prediction throughput, faithful vs task_inference: alternating `spacenet demo`
# runs (1000 training records a class, the full 10,000-record test set) on one broker.
# Usage (from the repository root): results/service_task_inference/throughput.sh OUTDIR
set -euo pipefail
out=${1:?output folder}
mkdir -p "$out"
addr=$(python3 stream/tools/local_kafka.py start --dir "$out/broker")
trap 'python3 stream/tools/local_kafka.py stop --dir "$out/broker"' EXIT
for i in 1 2 3 4; do
  for mode in faithful ti; do
    extra=(); [ $mode = ti ] && extra=(--set task_inference=true)
    .venv/bin/spacenet demo --bootstrap "$addr" --limit-per-class 1000 --seed $i "${extra[@]}" \
      --out "$out/$mode-$i" > "$out/$mode-$i.log" 2>&1
    python3 -c "import json; t = json.load(open('$out/$mode-$i/summary.json'))['test']; print('$mode', $i, round(t['requests_per_s']), round(t['final_accuracy'], 4))"
  done
done
