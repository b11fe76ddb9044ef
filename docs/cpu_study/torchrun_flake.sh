#!/bin/bash
# The torchrun tests N times beside two busy CPU threads, counting failures (the teardown abort
# of docs/training.md "Errors under torchrun"). From the repository root, in its venv:
#     bash docs/cpu_study/torchrun_flake.sh 20
n=${1:-20}
( while true; do :; done ) & hog1=$!
( while true; do :; done ) & hog2=$!
trap 'kill $hog1 $hog2' EXIT
fails=0
for i in $(seq 1 "$n"); do
  python -m pytest -q -p no:cacheprovider tests/test_pipeline.py -k torchrun > /dev/null 2>&1 \
    || { fails=$((fails + 1)); echo "run $i failed"; }
done
echo "fails $fails of $n"
