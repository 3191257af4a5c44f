#!/usr/bin/env bash
# GPU runs for bench/results/: one call of the device tool runs the steps named on the
# command line, each under its own time limit, logging to $OUT (or ./out). A failing step
# does not stop the others.
#
#   bash bench/gpu.sh install trace-v1 trace-stages1 trace-warps8     # one call (~8 min)
#   bash bench/gpu.sh install bench-flash-8 bench-flash-1            # one call
#   bash bench/gpu.sh install tokens-small generate baseline         # one call (carry .device/)
#   bash bench/gpu.sh install phases-8 phases-1 'ncu expert_down' 'ncu lm_head'   # where a step goes
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# BUDGET_S (default 580): seconds the whole call may take; each step's limit is cut to what is left.
# Keep it under the device tool's limit for the call (the session's device time left can be less
# than 600 s): a call killed at that limit runs finalize from its TERM trap, if it gets the chance.
END=$(( $(date +%s) + ${BUDGET_S:-580} ))
# DRY=1: check a planned call on a CPU before spending device time: every tilecomp bench / tokens
# step parses its arguments (tile and switch names and values, lowering options) and stops
# (TILECOMP_DRY_RUN); steps that need the GPU or its tools are listed, not run
DRY=${DRY:-0}
[[ $DRY == 1 ]] && export TILECOMP_DRY_RUN=1
# finalize: at the end of every call (also on TERM / INT), the var-*.json files merge into
# sweep.json (keys: the variant names; an existing sweep.json keeps its other keys) and the logs go
# into logs.tgz, so a call returns a few files (the device tool caps their count) whatever step it
# stopped at. The 'sweep-json' and 'logs' steps are kept for old command lines; they do nothing more.
# clocks.log: the GPU's SM / memory clocks, power, temperature and throttle reasons every 200 ms
# of the call (is a step slower in the whole kernel than its phases alone because the clocks drop
# under the sustained load?); it goes into logs.tgz with the rest
CLOCKS_PID=
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 > "$OUT/clocks.log" 2>&1 &
  CLOCKS_PID=$!
fi
FINALIZED=
finalize() {
  [[ -n $FINALIZED ]] && return; FINALIZED=1
  [[ -n $CLOCKS_PID ]] && kill "$CLOCKS_PID" 2>/dev/null && wait "$CLOCKS_PID" 2>/dev/null
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
files = sorted(glob.glob(out + "/var-*.json"))
if files:
    path = out + "/sweep.json"
    sweep = json.load(open(path)) if os.path.exists(path) else {}
    for f in files:
        try:
            sweep[os.path.basename(f)[4:-5]] = json.load(open(f))
        except ValueError:
            continue            # a variant killed while writing its JSON: its log says so
    json.dump(sweep, open(path, "w"), indent=1)
    for f in files:
        os.remove(f)
PY
  (cd "$OUT" && if compgen -G "*.log" >/dev/null; then tar czf logs.tgz *.log && rm -f *.log; fi)
}
trap finalize EXIT
trap 'exit 143' TERM INT
step() {   # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local left=$(( END - $(date +%s) ))
  if (( left < 20 )); then echo "=== $name skipped: ${left}s left" | tee -a "$OUT/steps.log"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, $(date +%T)): $*" | tee -a "$OUT/steps.log"
  if [[ $DRY == 1 && $1 != tilecomp && ! ( $1 == python3 && ${2:-} == -m && ${3:-} == tilecomp.bench.tokens ) ]]; then
    echo "=== $name skipped (DRY=1: needs the GPU machine)" | tee -a "$OUT/steps.log"; return
  fi
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}
# variant NAME LAYERS BLOCK [bench flags...]: the megakernel alone on a flash-shaped step
variant() {
  local name=$1 layers=$2 block=$3; shift 3
  step "var-$name" 150 tilecomp bench --preset mimo-v2-flash --layers "$layers" --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --eager-iters 1 --iters 30 --json "$OUT/var-$name.json" "$@"
}
# ab NAME LAYERS BLOCK FLAGS...: an interleaved A/B on a flash-shaped step (tilecomp bench
# --ab-tile / --ab-lower: the defaults against the defaults plus FLAGS, alternating steps, the
# per-pair difference with a 95% interval), e.g. 'ab flat 8 8 --ab-tile XFLAT=1'; 60 pairs
ab() {
  local name=$1 layers=$2 block=$3; shift 3
  step "ab-$name" 200 tilecomp bench --preset mimo-v2-flash --layers "$layers" --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --skip-megakernel --eager-iters 1 --iters 60 --json "$OUT/var-ab-$name.json" "$@"
}
# sab NAME BLOCK FLAGS...: the same interleaved A/B on the small preset's step (context 4096), e.g.
# 'sab q0 1 --ab-tile QKV_LOOP=0'
sab() {
  local name=$1 block=$2; shift 2
  step "sab-$name" 200 tilecomp bench --preset small --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --skip-megakernel --eager-iters 1 --iters 60 --json "$OUT/var-sab-$name.json" "$@"
}
# svar NAME BLOCK [bench flags...]: the megakernel alone on the small preset's step (context 4096)
svar() {
  local name=$1 block=$2; shift 2
  step "svar-$name" 120 tilecomp bench --preset small --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --eager-iters 1 --iters 100 --json "$OUT/var-small-$name.json" "$@"
}
# tokensv NAME [tokens flags...]: tokens-tiny (bf16 greedy tokens against the reference) under a
# variant's --tile / --lower flags, e.g. 'tokensv mx6 --tile MX_DOT=6'
tokensv() {
  local name=$1; shift
  step "tokens-$name" 110 python3 -m tilecomp.bench.tokens --preset tiny --prompts 3 --new-tokens 16 \
    --json "$OUT/tokens-tiny-$name.json" "$@"
}
# tokensc NAME [tokens flags...]: the same check on the shipped model (examples/model: its trained
# target and draft, prompts from held-out stdlib files), e.g. 'tokensc v17' or 'tokensc v15 --tile AFRAG=0'
tokensc() {
  local name=$1; shift
  step "tokensc-$name" 200 python3 -m tilecomp.bench.tokens --checkpoint examples/model --prompts 8 --new-tokens 32 \
    --json "$OUT/tokens-shipped-$name.json" "$@"
}
# phasesv NAME BLOCK [bench flags...]: --phases of the flash 2-layer step under a variant's flags
phasesv() {
  local name=$1 block=$2; shift 2
  step "phases-$name" 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --eager-iters 1 --iters 20 --phases --json "$OUT/flash2-b$block-phases-$name.json" "$@"
}
# benchv NAME PRESET LAYERS BLOCK [bench flags...]: the full bench (eager and torch.compile in the
# same run) under a variant's flags, e.g. 'benchv flash8-b8-noinline mimo-v2-flash 8 8 --tile NOINLINE=1'
benchv() {
  local name=$1 preset=$2 layers=$3 block=$4; shift 4
  step "bench-$name" 540 tilecomp bench --preset "$preset" --layers "$layers" --context 4096 --block "$block" \
    --skip-bf16 --eager-iters 5 --iters 30 --json "$OUT/$name.json" "$@"
}
# tracev NAME PRESET LAYERS BLOCK [bench flags...]: per-task timers of one step (--trace: wait and
# work per kind, kind switches against repeats), e.g. 'tracev small-b1 small 8 1'
tracev() {
  local name=$1 preset=$2 layers=$3 block=$4; shift 4
  step "trace-$name" 150 tilecomp bench --preset "$preset" --layers "$layers" --context 4096 --block "$block" \
    --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --trace --json "$OUT/trace-$name.json" "$@"
}
# pick BASE[,BASE...] CAND[,CAND...] TOKENS_JSON FLAGS...: when every var-CAND run timed below every
# var-BASE run by 0.5% and the tokens check
# TOKENS_JSON (a tokensv run under the same flags) found no unexplained divergence, the bench-*
# steps after it run with FLAGS (their JSON records the tiles); e.g.
#   'var base 8 8' 'var af 8 8 --tile AFRAG=1' 'tokensv af --tile AFRAG=1' 'pick base af tokens-tiny-af --tile AFRAG=1' bench-flash-8
BENCH_FLAGS=()
pick() {
  local base=$1 cand=$2 tok=$3; shift 3
  if python3 - "$OUT" "$base" "$cand" "$tok" <<'PY'
import json, sys
out, bases, cand, tok = sys.argv[1:]
ms = lambda n: json.load(open(f"{out}/var-{n}.json"))["results"]["megakernel"]["median_ms"]
b, c = {n: ms(n) for n in bases.split(",")}, {n: ms(n) for n in cand.split(",")}
summary = json.load(open(f"{out}/{tok}.json"))["summary"]      # tilecomp.bench.tokens: one part per mode
u = sum(part["unexplained"] for part in summary.values() if isinstance(part, dict))
# a win must clear the noise: every candidate run below every base run by 0.5% (30-step medians
# of the same defaults on one machine moved 0.01-0.07 ms at 8.6 ms in session 19); smaller levers
# need the interleaved A/B ('ab' steps)
margin = 0.005 * min(b.values())
won = max(c.values()) < min(b.values()) - margin
print(f"pick: bases {b} ms, candidate runs {c} ms, margin {margin:.3f} ms, "
      f"unexplained token divergences {u}: {'picked' if won and u == 0 else 'not picked'}")
sys.exit(0 if won and u == 0 else 1)
PY
  then BENCH_FLAGS=("$@"); fi
  echo "=== pick $base/$cand: bench flags now: ${BENCH_FLAGS[*]:-(defaults)}" | tee -a "$OUT/steps.log"
}
# abpick AB TOKENS_JSON FLAGS...: as pick, from an interleaved A/B ('ab AB ...' earlier in the call):
# when its 95% interval of B - A lies below 0 and the tokens check TOKENS_JSON (a tokensv run under
# the same flags) found no unexplained divergence, the bench-* steps after it run with FLAGS (else
# they are skipped: the call's time goes to its other steps); e.g.
#   'ab span 8 8 --ab-lower qkv_span=128' 'tokensv span --lower qkv_span=128'
#   'abpick span tokens-tiny-span --lower qkv_span=128' bench-flash-8
abpick() {
  local ab=$1 tok=$2; shift 2
  if python3 - "$OUT" "$ab" "$tok" <<'PY'
import json, sys
out, ab, tok = sys.argv[1:]
try:
    r = json.load(open(f"{out}/var-ab-{ab}.json"))["ab"]
    summary = json.load(open(f"{out}/{tok}.json"))["summary"]
except (OSError, ValueError, KeyError) as e:      # a step that did not finish (or DRY=1)
    print(f"abpick: {ab}: no A/B or tokens result ({e}): not picked")
    sys.exit(1)
u = sum(part["unexplained"] for part in summary.values() if isinstance(part, dict))
lo, hi = r["diff_ci95_ms"]
won = hi < 0
print(f"abpick: {ab}: B - A {r['diff_median_ms']:+.3f} ms, 95% interval [{lo:+.3f}, {hi:+.3f}], "
      f"unexplained token divergences {u}: {'picked' if won and u == 0 else 'not picked'}")
sys.exit(0 if won and u == 0 else 1)
PY
  then BENCH_FLAGS=("$@"); else BENCH_SKIP=1; fi
  echo "=== abpick $ab: bench flags now: ${BENCH_FLAGS[*]:-(defaults)}${BENCH_SKIP:+; not picked: the bench-* steps after it are skipped}" | tee -a "$OUT/steps.log"
}
BENCH_SKIP=
for s in "$@"; do
  if [[ $s == bench-* && -n $BENCH_SKIP ]]; then echo "=== $s skipped (abpick: not picked)" | tee -a "$OUT/steps.log"; continue; fi
  case $s in
    var\ *) variant ${s#var } ;;    # e.g. 'var b8-p264 2 8 --programs 264'
    ab\ *) ab ${s#ab } ;;          # e.g. 'ab flat 8 8 --ab-tile XFLAT=1'
    svar\ *) svar ${s#svar } ;;     # e.g. 'svar fold 1 --lower fold_reduce=1'
    phasesv\ *) phasesv ${s#phasesv } ;;   # e.g. 'phasesv l2pf0 8 --tile L2PF=0'
    tokensv\ *) tokensv ${s#tokensv } ;;   # e.g. 'tokensv mx6 --tile MX_DOT=6'
    tokensc\ *) tokensc ${s#tokensc } ;;   # e.g. 'tokensc v15 --tile AFRAG=0'
    benchv\ *) benchv ${s#benchv } ;;
    sab\ *) sab ${s#sab } ;;             # e.g. 'sab q0 1 --ab-tile QKV_LOOP=0'
    tracev\ *) tracev ${s#tracev } ;;     # e.g. 'tracev small-b1 small 8 1'
    pick\ *) pick ${s#pick } ;;
    flags\ *) read -r -a BENCH_FLAGS <<< "${s#flags }"   # e.g. 'flags --tile XTILE=1': the bench-* steps after it run with these flags
               echo "=== flags: bench flags now: ${BENCH_FLAGS[*]}" | tee -a "$OUT/steps.log" ;;
    abpick\ *) abpick ${s#abpick } ;;   # e.g. 'abpick span tokens-tiny-span --lower qkv_span=128'
    sweep-json|logs) ;;     # finalize does both at the end of the call
    install) step install 120 python3 -m pip install --no-deps --no-build-isolation -e . ;;
    env) step env 60 python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" ;;
    tokens-tiny) step tokens-tiny 110 python3 -m tilecomp.bench.tokens --preset tiny --prompts 3 --new-tokens 16 --json "$OUT/tokens-tiny.json" ;;
    tokens-small) step tokens-small 420 python3 -m tilecomp.bench.tokens --preset small --prompts 12 --new-tokens 32 --json "$OUT/tokens-small.json" ;;
    bench-small-8) step bench-small-8 300 tilecomp bench --preset small --context 4096 --block 8 --skip-bf16 --eager-iters 5 --iters 100 --json "$OUT/small-ctx4096-b8.json" "${BENCH_FLAGS[@]}" ;;
    bench-small-1) step bench-small-1 300 tilecomp bench --preset small --context 4096 --block 1 --skip-bf16 --eager-iters 5 --iters 100 --json "$OUT/small-ctx4096-b1.json" "${BENCH_FLAGS[@]}" ;;
    bench-flash-8) step bench-flash-8 540 tilecomp bench --preset mimo-v2-flash --layers 8 --context 4096 --block 8 --eager-iters 5 --iters 100 --json "$OUT/flash8-ctx4096-b8.json" "${BENCH_FLAGS[@]}" ;;
    bench-flash-1) step bench-flash-1 240 tilecomp bench --preset mimo-v2-flash --layers 8 --context 4096 --block 1 --skip-bf16 --eager-iters 5 --iters 100 --json "$OUT/flash8-ctx4096-b1.json" "${BENCH_FLAGS[@]}" ;;
    # version-1 levers on a 2-layer flash step, each with per-task timers (docs/PERF.md)
    trace-v1) step trace-v1 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 1 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --trace --json "$OUT/flash2-b1-v1.json" ;;
    trace-stages1) step trace-stages1 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 1 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --trace --tile STAGES=1 --json "$OUT/flash2-b1-stages1.json" ;;
    trace-warps8) step trace-warps8 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 1 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --trace --num-warps 8 --json "$OUT/flash2-b1-warps8.json" ;;
    trace-k128) step trace-k128 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 1 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --trace --tile BLOCK_K=128 --json "$OUT/flash2-b1-k128.json" ;;
    # each task kind alone (docs/PERF.md version 5), flash 2 layers, block 8 / 1
    phases-8) step phases-8 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 8 --skip-compile --skip-bf16 --eager-iters 1 --iters 20 --phases --json "$OUT/flash2-b8-phases.json" ;;
    phases-1) step phases-1 200 tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 1 --skip-compile --skip-bf16 --eager-iters 1 --iters 20 --phases --json "$OUT/flash2-b1-phases.json" ;;
    # 'ncu KIND [bench flags...]': Nsight Compute of one phase in its own kernel (flash 2L block 8),
    # e.g. 'ncu expert_down' or 'ncu linear --tile NORM_F32=1'; 'ncum KIND ...': the same phase
    # inside the whole megakernel (the kernel generation runs)
    ncu\ *|ncum\ *) read -r -a a <<< "${s#* }"; k=${a[0]}; tag=$(printf '%s' "${a[*]:1}" | tr -c 'A-Za-z0-9' '_')
              range="phase_${k}_alone/"; [[ $s == ncum* ]] && range="phase_${k}/"
              step "${s%% *}-$k${tag:+-$tag}" 200 /usr/local/cuda/bin/ncu --nvtx --nvtx-include "$range" --launch-count 1 \
              --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
              --section LaunchStats --section Occupancy \
              tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 8 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --phases "${a[@]:1}" ;;
    # 'ncusrc KIND': the same phase's per-instruction and per-line counters (bench/ncu_source.py)
    ncusrc\ *) k=${s#ncusrc }; step "ncusrc-$k" 200 /usr/local/cuda/bin/ncu --nvtx --nvtx-include "phase_${k}_alone/" --launch-count 1 \
              --section SourceCounters --section WarpStateStats --import-source yes -f -o "$OUT/ncu-$k" \
              tilecomp bench --preset mimo-v2-flash --layers 2 --context 4096 --block 8 --skip-compile --skip-bf16 --eager-iters 1 --iters 5 --phases
              for p in sass cuda; do
                step "ncusrc-$k-$p" 120 bash -c "/usr/local/cuda/bin/ncu -i '$OUT/ncu-$k.ncu-rep' --page source --csv --print-source $p > '$OUT/src-$k-$p.csv' && python3 bench/ncu_source.py \$([ $p = sass ] && echo --stalls) '$OUT/src-$k-$p.csv'"
              done
              rm -f "$OUT/ncu-$k.ncu-rep" "$OUT/src-$k-"*.csv ;;
    # 'ncustep NAME PRESET LAYERS BLOCK [bench flags...]': Nsight Compute of ONE whole step kernel
    # (decode_step, the 4th launch) with its stall reasons summed over every instruction
    # (bench/ncu_source.py --stalls): e.g. 'ncustep small-b1 small 8 1' for the share of
    # 'no instruction' stalls (the SM waiting for code) against memory and math
    ncustep\ *) read -r -a a <<< "${s#ncustep }"; n=${a[0]}; pr=${a[1]}; ly=${a[2]}; bl=${a[3]}
              step "ncustep-$n" 240 /usr/local/cuda/bin/ncu --kernel-name decode_step --launch-skip 3 --launch-count 1 \
              --section SourceCounters --section WarpStateStats --import-source no -f -o "$OUT/ncu-step-$n" \
              tilecomp bench --preset "$pr" --layers "$ly" --context 4096 --block "$bl" --skip-compile --skip-bf16 \
              --eager-iters 1 --iters 5 "${a[@]:4}"
              step "ncustep-$n-sass" 120 bash -c "/usr/local/cuda/bin/ncu -i '$OUT/ncu-step-$n.ncu-rep' --page source --csv --print-source sass > '$OUT/src-step-$n.csv' && python3 bench/ncu_source.py --stalls '$OUT/src-step-$n.csv'"
              rm -f "$OUT/ncu-step-$n.ncu-rep" "$OUT/src-step-$n.csv" ;;
    # the shipped example model (examples/model): the step at context 1024, block 8, with tokens/s
    # at its measured acceptance (16 held-out stdlib prompts x 128 greedy tokens, megakernel engine)
    bench-shipped) step bench-shipped 300 tilecomp bench --checkpoint examples/model --context 1024 --block 8 --skip-bf16 --eager-iters 5 --iters 100 --acceptance-prompts 16 --json "$OUT/shipped-ctx1024-b8.json" ;;
    baseline) step baseline 300 python3 .device/compile_baseline.py mxfp4 8 4096 ;;
    generate) step generate 300 bash -c 'tilecomp generate --engine megakernel --prompt "def fibonacci(n):" --max-new-tokens 128 --json && tilecomp generate --engine megakernel --no-draft --prompt "def fibonacci(n):" --max-new-tokens 128 --json && tilecomp generate --engine reference --prompt "def fibonacci(n):" --max-new-tokens 128 --json' ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
