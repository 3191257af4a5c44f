"""bench/ws_probe.py on the pinned Triton (3.8): Hopper warp specialization of a GEMV loop is
there with the weights as wgmma's left operand at 4 warps, and gone as soon as a data-dependent
`if` (a megakernel's kind dispatch) shares the loop's body. docs/PERF.md version 7 builds on this.
The probe compiles for sm_90, which the interpreter-patched language of the tests cannot: it runs
in a subprocess without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ws_probe import probe
print(json.dumps([probe(s, left) for s, left in (("persistent", True), ("runtime-trip", True),
                                                  ("branch", True), ("persistent", False))]))
"""


@pytest.mark.skipif(not triton.__version__.startswith("3.8"), reason="the finding is Triton 3.8's")
def test_warp_specialization_needs_weights_left_and_no_branch():
    bench = Path(__file__).resolve().parents[2] / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(bench)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    regions = [r["warp_specialize_regions"] for r in json.loads(out.stdout.strip().splitlines()[-1])]
    assert regions == [1, 1, 0, 0]
