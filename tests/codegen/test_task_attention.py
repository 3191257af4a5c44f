"""attn_partial + attn_reduce bodies, run through the megakernel frame on CPU.

One program runs every (kv head, chunk) partial, then each kv head's reduce,
which waits on the counter its head's partials signal. Causal cases compare
with models.mimo.attend (the reference); the draft (non-causal) form with
DFlash's visibility rule: every block key, context keys within the window.
"""
import math

import pytest
import torch
import triton

from tilecomp.codegen.harness import run_tasks
from tilecomp.codegen.layout import TaskRecord, float_bits
from tilecomp.models.mimo import attend
from tilecomp.runtime.buffers import ArenaBuilder


def draft_reference(q, k, v, start, window, sink, scale):
    """q [H, T, Dk], k/v [G, S, D] at positions 0..S-1 -> [H, T, Dv]; no causal mask."""
    T, S = q.shape[1], k.shape[1]
    rep = q.shape[0] // k.shape[0]
    s = q.double() @ k.double().repeat_interleave(rep, 0).transpose(-1, -2) * scale
    qpos, kpos = start + torch.arange(T)[:, None], torch.arange(S)[None, :]
    vis = kpos >= qpos - window if window else torch.ones(T, S, dtype=torch.bool)
    s = s.masked_fill(~vis, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.double()[:, None, None].expand(-1, T, 1)], dim=-1)
    return (s.softmax(-1)[..., :S] @ v.double().repeat_interleave(rep, 0)).float()


def attention_records(b, *, T, H, G, Dk, Dv, chunk, n_chunks, window, causal, ring, sink, scale,
                      reduce_heads=0):
    """reduce_heads > 0: each kv head's merge as tasks of that many query heads (h0 .. h1), as
    LowerOptions.reduce_rows lowers it (reduce_rows // n_rows heads); 0: one reduce per kv head without h0 / h1 (all heads)."""
    parts, reduces = [], []
    rep = H // G
    per = reduce_heads or rep
    common = dict(part_m=b.offset("m"), part_l=b.offset("l"), part_acc=b.offset("acc"),
                  n_heads_q=H, n_kv_heads=G, v_head_dim=Dv, n_rows=T)
    for g in range(G):
        for c in range(n_chunks):
            parts.append(TaskRecord("attn_partial", len(parts), dict(
                common, q=b.offset("q"), k_cache=b.offset("k"), v_cache=b.offset("v"), head=g,
                chunk=c, chunk_len=chunk, head_dim=Dk, window=window, causal=int(causal),
                pos=b.offset("pos"), ring=ring,
                scale_bits=float_bits(scale)), signals=[g]))
        for h0 in range(0, rep, per):
            heads = dict(h0=h0, h1=min(rep, h0 + per)) if reduce_heads else {}
            reduces.append(TaskRecord("attn_reduce", 1000 + len(reduces), dict(
                common, sink=b.offset("sink") if sink else -1, out=b.offset("out"), head=g,
                n_chunks=n_chunks, **heads), waits=[(g, n_chunks, n_chunks)]))
    return parts + reduces


def run_attention(q, k_pos, v_pos, start, *, window, causal, sink, chunk, ring, block_ta=16,
                  reduce_heads=0, keep=None):
    """q [H, T, Dk]; k_pos/v_pos [G, start+T, D] by absolute position -> o [H, T, Dv] (NaN where
    no task wrote). keep(record) -> bool: run only the reduce tasks it keeps."""
    H, T, Dk = q.shape
    G, L, Dv = v_pos.shape
    cache_len = window + T if ring else L + 5
    k_cache = torch.full((G, cache_len, Dk), float("nan"))    # unwritten slots must never be read
    v_cache = torch.full((G, cache_len, Dv), float("nan"))
    for j in range(max(0, L - cache_len), L):
        k_cache[:, j % cache_len], v_cache[:, j % cache_len] = k_pos[:, j], v_pos[:, j]
    n_chunks = triton.cdiv(window + T if window else cache_len, chunk)
    b = ArenaBuilder(torch.float32)
    b.add("q", q.transpose(0, 1).reshape(T, H * Dk), "f32")
    b.add("k", k_cache, "w"), b.add("v", v_cache, "w")
    b.add("pos", torch.tensor([start], dtype=torch.int32), "i32")
    b.add("sink", sink if sink is not None else torch.zeros(H), "f32")
    b.add("m", torch.full((n_chunks, H, T), 7.0), "f32")       # garbage: every partial is written
    b.add("l", torch.full((n_chunks, H, T), 7.0), "f32")
    b.add("acc", torch.full((n_chunks, H, T, Dv), 7.0), "f32")
    b.add("out", torch.full((T, H * Dv), float("nan")), "f32")
    arenas = b.build()
    scale = Dk ** -0.5
    recs = attention_records(b, T=T, H=H, G=G, Dk=Dk, Dv=Dv, chunk=chunk, n_chunks=n_chunks,
                             window=window, causal=causal, ring=cache_len,
                             sink=sink is not None, scale=scale, reduce_heads=reduce_heads)
    recs = [r for r in recs if r.kind != "attn_reduce" or keep is None or keep(r)]
    consts = dict(BLOCK_TA=block_ta, BLOCK_S=16, BLOCK_HD=triton.next_power_of_2(Dk),
                  BLOCK_HV=max(16, triton.next_power_of_2(Dv)), STAGES=2)
    counters = run_tasks([recs], arenas, consts)
    assert counters.view(-1, 32)[:G, 0].tolist() == [n_chunks] * G
    return arenas.view("out").view(T, H, Dv).transpose(0, 1)


def reference(q, k_pos, v_pos, start, window, causal, sink):
    scale = q.shape[-1] ** -0.5
    if not causal:
        return draft_reference(q, k_pos, v_pos, start, window, sink, scale)
    T, L = q.shape[1], k_pos.shape[1]
    qpos, kpos = torch.arange(start, start + T), torch.arange(L)
    return attend(q[None], k_pos[None], v_pos[None], qpos, kpos, window or None, sink, scale)[0]


CASES = [
    # T, H, G, Dk, Dv, start, window, causal, sink, chunk, ring
    pytest.param(8, 4, 2, 24, 16, 21, 0, True, False, 16, False, id="full-T8-multichunk"),
    pytest.param(1, 4, 2, 24, 16, 13, 0, True, False, 16, False, id="full-T1"),
    pytest.param(8, 4, 1, 24, 16, 30, 12, True, True, 16, True, id="swa-ring-crosses-window-sink"),
    pytest.param(8, 2, 2, 24, 16, 3, 12, True, True, 16, True, id="swa-context-shorter-than-window"),
    pytest.param(1, 4, 2, 24, 16, 37, 12, True, True, 16, True, id="swa-T1"),
    pytest.param(8, 4, 2, 24, 16, 25, 10, False, True, 16, False, id="draft-noncausal-window"),
    pytest.param(4, 8, 2, 16, 8, 0, 0, True, True, 32, False, id="start0-sink"),
    pytest.param(8, 4, 1, 192, 128, 19, 16, True, True, 16, True, id="mimo-head-dims-192-128"),
    pytest.param(8, 6, 2, 16, 8, 11, 0, True, True, 16, False, id="group-of-3-heads-packed-2-per-tile"),
    # BLOCK_TA 32 (a GPU packs more heads per tile than BLOCK_T rows): 4 heads x 8 tokens
    pytest.param(8, 8, 1, 24, 16, 21, 0, True, True, 16, False, 32, id="ta32-group-of-8-two-passes"),
    pytest.param(8, 6, 2, 16, 8, 11, 0, True, True, 16, False, 32, id="ta32-group-of-3-one-pass"),
    pytest.param(8, 4, 2, 24, 16, 25, 10, False, True, 16, False, 32, id="ta32-draft-noncausal"),
]


@pytest.mark.parametrize("T,H,G,Dk,Dv,start,window,causal,sink,chunk,ring,block_ta",
                         [c if len(c.values) == 12 else pytest.param(*c.values, 16, id=c.id) for c in CASES])
def test_attention_matches_reference(T, H, G, Dk, Dv, start, window, causal, sink, chunk, ring, block_ta):
    gen = torch.Generator().manual_seed(1000 + 7 * start + T + Dk)
    L = start + T
    q = torch.randn(H, T, Dk, generator=gen)
    k_pos, v_pos = torch.randn(G, L, Dk, generator=gen), torch.randn(G, L, Dv, generator=gen)
    sinks = torch.randn(H, generator=gen) if sink else None
    got = run_attention(q, k_pos, v_pos, start, window=window, causal=causal, sink=sinks,
                        chunk=chunk, ring=ring, block_ta=block_ta)
    want = reference(q, k_pos, v_pos, start, window, causal, sinks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_window_changes_the_result():
    """The window must cut keys: the same inputs without it give a different answer."""
    gen = torch.Generator().manual_seed(3)
    T, H, G, D, start = 8, 2, 1, 16, 30
    q = torch.randn(H, T, D, generator=gen)
    k_pos, v_pos = torch.randn(G, start + T, D, generator=gen), torch.randn(G, start + T, D, generator=gen)
    windowed = run_attention(q, k_pos, v_pos, start, window=6, causal=True, sink=None, chunk=16,
                             ring=True)
    full = reference(q, k_pos, v_pos, start, 0, True, None)
    assert (windowed - full).abs().max() > 1e-2
    torch.testing.assert_close(windowed, reference(q, k_pos, v_pos, start, 6, True, None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce_heads,block_ta", [(1, 16), (4, 16), (4, 32), (5, 32)])
def test_reduce_split_over_query_heads(reduce_heads, block_ta):
    """LowerOptions.reduce_rows: a group's merge as several attn_reduce tasks of h0 .. h1; with 6
    heads per group, 4 and 5 cut a tile's packed heads (BLOCK_TA // T of them) in two."""
    gen = torch.Generator().manual_seed(77 + reduce_heads)
    T, H, G, Dk, Dv, start = 8, 12, 2, 24, 16, 21
    q = torch.randn(H, T, Dk, generator=gen)
    k_pos, v_pos = torch.randn(G, start + T, Dk, generator=gen), torch.randn(G, start + T, Dv, generator=gen)
    sinks = torch.randn(H, generator=gen)
    got = run_attention(q, k_pos, v_pos, start, window=0, causal=True, sink=sinks, chunk=16, ring=False,
                        block_ta=block_ta, reduce_heads=reduce_heads)
    torch.testing.assert_close(got, reference(q, k_pos, v_pos, start, 0, True, sinks), rtol=1e-5, atol=1e-5)


def test_reduce_task_writes_only_its_heads():
    """One h0 .. h1 task alone: its query heads are merged, every other head stays unwritten."""
    gen = torch.Generator().manual_seed(5)
    T, H, G, Dk, Dv, start = 8, 12, 2, 24, 16, 21
    q = torch.randn(H, T, Dk, generator=gen)
    k_pos, v_pos = torch.randn(G, start + T, Dk, generator=gen), torch.randn(G, start + T, Dv, generator=gen)
    got = run_attention(q, k_pos, v_pos, start, window=0, causal=True, sink=None, chunk=16, ring=False,
                        block_ta=32, reduce_heads=4, keep=lambda r: r.args["head"] == 1 and r.args["h0"] == 4)
    mine = [6 + 4, 6 + 5]                   # group 1's heads 4 and 5
    want = reference(q, k_pos, v_pos, start, 0, True, None)
    torch.testing.assert_close(got[mine], want[mine], rtol=1e-5, atol=1e-5)
    others = [h for h in range(H) if h not in mine]
    assert got[others].isnan().all(), "a reduce task wrote heads outside its h0 .. h1"
