"""qkv_rope_kv, linear_reduce, lm_head + sample_reduce and accept bodies against torch."""
import pytest
import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.harness import run_tasks
from tilecomp.codegen.layout import TaskRecord, float_bits
from tilecomp.models.mimo import apply_rope
from tilecomp.models.sampling import sample
from tilecomp.runtime.buffers import ArenaBuilder


def state_words(pos=0, last=0, temp=0.0, seed=0, top_p=1.0):
    s = torch.zeros(L.STATE_WORDS, dtype=torch.int32)
    s[L.STATE["top_p_bits"]] = float_bits(top_p)
    s[L.STATE["pos"]], s[L.STATE["last"]] = pos, last
    s[L.STATE["temp_bits"]], s[L.STATE["seed"]] = float_bits(temp), seed
    return s


@pytest.mark.parametrize("rope_dim,n_rows,split", [(8, 5, False), (16, 3, False), (8, 4, True)])
def test_qkv_rope_kv_matches_reference_projection_and_rope(rope_dim, n_rows, split):
    g = torch.Generator().manual_seed(5)
    D, H, G, hd, vd, ring, pos, theta = 48, 4, 2, 16, 12, 11, 9, 10000.0
    x = torch.randn(n_rows, D, generator=g)
    wq, wk, wv = (torch.randn(n, D, generator=g) for n in (H * hd, G * hd, G * vd))
    gain = torch.rand(D, generator=g) + 0.5
    b = ArenaBuilder(torch.float32)
    for name, t in dict(wq=wq, wk=wk, wv=wv).items():
        b.add(name, t, "w")
    b.add("g", gain, L.norm_arena({}))
    b.add("x", x, "f32"), b.add("st", state_words(pos=pos), "i32")
    b.add("kc", torch.zeros(G, ring, hd), "w"), b.add("vc", torch.zeros(G, ring, vd), "w")
    b.reserve("q", (n_rows, H * hd), "f32")
    arenas = b.build()
    recs = [TaskRecord("qkv_rope_kv", h, dict(
        x=b.offset("x"), x_stride=D, norm=b.offset("g"), eps_bits=float_bits(1e-5),
        wq=b.offset("wq"), wk=b.offset("wk"), wv=b.offset("wv"), q_out=b.offset("q"),
        k_cache=b.offset("kc"), v_cache=b.offset("vc"), head=h, n_heads_q=H, n_kv_heads=G,
        head_dim=hd, v_head_dim=vd, rope_dim=rope_dim, theta_bits=float_bits(theta),
        v_scale_bits=float_bits(0.5), dim=D, pos=b.offset("st") + L.STATE["pos"], ring=ring,
        n_rows=n_rows, rows=-1)) for h in range(G)]
    if split:  # per KV head: one task per query head (no k/v), then one k/v-only task
        parts = []
        for rec in recs:
            for q_head in range(H // G):
                parts.append(TaskRecord("qkv_rope_kv", 0, dict(rec.args, wk=-1, wv=-1, q_head0=q_head,
                                                                q_heads=1)))
            parts.append(TaskRecord("qkv_rope_kv", 0, dict(rec.args, wq=-1)))
        recs = parts
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_K=32, BLOCK_N=16, BLOCK_R=16))
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain
    _check_qkv(arenas, h, (wq, wk, wv), pos, rope_dim, theta, (H, G, hd, vd), ring)


def _check_qkv(arenas, h, weights, pos, rope_dim, theta, shape, ring):
    """The arenas' q, k cache and v cache (v scaled by 0.5) against torch's projection of the
    normed rows h and its RoPE at positions pos, pos + 1, ..."""
    (wq, wk, wv), (H, G, hd, vd), n_rows = weights, shape, h.shape[0]
    p = torch.arange(pos, pos + n_rows)
    q = apply_rope((h @ wq.T).view(n_rows, H, hd).transpose(0, 1)[None], p, rope_dim, theta)[0]
    k = apply_rope((h @ wk.T).view(n_rows, G, hd).transpose(0, 1)[None], p, rope_dim, theta)[0]
    v = (h @ wv.T).view(n_rows, G, vd) * 0.5
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(arenas.view("q").view(n_rows, H, hd), q.transpose(0, 1), **tol)
    torch.testing.assert_close(arenas.view("kc")[:, p % ring], k, **tol)
    torch.testing.assert_close(arenas.view("vc")[:, p % ring], v.transpose(0, 1), **tol)



@pytest.mark.parametrize("span,block_n", [(20, 16), (20, 64), (7, 16)])
def test_qkv_spans_match_the_reference_projection_and_rope(span, block_n):
    """rope_part 3 (LowerOptions.qkv_span): each matrix's rows as tasks of the lowering's
    span_cuts across 24-row heads. With 16-row chunks (BLOCK_N = BLOCK_R = 16) the task [60, 80)
    has a chunk that would end inside head 3's rotary rows [72, 80): the kernel ends it at 72.
    Span 7 < rope_dim: a task takes a rotary block whole."""
    from tilecomp.passes.lower_attn import span_cuts
    g = torch.Generator().manual_seed(6)
    D, H, G, hd, vd, rd, ring, pos, theta, n_rows = 48, 4, 1, 24, 12, 8, 11, 9, 10000.0, 5
    x = torch.randn(n_rows, D, generator=g)
    wq, wk, wv = (torch.randn(n, D, generator=g) for n in (H * hd, G * hd, G * vd))
    b = ArenaBuilder(torch.float32)
    for name, t in dict(wq=wq, wk=wk, wv=wv).items():
        b.add(name, t, "w")
    b.add("x", x, "f32"), b.add("st", state_words(pos=pos), "i32")
    b.add("kc", torch.zeros(G, ring, hd), "w"), b.add("vc", torch.zeros(G, ring, vd), "w")
    b.reserve("q", (n_rows, H * hd), "f32")
    arenas = b.build()
    common = dict(x=b.offset("x"), x_stride=D, norm=-1, eps_bits=0, wq=-1, wk=-1, wv=-1, q_out=b.offset("q"),
                  k_cache=b.offset("kc"), v_cache=b.offset("vc"), head=0, n_heads_q=H, n_kv_heads=G,
                  head_dim=hd, v_head_dim=vd, rope_dim=rd, theta_bits=float_bits(theta),
                  v_scale_bits=float_bits(0.5), dim=D, pos=b.offset("st") + L.STATE["pos"], ring=ring,
                  n_rows=n_rows, rows=-1, rope_part=3)
    cuts = {m: span_cuts(0, n, span, h, r) for m, n, h, r in (("wq", H * hd, hd, rd), ("wk", G * hd, hd, rd),
                                                              ("wv", G * vd, vd, 0))}
    if span == 20:
        assert (60, 80) in cuts["wq"]
    if span == 7:
        assert (0, 8) in cuts["wq"] and (72, 80) in cuts["wq"]
    recs = [TaskRecord("qkv_rope_kv", i, dict(common, **{m: b.offset(m)}, row0=r0, row1=r1))
            for i, (m, (r0, r1)) in enumerate((m, c) for m in cuts for c in cuts[m])]
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_K=32, BLOCK_N=block_n, BLOCK_R=16))
    _check_qkv(arenas, x, (wq, wk, wv), pos, rd, theta, (H, G, hd, vd), ring)

def test_linear_reduce_sums_splits_in_order_plus_residual():
    g = torch.Generator().manual_seed(6)
    S, T, N = 3, 4, 40
    part, res = torch.randn(S, T, N, generator=g), torch.randn(T, N, generator=g)
    b = ArenaBuilder(torch.float32)
    b.add("part", part, "f32"), b.add("res", res, "f32"), b.reserve("y", (T, N), "f32")
    arenas = b.build()
    recs = [TaskRecord("linear_reduce", i, dict(
        part=b.offset("part"), n_split=S, split_stride=T * N, n_dim=N, n0=n0, res=b.offset("res"),
        y=b.offset("y"), y_stride=N, n_rows=T, rows=-1)) for i, n0 in enumerate((0, 32))]
    run_tasks([recs], arenas, dict(BLOCK_T=8, BLOCK_N=32))
    torch.testing.assert_close(arenas.view("y"), part[0] + part[1] + part[2] + res)
    # one task over all 40 columns in sub-tiles of 16
    b.reserve("y2", (T, N), "f32")
    arenas = b.build()
    rec = TaskRecord("linear_reduce", 0, dict(recs[0].args, n0=0, n1=N, y=b.offset("y2")))
    run_tasks([[rec]], arenas, dict(BLOCK_T=8, BLOCK_N=16))
    torch.testing.assert_close(arenas.view("y2"), part[0] + part[1] + part[2] + res)


def _head(temp, seed, vocab=200, T=6, D=32, pos=17, shift=1, ties=False, top_p=1.0, sub=0):
    """sub: tasks of that many vocabulary rows run as sub-tiles of BLOCK_NH = 32 rows (80: a task
    ends in a half sub-tile, as LowerOptions.vocab_quantum 16 cuts a head)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(T, D, generator=g), torch.randn(vocab, D, generator=g)
    if ties:  # equal best logits in different tiles (and sub-tiles): the lowest token must win
        w[150] = w[7]
        w[40] = w[7]
    BN = sub or 64                                # vocabulary rows per task
    n_tiles = -(-vocab // BN)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", w, "w"), b.add("st", state_words(pos, 0, temp, seed, top_p), "i32")
    b.reserve("logits", (T, vocab), "f32"), b.reserve("key", (T, n_tiles), "f32")
    b.reserve("arg", (T, n_tiles), "i32"), b.reserve("tok", (T,), "i32")
    arenas = b.build()
    heads = [TaskRecord("lm_head", i, dict(
        x=b.offset("x"), x_stride=D, norm=-1, eps_bits=0, w=b.offset("w"), dim=D, vocab=vocab,
        n0=i * BN, n1=(i + 1) * BN, logits=b.offset("logits"), tile_key=b.offset("key"), tile_arg=b.offset("arg"),
        tile=i, n_tiles=n_tiles, state=b.offset("st"), pos_shift=shift, n_rows=T, rows=-1),
        signals=[0]) for i in range(n_tiles)]
    reduce = TaskRecord("sample_reduce", n_tiles, dict(
        tile_key=b.offset("key"), tile_arg=b.offset("arg"), n_tiles=n_tiles, out=b.offset("tok"),
        n_rows=T, logits=b.offset("logits"), vocab=vocab, state=b.offset("st"), pos_shift=shift),
        waits=[(0, n_tiles, n_tiles)])
    run_tasks([heads + [reduce]], arenas, dict(BLOCK_T=16, BLOCK_N=32 if sub else BN, BLOCK_NH=32 if sub else BN,
                                               BLOCK_K=32, BLOCK_V=2))
    logits = x @ w.T
    want = sample(logits, torch.arange(pos + shift, pos + shift + T), temp, top_p, seed)
    return arenas, logits, want


@pytest.mark.parametrize("temp,seed,ties,top_p,sub", [
    (0.0, 0, False, 1.0, False), (0.0, 0, True, 1.0, False), (0.8, 1, False, 1.0, False),
    (1.5, 12345, False, 1.0, False), (0.7, 5, False, 0.6, False), (2.0, 77, False, 0.95, False),
    (0.0, 3, False, 0.5, False), (0.0, 0, True, 1.0, 128), (0.8, 1, False, 1.0, 128), (0.0, 0, True, 1.0, 80),
    (0.7, 5, False, 0.6, 80)])
def test_lm_head_and_sample_reduce_follow_the_shared_sampling_rule(temp, seed, ties, top_p, sub):
    arenas, logits, want = _head(temp, seed, ties=ties, top_p=top_p, sub=sub)
    torch.testing.assert_close(arenas.view("logits"), logits, rtol=1e-5, atol=1e-4)
    assert arenas.view("tok").tolist() == want.tolist()


@pytest.mark.parametrize("drafted,posterior,acc", [
    ([5, 6, 7], [5, 6, 9, 4], 2), ([1, 2, 3], [1, 2, 3, 8], 3), ([1, 2, 3], [4, 2, 3, 8], 0), ([], [42], 0)])
def test_accept_commits_prefix_and_updates_state(drafted, posterior, acc):
    S = len(posterior)
    b = ArenaBuilder(torch.float32)
    b.add("st", state_words(pos=30, last=3), "i32")
    b.add("d", torch.tensor(drafted + [0], dtype=torch.int32), "i32")
    b.add("p", torch.tensor(posterior, dtype=torch.int32), "i32")
    b.add("out", torch.full((S,), -7, dtype=torch.int32), "i32")
    b.add("blk", torch.zeros(S, dtype=torch.int32), "i32"), b.add("dblk", torch.zeros(S, dtype=torch.int32), "i32")
    arenas = b.build()
    rec = TaskRecord("accept", 0, dict(state=b.offset("st"), draft_tok=b.offset("d"), post_tok=b.offset("p"),
                                       n_block=S, out_tokens=b.offset("out"), block=b.offset("blk"),
                                       draft_block=b.offset("dblk"), mask_id=-1))
    run_tasks([[rec]], arenas, dict(BLOCK_T=8))
    committed = drafted[:acc] + [posterior[acc]]
    assert arenas.view("out").tolist()[:acc + 1] == committed
    st = arenas.view("st").tolist()
    assert (st[L.STATE["acc"]], st[L.STATE["n_out"]], st[L.STATE["pos"]]) == (acc, acc + 1, 31 + acc)
    assert (st[L.STATE["ctx_pos"]], st[L.STATE["n_ctx"]], st[L.STATE["last"]]) == (30, acc + 1, committed[-1])
    assert arenas.view("blk")[0].item() == committed[-1] == arenas.view("dblk")[0].item()
