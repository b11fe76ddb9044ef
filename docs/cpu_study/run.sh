#!/usr/bin/env bash
# run.sh VARIANTS LIMIT_S: each line "name args..." -> one single-thread sweep.py run in the
# background (EXTRA: distill.py flags, default --stage 0); the results are appended to
# $OUT/all.jsonl as they finish; runs still going at LIMIT_S seconds are killed.
vf=$1; limit=$2; OUT=${OUT:-/tmp/sweep_out}; mkdir -p $OUT
nproc --all; export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
mkdir -p /tmp/sw; : > $OUT/all.jsonl
python3 -c "import torch, tokenizers; print(torch.__version__, tokenizers.__version__)"
pids=()
while read -r name rest; do
  [ -z "$name" ] && continue
  ( python3 docs/cpu_study/sweep.py --threads 1 $rest -- ${EXTRA---stage 0} \
      --out-dir /tmp/sw/$name > /tmp/sw/$name.log 2>&1
    if [ -f /tmp/sw/$name/sweep.json ]; then
      python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d['name'] = sys.argv[2]
print(json.dumps(d))" /tmp/sw/$name/sweep.json $name >> $OUT/all.jsonl
      echo "done $name $(date +%T)"
    else echo "FAILED $name"; tail -3 /tmp/sw/$name.log; fi ) &
  pids+=($!)
done < "$vf"
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt $limit ]; do
  alive=0; for p in "${pids[@]}"; do kill -0 $p 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 5
done
for f in /tmp/sw/*.log; do
  echo "== $f"; grep -a "it/s\|s/it" $f | tail -c 300; echo
done > $OUT/logs.txt
pkill -f sweep.py; echo "elapsed $(( $(date +%s) - start )) s"
