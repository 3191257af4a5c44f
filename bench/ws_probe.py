"""Does Triton warp-specialize a weight-streaming loop on Hopper? A CPU probe (no GPU needed).

Builds small GEMV kernels (weights [N, K] bf16 times 16 token rows) for sm_90 and counts the
`ttg.warp_specialize` regions (producer / consumer partitions) in their TTGIR, for the loop
shapes a megakernel could use:

  plain        one GEMV tile per program, `tl.range(..., warp_specialize=True)`
  persistent   the same loop inside a persistent loop over tasks
  branch       ... with a data-dependent `if` (a kind dispatch) in the persistent loop body
  runtime-trip ... with a data-dependent trip count instead of the `if` (masked store)

Each with the weights as the dot's left operand (rows = M, Hopper wgmma, TMA tensor
descriptors) or right operand (tokens = M = 16: mma.sync, as the megakernel's loops are).

    python3 bench/ws_probe.py            # one line per variant
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _gemv(w_ptr, x_ptr, y_ptr, kinds_ptr, ntasks, N, K, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
          SHAPE: tl.constexpr, LEFT: tl.constexpr):
    pid = tl.program_id(0)
    wd = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    xd = tl.make_tensor_descriptor(x_ptr, shape=[BT, K], strides=[K, 1], block_shape=[BT, BK])
    first = pid if SHAPE != 0 else 0
    last = ntasks if SHAPE != 0 else 1
    step = tl.num_programs(0) if SHAPE != 0 else 1
    for task in range(first, last, step):
        kind = tl.load(kinds_ptr + task)
        kend = tl.where(kind == 1, K, 0) if SHAPE == 3 else K
        if LEFT:
            acc = tl.zeros([BN, BT], tl.float32)
        else:
            acc = tl.zeros([BT, BN], tl.float32)
        for kb in tl.range(0, kend, BK, num_stages=4, warp_specialize=True):
            w = wd.load([task * BN, kb])
            x = xd.load([0, kb])
            if LEFT:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        n = task * BN + tl.arange(0, BN)
        t = tl.arange(0, BT)
        if LEFT:
            acc = tl.trans(acc)
        if SHAPE == 2:
            if kind == 1:
                tl.store(y_ptr + t[:, None] * N + n[None, :], acc)
            else:
                tl.store(y_ptr + t, tl.load(y_ptr + BT + t) * 2.0)
        else:
            tl.store(y_ptr + t[:, None] * N + n[None, :], acc, mask=(kind == 1) | (SHAPE != 3))


SHAPES = {"plain": 0, "persistent": 1, "branch": 2, "runtime-trip": 3}


def probe(shape: str, left: bool, num_warps: int = 4, block_n: int = 128) -> dict:
    sig = {"w_ptr": "*bf16", "x_ptr": "*bf16", "y_ptr": "*fp32", "kinds_ptr": "*i32", "ntasks": "i32",
           "N": "i32", "K": "i32", "BN": "constexpr", "BK": "constexpr", "BT": "constexpr",
           "SHAPE": "constexpr", "LEFT": "constexpr"}
    src = ASTSource(_gemv, signature=sig, constexprs={"BN": block_n, "BK": 128, "BT": 16,
                                                       "SHAPE": SHAPES[shape], "LEFT": left})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ttgir = ck.asm["ttgir"]
    return {"shape": shape, "weights_left": left, "num_warps": num_warps,
            "warp_specialize_regions": ttgir.count("ttg.warp_specialize"),
            "wgmma": ttgir.count("warp_group_dot"), "shared_bytes": ck.metadata.shared}


def main() -> int:
    print(f"triton {triton.__version__}, sm_90")
    for shape in SHAPES:
        for left in (True, False):
            for warps in (4, 8):
                r = probe(shape, left, warps)
                print(f"{shape:<13} weights {'left ' if left else 'right'} {warps} warps: "
                      f"{r['warp_specialize_regions']} warp_specialize region(s), {r['wgmma']} wgmma ops, "
                      f"{r['shared_bytes'] // 1024} KB shared")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
