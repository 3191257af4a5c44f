"""qkv_rope_kv's two chunk loops (QKV_LOOP 0: a K loop per chunk kind and matrix; 1: one loop
over (matrix, chunk)) against torch, for the task splits the lowering makes of a KV group.

Shape legend: T rows, D hidden, H query heads, G KV heads, hd / vd q-k / v head dims.
"""
import pytest
import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.harness import run_tasks
from tilecomp.codegen.layout import TaskRecord, float_bits
from tilecomp.models.mimo import apply_rope
from tilecomp.passes.lower import LowerOptions
from tilecomp.passes.lower_attn import _qkv_row_parts
from tilecomp.runtime.buffers import ArenaBuilder

D, RING, POS, THETA, V_SCALE = 48, 11, 9, 10000.0, 0.5     # POS + T > RING: the slots wrap
NAN = float("nan")                                       # never-written outputs stay NaN


def task_args(kv_head, part, b):
    """Record args of one (first q head, q heads, "k"/"v"/"kv"/"", rope_part, rows, ranged) part,
    as passes/lower_attn.py lower_qkv writes them."""
    h0, nq, kv, rope_part, (r0, r1), ranged = part
    args = dict(head=kv_head, q_head0=h0, q_heads=nq, rope_part=rope_part,
                wq=b.offset("wq") if nq else -1, q_out=b.offset("q") if nq else -1,
                wk=b.offset("wk") if "k" in kv else -1, k_cache=b.offset("kc") if "k" in kv else -1,
                wv=b.offset("wv") if "v" in kv else -1, v_cache=b.offset("vc") if "v" in kv else -1)
    return dict(args, row0=r0, row1=r1) if ranged else args


def run_qkv(loop, parts, *, T, H, G, hd, vd, rope, count=None, tiles):
    """Run every part of every KV head in one program (H 0: the draft's context K/V, no q) ->
    (got, want, slots): got q [T, H, hd] / k cache [G, RING, hd] / v cache [G, RING, vd], the torch
    values of the rows that must be written (want q [n, H, hd], k / v [G, n, d]) and their slots."""
    g = torch.Generator().manual_seed(11 + hd + rope)
    x = torch.randn(T, D, generator=g)
    wq, wk, wv = (torch.randn(n, D, generator=g) for n in (max(H, 1) * hd, G * hd, G * vd))
    gain = torch.rand(D, generator=g) + 0.5
    b = ArenaBuilder(torch.float32)
    for name, t in dict(wq=wq, wk=wk, wv=wv).items():
        b.add(name, t, "w")
    b.add("g", gain, L.norm_arena({}))
    b.add("x", x, "f32")
    b.add("pos", torch.tensor([POS, count if count is not None else T], dtype=torch.int32), "i32")
    b.add("kc", torch.full((G, RING, hd), NAN), "w"), b.add("vc", torch.full((G, RING, vd), NAN), "w")
    b.add("q", torch.full((T, max(H, 1) * hd), NAN), "f32")
    arenas = b.build()
    common = dict(x=b.offset("x"), x_stride=D, norm=b.offset("g"), eps_bits=float_bits(1e-5),
                  n_heads_q=H, n_kv_heads=G, head_dim=hd, v_head_dim=vd, rope_dim=rope,
                  theta_bits=float_bits(THETA), v_scale_bits=float_bits(V_SCALE), dim=D,
                  pos=b.offset("pos"), ring=RING, n_rows=T,
                  rows=b.offset("pos") + 1 if count is not None else -1)
    recs = [TaskRecord("qkv_rope_kv", len(parts) * h + i, dict(common, **task_args(h, p, b)))
            for h in range(G) for i, p in enumerate(parts)]
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_K=32, QKV_LOOP=loop, **tiles))
    n = count if count is not None else T
    h = x[:n] * torch.rsqrt(x[:n].pow(2).mean(-1, keepdim=True) + 1e-5) * gain
    p = torch.arange(POS, POS + n)
    want = dict(q=apply_rope((h @ wq.T).view(n, -1, hd).transpose(0, 1)[None], p, rope, THETA)[0].transpose(0, 1),
                k=apply_rope((h @ wk.T).view(n, G, hd).transpose(0, 1)[None], p, rope, THETA)[0],
                v=(h @ wv.T).view(n, G, vd).transpose(0, 1) * V_SCALE)
    got = dict(q=arenas.view("q").view(T, -1, hd), k=arenas.view("kc"), v=arenas.view("vc"))
    return got, want, p % RING


CASES = [
    # H, G, hd, vd, rope, LowerOptions fields, tiles, rows counted below T
    pytest.param(4, 2, 40, 24, 8, {}, dict(BLOCK_R=16, BLOCK_N=32), None,
                 id="whole-group-BLOCK_R<BLOCK_N"),
    pytest.param(4, 2, 40, 24, 8, dict(qkv_q_heads=1), dict(BLOCK_R=32, BLOCK_N=16), 3,
                 id="q-head-k-v-tasks-BLOCK_R>BLOCK_N-counted-rows"),
    pytest.param(4, 2, 40, 24, 8, dict(qkv_q_heads=1, qkv_split_rope=1), dict(BLOCK_R=16, BLOCK_N=16), None,
                 id="split-rope"),
    pytest.param(4, 2, 40, 24, 8, dict(qkv_q_heads=1, qkv_rows=16), dict(BLOCK_R=16, BLOCK_N=32), None,
                 id="qkv-rows-16"),
    pytest.param(6, 2, 40, 24, 8, dict(qkv_q_heads=2, qkv_split_kv=0), dict(BLOCK_R=32, BLOCK_N=16), None,
                 id="q-head-pairs-from-q_head0-kv-task"),
    pytest.param(0, 2, 16, 16, 16, dict(qkv_q_heads=1), dict(BLOCK_R=16, BLOCK_N=16), None,
                 id="draft-context-kv-all-rotary"),
]


@pytest.mark.parametrize("H,G,hd,vd,rope,lower,tiles,count", CASES)
def test_both_chunk_loops_match_torch_and_each_other(H, G, hd, vd, rope, lower, tiles, count):
    T = 5
    parts = _qkv_row_parts(max(H // G, 1), hd, vd, rope, LowerOptions(**lower)) if H else \
        [(0, 0, kv, 0, (0, hd), False) for kv in ("k", "v")]      # the draft's context K/V tasks
    out = {}
    for loop in (0, 1):
        got, want, slots = run_qkv(loop, parts, T=T, H=H, G=G, hd=hd, vd=vd, rope=rope, count=count,
                                   tiles=tiles)
        n = count if count is not None else T
        tol = dict(rtol=1e-4, atol=1e-4)
        if H:
            torch.testing.assert_close(got["q"][:n], want["q"], **tol, msg=f"QKV_LOOP {loop}: q")
            assert got["q"][n:].isnan().all(), f"QKV_LOOP {loop}: rows past the count written"
        torch.testing.assert_close(got["k"][:, slots], want["k"], **tol, msg=f"QKV_LOOP {loop}: k")
        torch.testing.assert_close(got["v"][:, slots], want["v"], **tol, msg=f"QKV_LOOP {loop}: v")
        others = torch.ones(RING, dtype=torch.bool)
        others[slots] = False
        assert got["k"][:, others].isnan().all() and got["v"][:, others].isnan().all()
        out[loop] = {k: t.clone() for k, t in got.items()}
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=1e-6, atol=1e-6, equal_nan=True)
