#!/usr/bin/env bash
# Rebuild examples/model/ from scratch on one GPU (about 13 minutes on an H100):
# corpus + tokenizer, MiMo target with MXFP4 QAT experts, DFlash draft, measurements.
#   bash examples/train_example.sh [REPORT_DIR]
# REPORT_DIR receives the logs, loss curves (PNG) and measurement JSONs
# (default: runs/). Re-running resumes the run folders under runs/.
set -euo pipefail
REPORT=${1:-runs}
DATA=${DATA:-.data}
TARGET_MINUTES=${TARGET_MINUTES:-5.5}
DRAFT_MINUTES=${DRAFT_MINUTES:-4.6}
TC="python3 -m tilecomp.commands.train"     # same as `tilecomp train`
mkdir -p "$REPORT" runs

[ -f "$DATA/train.npy" ] || $TC data --out "$DATA"
$TC target --data "$DATA" --run runs/target --minutes "$TARGET_MINUTES" --batch 64 --eval-every 200 2>&1 | tee "$REPORT/target.log"
cp runs/target/target_loss.png runs/target/quantization.json "$REPORT/"
$TC draft --data "$DATA" --target runs/target/checkpoint --run runs/draft --out examples/model \
    --minutes "$DRAFT_MINUTES" --sequences 32768 --gen-batch 1024 --gen-minutes 1.8 --eval-prompts 16 2>&1 | tee "$REPORT/draft.log"
cp runs/draft/draft_loss.png runs/draft/acceptance.json "$REPORT/"
