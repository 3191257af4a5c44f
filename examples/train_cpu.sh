#!/usr/bin/env bash
# How the shipped examples/model/ was built: on a shared 2-core CPU, no GPU
# (about 42 + 14 minutes of training plus generation and measurements).
#   bash examples/train_cpu.sh
# Each `tilecomp train` call stops after --chunk-minutes and saves; the loops
# resume until the run is done. One torch thread: on a busy CPU more threads
# spin against each other (measured: 20 s/step with 2 threads vs 2.7 s with 1).
set -euo pipefail
DATA=${DATA:-.data}
export OMP_NUM_THREADS=1
mkdir -p runs
[ -f "$DATA/train.npy" ] || tilecomp train data --out "$DATA"
until grep -qs '"done": true' runs/cpu_target.log; do
  tilecomp train target --data "$DATA" --run runs/cpu_target --size cpu --minutes 42 --chunk-minutes 9 \
    --batch 16 --seq-len 128 --lr 3e-3 --eval-windows 64 --quiet | tee -a runs/cpu_target.log
done
until grep -qs '"done": true' runs/cpu_draft.log; do
  tilecomp train draft --data "$DATA" --target runs/cpu_target/checkpoint --run runs/cpu_draft \
    --out examples/model --size cpu --minutes 14 --chunk-minutes 9.5 --sequences 384 --gen-batch 128 \
    --gen-minutes 3.5 --prompt-len 32 --new-tokens 96 --batch 16 --anchors 8 --lr 5e-3 \
    --eval-prompts 12 --eval-new-tokens 64 --quiet | tee -a runs/cpu_draft.log
done
