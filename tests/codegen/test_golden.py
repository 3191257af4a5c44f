"""Golden files pin the generated source (regenerate: TILECOMP_UPDATE_GOLDEN=1 pytest tests/codegen)."""
import ast
import os
import re
from pathlib import Path

import pytest

from tilecomp.codegen import layout as L
from tilecomp.codegen.triton_gen import generate_kernel
from tilecomp.codegen.kernels import ENGINE_KINDS as KINDS

GOLDEN = Path(__file__).parent / "golden"
FRAME_KINDS = ["embed", "linear", "accept"]
CONSTS = dict(BLOCK_T=16, BLOCK_D=64, BLOCK_N=64, BLOCK_K=64)


@pytest.mark.parametrize("name", ["decode_step", "prefill_chunk"])
def test_frame_source_matches_golden(name):
    source = generate_kernel(FRAME_KINDS, name=name, constexprs=CONSTS)
    path = GOLDEN / f"{name}.py"
    if os.environ.get("TILECOMP_UPDATE_GOLDEN") == "1":
        path.write_text(source)
    assert source == path.read_text(), f"generated {name} differs from {path}"


def test_engine_kernel_is_one_jit_with_one_commented_branch_per_kind_in_order():
    """One kernel; each kind's compute is a module-level body function, jitted twice (inlined,
    and a noinline device function for NOINLINE 1), called from that kind's branch only."""
    source = generate_kernel(KINDS, name="decode_step")
    tree = ast.parse(source)
    functions = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
    own = {"linear", "qkv_rope_kv", "lm_head"}     # kinds with a prefetch: a scalar-args copy runs it
    assert functions == [n for k in KINDS for n in [f"_{k}_body"] + ([f"_{k}_own_body"] if k in own else [])
                         ] + ["decode_step"]
    assert source.count("@triton.jit") == 1
    for k in KINDS:
        assert source.count(f"_{k} = triton.jit(_{k}_body)") == 1
        noinline = f"_{k}_own_body" if k in own else f"_{k}_body"
        assert source.count(f"_{k}_noinline = triton.jit(noinline=True)({noinline})") == 1
        branch = source.split(f"  # {k}\n", 1)[1].split("elif kind ==", 1)[0]
        assert f"_{k}_noinline(" in branch and f"_{k}(" in branch
    branches = re.findall(r"^        (?:el)?if kind == (\d+):  # (\w+)$", source, re.M)
    assert [(int(i), k) for i, k in branches] == [(L.KIND_IDS[k], k) for k in KINDS]
    frame = source.split("\ndef decode_step(", 1)[1]
    assert frame.count("sem=\"acquire\"") == 2 * len(KINDS)   # first poll + spin, per branch
    assert frame.count("sem=\"release\"") == 1
    # the bodies' own: expert_down's per-slot wait (XQUEUE) and up_gate's per-slot count
    bodies = source.split("\ndef decode_step(", 1)[0]
    assert bodies.count("sem=\"acquire\"") == 2 and bodies.count("sem=\"release\"") == 1
    assert frame.count("body_status = _expert_down") == 2 and "body_status" not in frame.split("# expert_down\n")[0]


@pytest.mark.parametrize("kind,first_weight", [("linear", "ln_w = tl.load(arena_w"),
                                               ("lm_head", "lm_w = tl.load(arena_w")])
def test_weight_loads_are_issued_before_the_wait(kind, first_weight):
    source = generate_kernel(KINDS, name="decode_step")
    branch = source.split(f"  # {kind}\n", 1)[1].split("elif kind ==", 1)[0]
    assert branch.index(first_weight) < branch.index('sem="acquire"')


def test_compute_function_parameters_and_undeclared_frame_names():
    """A kind's compute function takes the arenas and record args it reads, the prefetch locals
    (inlined form only) and its constexprs; a body reading any other frame name is refused."""
    from tilecomp.codegen.triton_gen import Body, body_params
    abi = L.kind_abi("linear")
    body = Body("ln_k = tl.arange(0, BLOCK_K)", "y = tl.load(arena_f32 + r_x + ln_k)\nz = y * WALIGN")
    assert body_params(abi, body) == (["arena_f32", "r_x", "ln_k"], ["WALIGN"])
    own = Body("", body.prefetch + "\n" + body.compute)
    assert body_params(abi, own) == (["arena_f32", "r_x"], ["BLOCK_K", "WALIGN"])
    with pytest.raises(Exception, match=r"reads \['qi'\]"):
        body_params(abi, Body("", "y = tl.load(arena_f32 + qi)"))
