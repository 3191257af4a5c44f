"""attn_partial + attn_reduce bodies against a torch reference (CPU interpreter).

Each body runs inside a tiny standalone @triton.jit wrapper whose grid walks
the tasks the lowering emits: one program per (kv head, chunk), then one per
kv head for the reduce.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from tilecomp.codegen.tasks.attention import attn_partial_tile, attn_reduce_tile
from tilecomp.codegen.tasks.tile_math import MM_DOT_F32, MM_SUM


@triton.jit
def _partial_kernel(q, k, v, m, l, acc, start, sm_scale, T: tl.constexpr, REP: tl.constexpr,
                    DQK: tl.constexpr, DV: tl.constexpr, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                    RING: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
                    CHUNK: tl.constexpr, NCHUNK: tl.constexpr, BR: tl.constexpr,
                    BDQK: tl.constexpr, BDV: tl.constexpr, BLOCK_N: tl.constexpr, MM: tl.constexpr):
    pid = tl.program_id(0)
    attn_partial_tile(q, k, v, m, l, acc, pid // NCHUNK, pid % NCHUNK, start, sm_scale,
                      T, REP, DQK, DV, N_HEADS, N_KV * DQK, DQK, N_KV * DV, DV, RING,
                      WINDOW, CAUSAL, CHUNK, NCHUNK, BR, BDQK, BDV, BLOCK_N, MM)


@triton.jit
def _reduce_kernel(m, l, acc, sink, o, start, T: tl.constexpr, REP: tl.constexpr,
                   DV: tl.constexpr, N_HEADS: tl.constexpr, WINDOW: tl.constexpr,
                   CHUNK: tl.constexpr, NCHUNK: tl.constexpr, HAS_SINK: tl.constexpr,
                   BR: tl.constexpr, BDV: tl.constexpr):
    attn_reduce_tile(m, l, acc, sink, o, tl.program_id(0), start, T, REP, DV, N_HEADS,
                     WINDOW, CHUNK, NCHUNK, HAS_SINK, BR, BDV)


def reference_attention(q, k_pos, v_pos, start, window, causal, sink, sm_scale):
    """q [T, H, DQK]; k_pos/v_pos [L, KVH, D] indexed by absolute position
    (L = start + T); sink [H] or None -> o [T, H, DV] (fp64 math)."""
    T, H, _ = q.shape
    L, kvh, _ = k_pos.shape
    rep = H // kvh
    k = k_pos.double().repeat_interleave(rep, dim=1)                   # [L, H, DQK]
    v = v_pos.double().repeat_interleave(rep, dim=1)
    s = torch.einsum("thd,lhd->htl", q.double(), k) * sm_scale          # [H, T, L]
    qpos = start + torch.arange(T)[:, None]
    j = torch.arange(L)[None, :]
    vis = j < start + T
    if causal:
        vis = vis & (j <= qpos)
    if window:
        vis = vis & (j >= qpos - window)
    s = s.masked_fill(~vis, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.double()[:, None, None].expand(H, T, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :L]
    return torch.einsum("htl,lhd->thd", p, v)


def run_attention(q, k_pos, v_pos, start, *, window, causal, sink, chunk, block_n, ring, mm):
    T, H, DQK = q.shape
    L, KVH, DV = v_pos.shape
    rep = H // KVH
    # write the cache in ring layout: position j -> row j % ring
    k_cache = torch.full((ring, KVH, DQK), float("nan"))
    v_cache = torch.full((ring, KVH, DV), float("nan"))
    for j in range(max(0, L - ring), L):
        k_cache[j % ring] = k_pos[j]
        v_cache[j % ring] = v_pos[j]
    span = (window + T) if window else ring
    nchunk = triton.cdiv(span, chunk)
    R = T * rep
    m = torch.full((KVH * nchunk * R,), 7.0)       # garbage: every slot must be written
    l = torch.full_like(m, 7.0)
    acc = torch.full((KVH * nchunk * R * DV,), 7.0)
    o = torch.zeros(T, H * DV)
    sm_scale = 1.0 / math.sqrt(DQK)
    BR = max(16, triton.next_power_of_2(R)) if mm else triton.next_power_of_2(R)
    sizes = dict(BR=BR, BDQK=triton.next_power_of_2(DQK), BDV=triton.next_power_of_2(DV))
    _partial_kernel[(KVH * nchunk,)](
        q.reshape(T, -1), k_cache, v_cache, m, l, acc, start, sm_scale, T=T, REP=rep,
        DQK=DQK, DV=DV, N_HEADS=H, N_KV=KVH, RING=ring, WINDOW=window, CAUSAL=causal,
        CHUNK=chunk, NCHUNK=nchunk, BLOCK_N=block_n, MM=mm, **sizes)
    has_sink = sink is not None
    _reduce_kernel[(KVH,)](
        m, l, acc, sink if has_sink else o, o, start, T=T, REP=rep, DV=DV, N_HEADS=H,
        WINDOW=window, CHUNK=chunk, NCHUNK=nchunk, HAS_SINK=has_sink,
        BR=sizes["BR"], BDV=sizes["BDV"])
    return o.reshape(T, H, DV)


CASES = [
    # T, H, KVH, DQK, DV, start, window, causal, sink, chunk, block_n, ring
    pytest.param(8, 4, 2, 24, 16, 21, 0, True, False, 16, 8, 40, id="full-T8-multichunk"),
    pytest.param(1, 4, 2, 24, 16, 13, 0, True, False, 8, 8, 32, id="full-T1"),
    pytest.param(8, 4, 1, 24, 16, 30, 12, True, True, 8, 4, 20, id="swa-ring-crosswindow-sink"),
    pytest.param(8, 2, 2, 24, 16, 3, 12, True, True, 8, 8, 20, id="swa-short-context"),
    pytest.param(1, 4, 2, 24, 16, 37, 12, True, True, 8, 8, 13, id="swa-T1"),
    pytest.param(8, 4, 2, 24, 16, 25, 10, False, False, 8, 8, 18, id="draft-noncausal-window"),
    pytest.param(4, 8, 2, 12, 8, 0, 0, True, True, 16, 8, 16, id="start0-sink"),
]


@pytest.mark.parametrize("T,H,KVH,DQK,DV,start,window,causal,sink,chunk,block_n,ring", CASES)
def test_attention_matches_reference(T, H, KVH, DQK, DV, start, window, causal, sink, chunk,
                                     block_n, ring):
    gen = torch.Generator().manual_seed(1000 + start * 7 + T)
    L = start + T
    q = torch.randn(T, H, DQK, generator=gen)
    k_pos = torch.randn(L, KVH, DQK, generator=gen)
    v_pos = torch.randn(L, KVH, DV, generator=gen)
    sinks = torch.randn(H, generator=gen) if sink else None
    got = run_attention(q, k_pos, v_pos, start, window=window, causal=causal, sink=sinks,
                        chunk=chunk, block_n=block_n, ring=ring, mm=MM_SUM)
    want = reference_attention(q, k_pos, v_pos, start, window, causal, sinks, 1 / math.sqrt(DQK))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_attention_dot_path_mimo_head_dims():
    """q/k 192, v 128 (non-power-of-2 padded aranges), rows padded to 16 for tl.dot."""
    gen = torch.Generator().manual_seed(7)
    T, H, KVH, DQK, DV, start, window = 8, 4, 1, 192, 128, 19, 16
    L = start + T
    q = torch.randn(T, H, DQK, generator=gen)
    k_pos = torch.randn(L, KVH, DQK, generator=gen)
    v_pos = torch.randn(L, KVH, DV, generator=gen)
    sinks = torch.randn(H, generator=gen)
    got = run_attention(q, k_pos, v_pos, start, window=window, causal=True, sink=sinks,
                        chunk=16, block_n=16, ring=window + T, mm=MM_DOT_F32)
    want = reference_attention(q, k_pos, v_pos, start, window, True, sinks, 1 / math.sqrt(DQK))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_are_upcast():
    gen = torch.Generator().manual_seed(11)
    T, H, KVH, D, start = 8, 4, 2, 16, 9
    q = torch.randn(T, H, D, generator=gen).bfloat16()
    k_pos = torch.randn(start + T, KVH, D, generator=gen).bfloat16()
    v_pos = torch.randn(start + T, KVH, D, generator=gen).bfloat16()
    got = run_attention(q, k_pos, v_pos, start, window=0, causal=True, sink=None,
                        chunk=8, block_n=8, ring=32, mm=MM_SUM)
    want = reference_attention(q.float(), k_pos.float(), v_pos.float(), start, 0, True, None,
                               1 / math.sqrt(D))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
