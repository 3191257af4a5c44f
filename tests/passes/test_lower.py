"""Lowering fused graphs to tile tasks: kinds, regions, bytes, dependencies, MoE dispatch."""
import dataclasses
from collections import Counter

import pytest

from tilecomp.errors import IRError
from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule, verify_tile
from tilecomp.models.presets import preset
from tilecomp.passes.lower import LowerOptions, lower
from tilecomp.passes.pipeline import compile_model


@pytest.fixture(scope="module")
def tiny():
    cfg, dcfg = preset("tiny")
    return cfg, dcfg, compile_model(cfg, dcfg)


def kinds(tp):
    return Counter(t.kind for t in tp.tasks)


def test_tiny_decode_step_task_counts(tiny):
    cfg, dcfg, c = tiny
    tp = lower(c.fused)
    verify_tile(tp)
    assert parse_tile(print_tile(tp)) == tp
    n = kinds(tp)
    L, J = cfg.num_hidden_layers, dcfg.num_hidden_layers
    kv_heads = [cfg.attn(i).n_kv_heads for i in range(L)]
    # one qkv task per KV head (target + draft block) + draft context K/V per draft KV head
    assert n["qkv_rope_kv"] == sum(kv_heads) + 2 * J * dcfg.num_key_value_heads
    assert n["attn_reduce"] == sum(kv_heads) + J * dcfg.num_key_value_heads
    n_moe = sum(cfg.is_moe(i) for i in range(L))
    slots = min(cfg.n_routed_experts, dcfg.block_size * cfg.num_experts_per_tok)
    assert n["moe_route"] == n_moe
    up_tiles = -(-cfg.moe_intermediate_size // LowerOptions().expert_block_n)
    assert n["expert_up_gate"] == n_moe * slots * up_tiles
    assert n["embed"] == 2 and n["sample_reduce"] == 2 and n["accept"] == 1
    assert n["lm_head"] == 2 * -(-cfg.vocab_size // LowerOptions().vocab_block)


def test_every_task_signals_and_waits_on_earlier_producers(tiny):
    tp = lower(tiny[2].fused)
    signalled = set()
    for t in tp.tasks:
        assert len(t.signals) == 1 and t.rank == 0
        for c, target in t.waits:
            assert c in signalled, f"{t.name} waits on {c} before any signal"
            assert target == tp.counters[c].expected
        signalled.update(c for c, _ in t.signals)


def test_swa_attention_reads_only_the_window(tiny):
    cfg, dcfg, c = tiny
    tp = lower(c.fused, LowerOptions(kv_chunk=4))
    for i in range(cfg.num_hidden_layers):
        spec = cfg.attn(i)
        parts = [t for t in tp.tasks if t.kind == "attn_partial" and t.attrs["op"] == f"L{i}.attn"]
        cache = parts[0].attrs["k_cache"]
        keys = {(r.dims[1].lo, r.dims[1].hi) for t in parts for r in t.reads if r.buffer == cache}
        ring = tp.buffers[cache].shape[1]
        covered = max(hi for _, hi in keys)
        assert covered == ring           # the ring holds exactly window + block positions for SWA
        if spec.window is not None:
            assert ring == spec.window + dcfg.block_size
        assert len(parts) == spec.n_kv_heads * -(-ring // 4)
    # draft layers: a sliding window inside a long cache -> chunks over window + block, at a runtime offset
    draft = [t for t in tp.tasks if t.kind == "attn_partial" and t.attrs["op"] == "D0.attn"]
    span = dcfg.sliding_window + dcfg.block_size
    assert len(draft) == dcfg.num_key_value_heads * -(-span // 4)
    assert all(r.dims[1].index == "window_start" for t in draft for r in t.reads if r.buffer == t.attrs["k_cache"])


def test_moe_unique_expert_dispatch_reads_each_expert_once(tiny):
    cfg, dcfg, c = tiny
    tp = lower(c.fused)
    ups = [t for t in tp.tasks if t.kind == "expert_up_gate" and t.attrs["op"] == "L1.out"]
    slots = {t.coords["slot"] for t in ups}
    assert len(slots) == min(cfg.n_routed_experts, dcfg.block_size * cfg.num_experts_per_tok)
    for t in ups:
        w = [r for r in t.reads if r.buffer.endswith("gate_proj_blocks")]
        assert len(w) == 1 and w[0].dims[0].index == "expert" and w[0].dims[0].extent == 1
        plan = [r for r in t.reads if r.buffer == t.attrs["plan"]]
        assert plan, "every slot task reads the plan"
        assert any(c.startswith("c.L1.mlp.plan") for c, _ in t.waits)
    # one expert's gate weights cross the slot tiles exactly once: tiles partition the N range
    for s in slots:
        ranges = sorted((r.dims[1].lo, r.dims[1].hi) for t in ups if t.coords["slot"] == s
                        for r in t.reads if r.buffer.endswith("gate_proj_blocks"))
        assert ranges[0][0] == 0 and ranges[-1][1] == cfg.moe_intermediate_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_split_k_with_reduce_when_n_is_small(tiny):
    tp = lower(tiny[2].fused, LowerOptions(block_n=32, min_n_tiles=8, split_k_min=32))
    verify_tile(tp)
    fc = [t for t in tp.tasks if t.attrs.get("op") == "draft.fc"]
    parts = [t for t in fc if t.kind == "linear"]
    reduces = [t for t in fc if t.kind == "linear_reduce"]
    K = 3 * 64
    # N=64 -> 2 tiles; 4 splits wanted, K=192 in 64-aligned chunks -> 3 splits
    assert len(parts) == 2 * 3 and len(reduces) == 2
    ks = sorted({(t.attrs["k0"], t.attrs["k1"]) for t in parts})
    assert ks[0][0] == 0 and ks[-1][1] == K
    assert all(any(c == "c.draft.fc.part" for c, _ in r.waits) for r in reduces)


def test_bytes_follow_regions(tiny):
    tp = lower(tiny[2].fused)
    t = next(t for t in tp.tasks if t.kind == "linear" and t.attrs["op"] == "L0.x")
    # o_proj tile: attn rows [8, 64] + weight [64, 64] + residual [8, 64] read, y [8, 64] written, bf16
    assert tp.task_bytes(t) == 2 * (8 * 64 + 64 * 64 + 8 * 64 + 8 * 64)
    route = next(t for t in tp.tasks if t.kind == "moe_route")
    assert tp.region_bytes(route.reads[1]) == 16 * 64 * 4         # fp32 router [E, D]


def test_prefill_step_lowers(tiny):
    tp = lower(tiny[2].prefill_fused)
    verify_tile(tp)
    assert kinds(tp)["accept"] == 0 and kinds(tp)["sample_reduce"] == 1


def test_draft_head_samples_rows_1_to_7_into_the_block(tiny):
    cfg, dcfg, c = tiny
    tp = lower(c.fused)
    D, S = cfg.hidden_size, dcfg.block_size
    heads = [t for t in tp.tasks if t.kind == "lm_head" and t.attrs["op"] == "draft.logits"]
    for t in heads:
        # graph: sample(offset=0) keys row t on pos + t; only rows 1.. are drafted -> local row j is t = j + 1
        assert (t.attrs["row0"], t.attrs["n_rows"], t.attrs["pos_shift"]) == (1, S - 1, 1)
        assert t.attrs["x_offset"] == D and t.reads[0].dims[0] == (1, S, None)
    verify = [t for t in tp.tasks if t.kind == "lm_head" and t.attrs["op"] == "logits"]
    assert all((t.attrs["row0"], t.attrs["pos_shift"]) == (0, 1) for t in verify)
    draft_pick = next(t for t in tp.tasks if t.kind == "sample_reduce" and t.attrs["op"] == "drafted")
    assert draft_pick.attrs["out"] == "block" and draft_pick.writes[0].dims[0] == (1, S, None)
    # top-p sampling re-reads the logits rows: the pick knows them and their positions
    assert (draft_pick.attrs["logits"], draft_pick.attrs["logits_offset"]) == ("draft.logits", cfg.vocab_size)
    assert (draft_pick.attrs["vocab"], draft_pick.attrs["pos_shift"]) == (cfg.vocab_size, 1)
    verify_pick = next(t for t in tp.tasks if t.kind == "sample_reduce" and t.attrs["op"] == "posterior")
    assert (verify_pick.attrs["logits"], verify_pick.attrs["pos_shift"]) == ("logits", 1)
    # the verify embedding reads the block the draft filled in, so it waits on that pick
    embed = next(t for t in tp.tasks if t.kind == "embed" and t.attrs["op"] == "embed")
    assert ("c.drafted", 1) in embed.waits


def test_split_k_partials_are_offset_per_split(tiny):
    tp = lower(tiny[2].fused, LowerOptions(block_n=32, min_n_tiles=8, split_k_min=32))
    parts = [t for t in tp.tasks if t.kind == "linear" and t.attrs.get("op") == "draft.fc"]
    T, N = 8, 64
    assert {t.attrs["split"]: t.attrs["y_offset"] for t in parts} == {s: s * T * N for s in range(3)}
    for t in parts:
        assert t.writes[0].dims[0] == (t.attrs["split"], t.attrs["split"] + 1, None)


def test_tile_sizes_come_from_the_compile_options():
    from tilecomp.passes.pipeline import CompileOptions
    cfg, dcfg = preset("tiny")
    c = compile_model(cfg, dcfg, CompileOptions(interpreter_order=True, lower=LowerOptions(kv_chunk=1 << 16)))
    parts = [t for t in c.schedule.tasks if t.kind == "attn_partial"]
    heads = sum(cfg.attn(i).n_kv_heads for i in range(cfg.num_hidden_layers))
    assert len(parts) == heads + dcfg.num_hidden_layers * dcfg.num_key_value_heads   # one chunk per head
    assert len(c.schedule.programs) == 1


def test_split_router_then_plan(tiny):
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(router_block=6))
    verify_tile(tp)
    routes = [t for t in tp.tasks if t.kind == "moe_route" and t.attrs["op"] == "L1.mlp.plan"]
    splits, final = routes[:-1], routes[-1]
    E = cfg.n_routed_experts
    assert [(t.attrs["e0"], t.attrs["e1"]) for t in splits] == [(0, 6), (6, 12), (12, 16)]
    assert [("xn" in t.attrs) for t in splits] == [True, False, False]    # task 0 writes the normed rows
    assert final.attrs["x"] == "L1.mlp.plan.logits" and "gate" not in final.attrs
    assert final.waits == [("c.L1.mlp.plan.logits", 3)]
    gate_rows = sorted((r.dims[0].lo, r.dims[0].hi) for t in splits for r in t.reads
                       if r.buffer.endswith("mlp.gate.weight"))
    assert gate_rows[0][0] == 0 and gate_rows[-1][1] == E     # the fp32 router weight read once
    up = next(t for t in tp.tasks if t.kind == "expert_up_gate" and t.attrs["op"] == "L1.out")
    assert {c for c, _ in up.waits} == {"c.L1.mlp.plan", "c.L1.mlp.plan.logits"}


def test_xn_split_spreads_the_normed_rows_over_the_split_router(tiny):
    """xn_split: every split-router task writes the experts' normed rows at columns in proportion
    to its experts (16-byte multiples); together they cover every column once."""
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(router_block=6, xn_split=1))
    verify_tile(tp)
    splits = [t for t in tp.tasks if t.kind == "moe_route" and t.attrs["op"] == "L1.mlp.plan"][:-1]
    D, E = cfg.hidden_size, cfg.n_routed_experts
    cols = [(t.attrs["xn0"], t.attrs["xn1"]) for t in splits]
    assert cols == [(0, 6 * D // E // 8 * 8), (6 * D // E // 8 * 8, 12 * D // E // 8 * 8), (12 * D // E // 8 * 8, D)]
    xn = splits[0].attrs["xn"]
    assert all(t.attrs["xn"] == xn for t in splits)
    assert [[w.dims[1][:2] for w in t.writes if w.buffer == xn] for t in splits] == [[c] for c in cols]


@pytest.mark.parametrize("split_kv", [0, 1])
def test_finer_qkv_tasks_share_one_counter(tiny, split_kv):
    """One task per query head plus one k/v task per KV head, or (split_kv, the default) a k task
    and a v task; all of a KV head's tasks signal one counter that attention waits on."""
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(qkv_q_heads=1, qkv_split_kv=split_kv))
    verify_tile(tp)
    spec = cfg.attn(1)
    G = spec.n_heads // spec.n_kv_heads
    kv = 2 if split_kv else 1
    tasks = [t for t in tp.tasks if t.kind == "qkv_rope_kv" and t.attrs["op"] == "L1.q_rot"]
    assert len(tasks) == spec.n_kv_heads * (G + kv)
    h0 = [t for t in tasks if t.coords["kv_head"] == 0]
    assert [(t.attrs["q_head0"], t.attrs["q_heads"]) for t in h0] == [(h, 1) for h in range(G)] + [(0, 0)] * kv
    assert all("k_cache" not in t.attrs and "v_cache" not in t.attrs for t in h0[:G])
    if split_kv:
        assert "k_cache" in h0[G].attrs and "v_cache" not in h0[G].attrs and "wv" not in h0[G].attrs
        assert "v_cache" in h0[G + 1].attrs and "k_cache" not in h0[G + 1].attrs and "wk" not in h0[G + 1].attrs
    else:
        assert "k_cache" in h0[-1].attrs and "v_cache" in h0[-1].attrs
    assert tp.counters["c.L1.q_rot.h0"].expected == G + kv
    part = next(t for t in tp.tasks if t.kind == "attn_partial" and t.attrs["op"] == "L1.attn")
    assert ("c.L1.q_rot.h0", G + kv) in part.waits


def test_rotary_rows_apart_from_the_other_rows_of_each_head(tiny):
    """qkv_split_rope: each q head and k head as a task for its rotary rows (the first rope_dim)
    and one for the others, with exactly those weight rows and q columns / K-cache dims; v whole."""
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(qkv_q_heads=1, qkv_split_rope=1))
    verify_tile(tp)
    spec = cfg.attn(1)
    G, hd, rope = spec.n_heads // spec.n_kv_heads, spec.head_dim, spec.rope_dim
    h0 = [t for t in tp.tasks if t.kind == "qkv_rope_kv" and t.attrs["op"] == "L1.q_rot" and t.coords["kv_head"] == 0]
    assert [(t.attrs["q_heads"], t.attrs["rope_part"]) for t in h0] == [(1, 1), (1, 2)] * G + [(0, 1), (0, 2), (0, 0)]
    q_rows = [(r.dims[0].lo, r.dims[0].hi) for t in h0[:2] for r in t.reads if r.buffer.endswith("q_proj.weight")]
    assert q_rows == [(0, rope), (rope, hd)]
    k_dims = [r.dims[2][:2] for t in h0[2 * G:2 * G + 2] for r in t.writes]
    assert k_dims == [(0, rope), (rope, hd)]
    assert tp.counters["c.L1.q_rot.h0"].expected == 2 * G + 3


def test_split_rope_with_a_combined_kv_task_writes_v_once(tiny):
    """qkv_split_rope with k and v in one task (qkv_split_kv 0): that task's rotary part projects
    k's rotary rows only; its other part k's other rows and the whole of v (v written once)."""
    _, _, c = tiny
    tp = lower(c.fused, LowerOptions(qkv_q_heads=1, qkv_split_rope=1, qkv_split_kv=0))
    verify_tile(tp)
    kv = [t for t in tp.tasks if t.kind == "qkv_rope_kv" and t.attrs["op"] == "L1.q_rot"
          and t.coords["kv_head"] == 0 and t.attrs["q_heads"] == 0]
    assert [t.attrs["rope_part"] for t in kv] == [1, 2]
    v_cache = kv[1].attrs["v_cache"]
    v_writes = [[r for r in t.writes if r.buffer == v_cache] for t in kv]
    assert kv[0].attrs.get("wv") is None and v_writes[0] == [] and len(v_writes[1]) == 1


def test_embed_columns_and_reduce_rows_as_tasks(tiny):
    """embed_cols: the embedding as tasks of that many columns, each writing its columns;
    reduce_rows: each attention's merge as tasks of reduce_rows // block rows query heads of a
    group (at least one), each reading and writing its heads only; both signal the one counter
    the consumers wait on. With fold_reduce the merge stays one per group (it goes into the last
    partial)."""
    cfg, _, c = tiny
    D = cfg.hidden_size
    tp = lower(c.fused, LowerOptions(embed_cols=24, reduce_rows=1))      # 1 row: one head per task
    verify_tile(tp)
    first = next(t for t in tp.tasks if t.kind == "embed")
    emb = [t for t in tp.tasks if t.kind == "embed" and t.attrs["op"] == first.attrs["op"]]
    assert [(t.attrs["d0"], t.attrs["d1"]) for t in emb] == [(d, min(D, d + 24)) for d in range(0, D, 24)]
    assert [w.dims[1][:2] for t in emb for w in t.writes] == [(t.attrs["d0"], t.attrs["d1"]) for t in emb]
    assert tp.counters[emb[0].signals[0][0]].expected == len(emb)
    spec = cfg.attn(1)
    G, vd = spec.n_heads // spec.n_kv_heads, spec.v_head_dim
    red = [t for t in tp.tasks if t.kind == "attn_reduce" and t.attrs["op"] == "L1.attn"]
    assert [(t.attrs["head"], t.attrs["h0"], t.attrs["h1"]) for t in red] == \
        [(g, h, h + 1) for g in range(spec.n_kv_heads) for h in range(G)]
    for t in red:
        qh = t.attrs["head"] * G + t.attrs["h0"]
        assert [w.dims[1][:2] for w in t.writes] == [(qh * vd, (qh + 1) * vd)]
        assert all(r.dims[1][:2] == (qh, qh + 1) for r in t.reads if r.buffer.endswith(".part_acc"))
    assert tp.counters["c.L1.attn"].expected == len(red)
    whole = lower(c.fused, LowerOptions())
    assert sum(t.kind == "embed" for t in whole.tasks) * len(emb) == sum(t.kind == "embed" for t in tp.tasks)
    assert all(t.attrs["h1"] - t.attrs["h0"] == 1 for t in tp.tasks if t.kind == "attn_reduce")
    T = red[0].attrs["n_rows"]
    pairs = lower(c.fused, LowerOptions(reduce_rows=2 * T))          # two heads per task
    spans = [t.attrs["h1"] - t.attrs["h0"] for t in pairs.tasks if t.kind == "attn_reduce" and t.attrs["op"] == "L1.attn"]
    assert spans == [min(2, G - h) for _ in range(spec.n_kv_heads) for h in range(0, G, 2)]
    folded = lower(c.fused, LowerOptions(reduce_rows=1, fold_reduce=1))    # (the pass runs after)
    assert sum(t.kind == "attn_reduce" for t in folded.tasks) == sum(t.kind == "attn_reduce" for t in whole.tasks)


def test_balance_fills_the_programs_in_as_few_waves_as_it_can():
    from tilecomp.passes.lower import balance, expected_unique
    assert balance(152064, 132, 4096 * 2) == (1152, 1)            # 132 LM-head tasks: one full wave
    assert balance(4096, 132, 8192 * 2, k=8192, max_split=8) == (64, 2)   # o_proj: 64 tiles x 2 K halves
    assert balance(4096, 132, 8192 * 2, k=8192, max_split=8, split_k_min=8192) == (64, 1)
    assert balance(1000, 1, 100) == (1024, 1)                      # one program: one task
    width, _ = balance(2048, 132, 4352, units=8)                   # 8 routed experts at block 1
    assert width % 64 == 0 and 0.9 * 132 <= 8 * (2048 // width) <= 132
    assert balance(256, 132, 4096 * 4, quantum=1) == (2, 1)         # the router: 2 experts per task
    assert abs(expected_unique(256, 8, 8) - 57.42) < 0.01 and expected_unique(16, 2, 1) == 2


def test_kv_chunk_zero_sizes_the_attention_chunks_to_fill_the_programs():
    """kv_chunk 0: a full-attention layer's (KV head, chunk) tasks about fill the programs (at
    the default 256 keys, its 4 KV heads give 68 tasks on 132 programs) and split the keys in
    view at run time (chunk_len -32: multiples of 32 keys; each task's key region is at most the
    span over the chunks, runtime-indexed); a sliding window's span is the window and its rows."""
    from tilecomp.passes.pipeline import CompileOptions, compile_model
    from tilecomp.settings import Settings
    cfg, dcfg = preset("mimo-v2-flash", 2)
    P, max_len = 132, 1 << 15
    c = compile_model(cfg, None, CompileOptions(programs=P, block=1, max_len=max_len,
                                                lower=LowerOptions(kv_chunk=0)), settings=Settings())
    tp = c.plain_schedule
    kinds = set()
    for op in {t.attrs["op"] for t in tp.tasks if t.kind == "attn_partial"}:
        parts = [t for t in tp.tasks if t.kind == "attn_partial" and t.attrs["op"] == op]
        chunk, n = parts[0].attrs["chunk_len"], parts[0].attrs["n_chunks"]
        keys = {r.dims[1] for t in parts for r in t.reads if r.buffer == parts[0].attrs["k_cache"]}
        (k,) = keys
        span = min(parts[0].attrs["ring"], parts[0].attrs["window"] + 1 if parts[0].attrs["window"] else max_len)
        assert chunk == -32 and k.index == "kv_split" and k.extent % 32 == 0, (op, chunk, k)
        assert k.extent * n >= span and (k.extent - 32) * n < span and len(parts) == n * parts[0].attrs["n_kv_heads"]
        kinds.add("full" if span == max_len else "window")
        if span == max_len:                                # the full-attention layer fills the programs
            assert 0.9 * P <= len(parts) <= P + parts[0].attrs["n_kv_heads"], (op, len(parts))
    assert kinds == {"window", "full"}
    verify_schedule(tp)


def test_qkv_rows_cuts_each_head_into_tasks_of_about_one_size(tiny):
    """qkv_rows: the rotary rows of each q / k head as one task, the head's other rows and each v
    head's rows in chunks of at most qkv_rows rows, each chunk reading exactly its weight rows and
    writing exactly its q columns / cache dims; together they cover every row once."""
    cfg, _, c = tiny
    step = 8
    tp = lower(c.fused, LowerOptions(qkv_q_heads=1, qkv_rows=step))
    verify_tile(tp)
    spec = cfg.attn(1)
    G, hd, vd, rope = spec.n_heads // spec.n_kv_heads, spec.head_dim, spec.v_head_dim, spec.rope_dim
    assert 0 < rope < hd and (hd - rope) > step      # the tiny model has chunks to cut
    h0 = [t for t in tp.tasks if t.kind == "qkv_rope_kv" and t.attrs["op"] == "L1.q_rot" and t.coords["kv_head"] == 0]
    chunks = [(c0, min(hd - rope, c0 + step)) for c0 in range(0, hd - rope, step)]
    per_head = 1 + len(chunks)
    v_chunks = [(c0, min(vd, c0 + step)) for c0 in range(0, vd, step)]
    assert len(h0) == (G + 1) * per_head + len(v_chunks)
    q_rows, k_dims, v_dims = [], [], []
    for t in h0:
        a = t.attrs
        ranged = a.get("row1", 0) > a.get("row0", 0)
        assert a["rope_part"] == (2 if ranged else 1)
        for r in t.reads:
            if r.buffer.endswith("q_proj.weight") and a["q_head0"] == 0:
                q_rows.append((r.dims[0].lo, r.dims[0].hi))
            if r.buffer.endswith("v_proj.weight"):
                assert (r.dims[0].lo, r.dims[0].hi) == (a["row0"], a["row1"])
        for r in t.writes:
            if "v_cache" in a and r.buffer == a["v_cache"]:
                v_dims.append(r.dims[2][:2])
            elif "k_cache" in a and r.buffer == a["k_cache"]:
                k_dims.append(r.dims[2][:2])
        rows = max(r.dims[0].hi - r.dims[0].lo for r in t.reads if r.buffer.endswith("_proj.weight"))
        assert rows <= max(step, rope)
    assert q_rows == [(0, rope)] + [(rope + a, rope + b) for a, b in chunks]
    assert k_dims == [(0, rope)] + [(rope + a, rope + b) for a, b in chunks]
    assert v_dims == v_chunks
    assert tp.counters["c.L1.q_rot.h0"].expected == len(h0)


def test_vocab_quantum_sizes_the_lm_head_tiles(tiny):
    """vocab_quantum: balanced lm_head tiles are multiples of it (the flash head's 152576 rows: 126
    tasks of 1216 at 64, 131 of 1168 at 16 on 132 programs); the tiles cover the vocabulary once.
    A size below 1 is refused by name."""
    from tilecomp.passes.lower import balance
    cfg, _, c = tiny
    V = cfg.vocab_size
    assert balance(152576, 132, 4096 * 2) == (1216, 1)
    assert balance(152576, 132, 4096 * 2, quantum=16) == (1168, 1)
    for q in (64, 16):
        tp = lower(c.fused, LowerOptions(programs=132, vocab_quantum=q))
        verify_tile(tp)
        op = next(t.attrs["op"] for t in tp.tasks if t.kind == "lm_head")
        heads = [t for t in tp.tasks if t.kind == "lm_head" and t.attrs["op"] == op]
        spans = [(t.attrs["n0"], t.attrs["n1"]) for t in heads]
        width = spans[0][1] - spans[0][0]
        assert width % q == 0 and spans == [(n, min(V, n + width)) for n in range(0, V, width)]
        assert len(heads) <= 132 and heads[0].attrs["n_tiles"] == len(heads)
    assert len(heads) == V // 16                  # 16-row tiles fill more of the 132 programs
    with pytest.raises(IRError, match=r"LowerOptions.vocab_quantum = 0, expected at least 1"):
        lower(c.fused, LowerOptions(vocab_quantum=0))


def test_qkv_span_tasks_cover_each_matrix_once_and_never_cut_a_rotary_block(tiny):
    """qkv_span: per KV group, its k, v and q rows as tasks of one matrix (rope_part 3, row0 ..
    row1 of the matrix) of at most the span, across head boundaries but never through a head's
    rotary rows; the writes are the rows' q columns / cache dims, and every task signals its
    group's counter. span_cuts: the flash q heads (192 rows, 64 rotary) at 128 are 1.5 tasks."""
    from tilecomp.passes.lower_attn import span_cuts
    assert span_cuts(0, 384, 128, 192, 64) == [(0, 128), (128, 256), (256, 384)]
    assert span_cuts(0, 96, 20, 24, 8) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 96)]
    assert span_cuts(0, 96, 30, 24, 8) == [(0, 24), (24, 48), (48, 72), (72, 96)]    # ends before a block
    assert span_cuts(0, 48, 5, 24, 8)[:3] == [(0, 8), (8, 13), (13, 18)]              # a block whole
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(qkv_span=20))
    verify_tile(tp)
    spec = cfg.attn(1)
    hd, vd, rd, G = spec.head_dim, spec.v_head_dim, spec.rope_dim, spec.n_heads // spec.n_kv_heads
    tasks = [t for t in tp.tasks if t.kind == "qkv_rope_kv" and t.attrs["op"] == "L1.q_rot"]
    assert tasks and all(t.attrs["rope_part"] == 3 for t in tasks)
    for g in range(spec.n_kv_heads):
        mine = [t for t in tasks if t.attrs["head"] == g]
        assert {t.signals[0][0] for t in mine} == {f"c.L1.q_rot.h{g}"}
        for m, lo, n, h, r in (("wq", g * G * hd, G * hd, hd, rd), ("wk", g * hd, hd, hd, rd), ("wv", g * vd, vd, vd, 0)):
            spans = [(t.attrs["row0"], t.attrs["row1"]) for t in mine if t.attrs.get(m)]
            assert spans == span_cuts(lo, lo + n, 20, h, r)
            assert all(not (0 < b % h < r) for _, b in spans[:-1])         # no rotary block cut
            for t in (t for t in mine if t.attrs.get(m)):
                (w,) = [x for x in t.writes]
                if m == "wq":
                    assert w.dims[1][:2] == (t.attrs["row0"], t.attrs["row1"])
                else:
                    assert w.dims[0][:2] == (g, g + 1) and w.dims[2][:2] == (t.attrs["row0"] - lo, t.attrs["row1"] - lo)


@pytest.mark.parametrize("fold", [0, 1])
def test_expert_queue_parts_share_a_sync_buffer_the_plan_task_zeroes(tiny, fold):
    """expert_queue: the plan task writes (zeroes) the layer's sync buffer, [2 + slots] int32;
    every expert part reads and writes it, expert_down's parts wait for ONE up_gate part (their
    bodies wait per slot), and the verifiers accept exactly that protocol: without the shared
    `sync` attr the act reads are a missing dependency. With fold_reduce the split router's
    tasks take the plan task's writes (the last to arrive writes the plan and the zeroes)."""
    from tilecomp.passes.fold_reduce import fold_reduce
    from tilecomp.passes.schedule import ScheduleOptions, schedule
    from tilecomp.errors import ScheduleError
    cfg, _, c = tiny
    tp = lower(c.fused, LowerOptions(expert_parts=3, expert_queue=1, router_block=6 if fold else 0))
    if fold:
        tp = fold_reduce(tp)
    sync = "L1.mlp.plan.sync"
    S = tp.buffers["L1.mlp.plan"].shape[0] - 1
    assert tp.buffers[sync].shape == (2 + S,) and tp.buffers[sync].dtype == "int32"
    zeroing = [t for t in tp.tasks if t.kind == "moe_route" and any(w.buffer == sync for w in t.writes)]
    assert zeroing and all(t.attrs["sync"] == sync and t.attrs["n_sync"] == 2 + S for t in zeroing)
    assert len(zeroing) == (3 if fold else 1)
    ups = [t for t in tp.tasks if t.kind == "expert_up_gate" and t.attrs["op"] == "L1.out"]
    downs = [t for t in tp.tasks if t.kind == "expert_down" and t.attrs["op"] == "L1.out"]
    assert len(ups) == len(downs) == 3
    for t in ups + downs:
        assert t.attrs["sync"] == sync and any(r.buffer == sync for r in t.reads + t.writes)
    per_step = tp.counters["c.L1.out.act"].expected
    assert per_step == 3 and all(("c.L1.out.act", 1) in t.waits for t in downs)
    sched = schedule(tp, ScheduleOptions(programs=4))
    verify_schedule(sched)
    first_down = min(i for q in sched.programs for i, t in enumerate(q) if tp.tasks[t] in downs)
    assert first_down >= 0
    # every program runs its up_gate parts before its down parts (the scheduler orders the down
    # parts after every up_gate part: none can wait on a unit nobody has taken)
    for q in sched.programs:
        kinds_in_order = [tp.tasks[i].kind for i in q if tp.tasks[i] in ups + downs]
        assert kinds_in_order == sorted(kinds_in_order, key=lambda k: k != "expert_up_gate")
    # the protocol is what lets the down parts read act with a partial wait
    broken = dataclasses.replace(tp, tasks=[dataclasses.replace(t, attrs={k: v for k, v in t.attrs.items()
                                                                          if k != "sync"})
                                            if t in downs[:1] else t for t in tp.tasks])
    with pytest.raises(ScheduleError, match=r"missing dependency: task t\d+ \(expert_(down|up_gate)\) reads L1\.(out\.act|mlp\.plan\.sync)"):
        verify_schedule(schedule(broken, ScheduleOptions(programs=4)))


def test_expert_queue_needs_the_parts_form(tiny):
    """The queue is a form of the parts: with the per-slot form (expert_parts 0, or the plain
    step's one row under the automatic choice) there is no queue and no sync buffer."""
    _, _, c = tiny
    for graph, parts in ((c.fused, 0), (c.plain_fused, -1)):
        tp = lower(graph, LowerOptions(expert_parts=parts, expert_queue=1, programs=8))
        assert not any("sync" in t.attrs for t in tp.tasks)
        assert not any(b.endswith(".sync") for b in tp.buffers)
    tp = lower(c.fused, LowerOptions(expert_parts=-1, expert_queue=1, programs=8))
    assert sum("sync" in t.attrs for t in tp.tasks if t.kind == "expert_down" and t.attrs["op"] == "L1.out") == 8


def test_xeven_only_for_whole_expert_tiles_in_a_loop_that_reads_no_further(tiny):
    """The program launches the kernel with XEVEN (no bounds masks on the expert loads; a tile
    switch, off by default) only when it is asked for, every expert tile lies inside its matrix
    and the K loop loads only the tile it uses; and with XQUEUE only when every expert task has
    the queue (a program mixing both forms is refused)."""
    from tilecomp.errors import ScheduleError
    from tilecomp.runtime.compiled import expert_queue, expert_tiles_whole, tile_constexprs
    cfg, _, c = tiny
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    gpu = dict(BLOCK_NX=I, BLOCK_KX=32, XPIPE=1, MX_DOT=9)
    parts = lower(c.fused, LowerOptions(expert_parts=3))
    assert D % I == 0 and expert_tiles_whole(parts, gpu) == 1
    launch = dict(gpu, BLOCK_N=32, BLOCK_NC=32, BLOCK_NH=32)
    assert tile_constexprs(parts, dict(launch, XEVEN=1), widen=False)["XEVEN"] == 1
    assert tile_constexprs(parts, dict(launch, XEVEN=0), widen=False)["XEVEN"] == 0     # --tile XEVEN=0
    assert tile_constexprs(parts, dict(launch, XEVEN=1, XPIPE=0), widen=False)["XEVEN"] == 0
    assert expert_tiles_whole(parts, dict(gpu, BLOCK_NX=2 * I)) == 0        # up_gate's rows: half a tile
    assert expert_tiles_whole(parts, dict(gpu, BLOCK_KX=3 * 32)) == 0       # K not whole steps
    assert expert_tiles_whole(parts, dict(gpu, XPIPE=0)) == 0               # register prefetch reads ahead
    assert expert_tiles_whole(parts, dict(gpu, MX_DOT=4)) == 0
    slots = lower(c.fused, LowerOptions(expert_parts=0, expert_block_n=I // 2, expert_down_block_n=D))
    assert expert_tiles_whole(slots, dict(gpu, BLOCK_NX=I // 2)) == 1
    assert expert_tiles_whole(slots, dict(gpu, BLOCK_NX=I // 4)) == 1
    assert expert_tiles_whole(slots, gpu) == 0                               # a task of half a tile
    assert expert_queue(parts) == 0
    queued = lower(c.fused, LowerOptions(expert_parts=3, expert_queue=1))
    assert expert_queue(queued) == 1
    mixed = dataclasses.replace(queued, tasks=[dataclasses.replace(t, attrs={k: v for k, v in t.attrs.items()
                                                                            if k != "sync"})
                                               if t.kind == "expert_down" and t.attrs["op"] == "L1.out" else t
                                               for t in queued.tasks])
    with pytest.raises(ScheduleError, match="has no expert queue"):
        expert_queue(mixed)
