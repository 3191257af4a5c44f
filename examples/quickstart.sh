#!/usr/bin/env bash
# The main job on a small built-in model, on CPU, in about a minute:
#   bash examples/quickstart.sh [WORKDIR]        (default: build/quickstart)
# 1. write a random `tiny` checkpoint (MiMo target + DFlash draft),
# 2. compile its DFlash decode step and write every IR stage,
# 3. generate with DFlash speculative decoding, then without the draft:
#    with greedy decoding both give the same tokens;
# 4. generate with the megakernel engine (one persistent-kernel launch per DFlash
#    step, the compiled schedule; on CPU it runs in Triton's interpreter, so
#    slowly) and check it gives the reference engine's tokens.
set -euo pipefail
WORK=${1:-build/quickstart}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}     # tiny model: one thread is fastest on CPU

tilecomp init --preset tiny --out "$WORK/model" --force
tilecomp compile --checkpoint "$WORK/model" --out "$WORK/compiled" --programs 4 --quiet
echo "IR stages written to $WORK/compiled:"; ls "$WORK/compiled"

echo "--- DFlash (reference engine), streaming:"
tilecomp generate --checkpoint "$WORK/model" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 32
echo "--- as JSON, with and without the draft:"
tilecomp generate --checkpoint "$WORK/model" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 32 --json \
    > "$WORK/dflash.json"
tilecomp generate --checkpoint "$WORK/model" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 32 --json \
    --no-draft > "$WORK/plain.json"
cat "$WORK/dflash.json" "$WORK/plain.json"
python3 - "$WORK/dflash.json" "$WORK/plain.json" <<'PY'
import json, sys
dflash, plain = (json.load(open(f)) for f in sys.argv[1:])
assert dflash["tokens"] == plain["tokens"], "DFlash output differs from plain greedy decoding"
print(f"same {len(plain['tokens'])} tokens with and without the draft; "
      f"mean acceptance {dflash['mean_acceptance']:.2f} tokens/step (random weights)")
PY

echo "--- megakernel engine (Triton interpreter on CPU: a few minutes):"
tilecomp generate --checkpoint "$WORK/model" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 8 --json \
    --engine megakernel > "$WORK/megakernel.json"
python3 - "$WORK/megakernel.json" "$WORK/dflash.json" <<'PY'
import json, sys
mk, ref = (json.load(open(f)) for f in sys.argv[1:])
n = len(mk["tokens"])
assert mk["tokens"] == ref["tokens"][:n], "megakernel tokens differ from the reference engine's"
print(f"megakernel engine: the reference engine's {n} tokens, {mk['tokens_per_s']:.2f} tokens/s")
PY
