"""moe_route -> expert_up_gate -> expert_down -> moe_combine through the megakernel frame
on CPU, against the reference MoE block of models/mimo.py (Router + MXFP4Experts).

One program runs the whole chain; each stage waits on the counter the previous
stage signals, as the lowering chains them. Slots past the plan's count hold
NaN garbage: a body that reads them poisons the result.
"""
import dataclasses

import pytest
import torch
import triton

from tilecomp.codegen.harness import run_tasks
from tilecomp.codegen.layout import TaskRecord, float_bits, norm_arena
from tilecomp.models.mimo import MoE, RMSNorm
from tilecomp.models.mxfp4 import quantize_mxfp4
from tilecomp.models.presets import preset
from tilecomp.runtime.buffers import ArenaBuilder

BLOCK_N, BLOCK_K = 32, 32


def make_moe(gen, *, dim, inter, n_experts, top_k, scaling=None, norm_topk=True):
    cfg, _ = preset("tiny")
    cfg = dataclasses.replace(cfg, hidden_size=dim, moe_intermediate_size=inter,
                              n_routed_experts=n_experts, num_experts_per_tok=top_k,
                              routed_scaling_factor=scaling, norm_topk_prob=norm_topk)
    moe = MoE(cfg, torch.float32, "mxfp4")
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(n_experts, dim, generator=gen) * 0.3)
        moe.gate.e_score_correction_bias.copy_(torch.randn(n_experts, generator=gen) * 0.3)
        for e in range(n_experts):
            moe.experts.set_expert(e, *(torch.randn(n, k, generator=gen) * 0.2 for n, k in
                                        ((inter, dim), (inter, dim), (dim, inter))))
    return moe


def moe_arenas(moe, x, norm_w, n_slots, *, logits_in=False):
    T, D = x.shape
    ex = moe.experts
    E, inter = ex.gate_proj_blocks.shape[:2]
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32")
    if logits_in:
        b.add("logits", x @ moe.gate.weight.T, "f32")
    b.add("norm", norm_w, norm_arena({}))
    b.add("gate", moe.gate.weight.detach(), "f32")
    b.add("bias", moe.gate.e_score_correction_bias, "f32")
    for name in ("gate_proj", "up_proj", "down_proj"):
        b.add(f"{name}_blocks", getattr(ex, f"{name}_blocks"), "u8")
        b.add(f"{name}_scales", getattr(ex, f"{name}_scales"), "u8")
    b.reserve("xn", (T, D), "f32")
    b.add("plan", torch.full((1 + n_slots,), -7, dtype=torch.int32), "i32")
    b.add("sync", torch.full((2 + n_slots,), 7, dtype=torch.int32), "i32")    # the plan task zeroes it
    b.add("weights", torch.full((n_slots, T), float("nan")), "f32")
    b.add("act", torch.full((n_slots, T, inter), float("nan")), "f32")
    b.add("part", torch.full((n_slots, T, D), float("nan")), "f32")
    b.reserve("y", (T, D), "f32")
    return b


def column_ranges(n, task_n):
    """(n0, n1) per task: BLOCK_N tiles with n1 absent (0), or wider task ranges."""
    if task_n is None:
        return [(n0, 0) for n0 in range(0, n, BLOCK_N)]
    return [(n0, min(n, n0 + task_n)) for n0 in range(0, n, task_n)]


def moe_records(b, moe, T, D, n_slots, *, logits_in=False, task_n=None, parts=0, queue=False):
    E, inter = moe.experts.gate_proj_blocks.shape[:2]
    rsf = moe.gate.routed_scaling_factor
    route = TaskRecord("moe_route", 0, dict(
        x=b.offset("logits") if logits_in else b.offset("x"), norm=-1 if logits_in else b.offset("norm"),
        eps_bits=float_bits(1e-5), gate=-1 if logits_in else b.offset("gate"),
        bias=b.offset("bias"), xn=-1 if logits_in else b.offset("xn"), plan=b.offset("plan"),
        weights=b.offset("weights"), n_experts=E, top_k=moe.gate.top_k, scale_bits=float_bits(rsf),
        norm_topk=int(moe.gate.norm_topk_prob), dim=D, n_rows=T,
        **(dict(sync=b.offset("sync"), n_sync=2 + n_slots) if queue else {})), signals=[0])
    # queue (XQUEUE, LowerOptions.expert_queue): the parts take units from the sync buffer, and
    # expert_down's parts wait for one up_gate part (then per slot in the body)
    sync = dict(sync=b.offset("sync")) if queue else {}
    up_cols, down_cols = column_ranges(inter, task_n), column_ranges(D, task_n)
    # parts > 0: `parts` tasks per expert kind that split the routed (slot, tile) units (slot,
    # n0, n1 unused: they get values that would be wrong if a body read them)
    units = [(0, (7, 3), j) for j in range(parts)] if parts else \
        [(s, c, 0) for s in range(n_slots) for c in up_cols]
    down_units = [(0, (7, 3), j) for j in range(parts)] if parts else \
        [(s, c, 0) for s in range(n_slots) for c in down_cols]
    n_up, n_down = len(units), len(down_units)
    up = [TaskRecord("expert_up_gate", 1 + i, dict(
        x=b.offset("xn"), plan=b.offset("plan"), gate_blocks=b.offset("gate_proj_blocks"),
        gate_scales=b.offset("gate_proj_scales"), up_blocks=b.offset("up_proj_blocks"),
        up_scales=b.offset("up_proj_scales"), act=b.offset("act"), slot=s, n0=n0, n1=n1, inter=inter,
        dim=D, n_rows=T, weights=b.offset("weights"), part=j, parts=parts, **sync), waits=[(0, 1, 1)],
        signals=[1])
        for i, (s, (n0, n1), j) in enumerate(units)]
    down = [TaskRecord("expert_down", 1000 + i, dict(
        act=b.offset("act"), plan=b.offset("plan"), weights=b.offset("weights"),
        blocks=b.offset("down_proj_blocks"), scales=b.offset("down_proj_scales"), out=b.offset("part"),
        slot=s, n0=n0, n1=n1, inter=inter, dim=D, n_rows=T, part=j, parts=parts, **sync),
        waits=[(1, 1 if queue else n_up, n_up)], signals=[2])
        for i, (s, (n0, n1), j) in enumerate(down_units)]
    combine = [TaskRecord("moe_combine", 2000 + i, dict(
        part=b.offset("part"), plan=b.offset("plan"), n_slots=n_slots, res=b.offset("x"),
        y=b.offset("y"), n0=n0, n1=n1, dim=D, n_rows=T, weights=b.offset("weights"), top_k=moe.gate.top_k),
        waits=[(2, n_down, n_down)], signals=[3])
        for i, (n0, n1) in enumerate(down_cols)]
    return [route] + up + down + combine


def run_moe(moe, x, norm_w, n_slots, *, logits_in=False, stages=None, task_n=None, mx_dot=3, parts=0,
            block_kx=None, tiles=None):
    T, D = x.shape
    b = moe_arenas(moe, x, norm_w, n_slots, logits_in=logits_in)
    arenas = b.build()
    queue = bool((tiles or {}).get("XQUEUE"))
    recs = moe_records(b, moe, T, D, n_slots, logits_in=logits_in, task_n=task_n, parts=parts, queue=queue)
    if stages is not None:
        recs = [r for r in recs if r.kind in stages]
    E = moe.experts.gate_proj_blocks.shape[0]
    k = moe.gate.top_k
    const = dict(BLOCK_T=16, BLOCK_E=max(16, triton.next_power_of_2(E)), BLOCK_K=BLOCK_K,
                 BLOCK_KS=max(2, triton.next_power_of_2(k)), BLOCK_SL=max(16, triton.next_power_of_2(n_slots)),
                 BLOCK_KX=block_kx or BLOCK_K, BLOCK_KR=BLOCK_K, BLOCK_RN=BLOCK_N, BLOCK_N=BLOCK_N, BLOCK_NX=BLOCK_N, MX_DOT=mx_dot,
                 **(tiles or {}))
    run_tasks([recs], arenas, const, n_counters=4)
    return arenas


def reference_plan(moe, xn):
    weights, idx = moe.gate(xn)                                           # [T, A]
    experts = idx.unique().tolist()                                       # ascending
    dense = torch.zeros(xn.shape[0], moe.experts.gate_proj_blocks.shape[0])
    dense.scatter_(1, idx, weights)
    return experts, dense[:, experts].T                                   # [count, T]


CASES = [
    # T, dim, inter, E, top_k, scaling, norm_topk, task_n (columns per task; None: BLOCK_N)
    pytest.param(8, 64, 32, 16, 4, None, True, None, id="tiny-T8"),
    pytest.param(1, 64, 32, 16, 4, None, True, None, id="tiny-T1"),
    pytest.param(5, 96, 64, 24, 3, 2.5, True, 64, id="wide-tasks-partial-tiles-scaled"),
    pytest.param(3, 64, 32, 8, 2, 1.5, False, None, id="no-renorm"),
]


@pytest.mark.parametrize("T,dim,inter,E,top_k,scaling,norm_topk,task_n,mx_dot,parts",
                         [pytest.param(*c.values, 3, 0, id=c.id) for c in CASES]
                         + [pytest.param(*c.values, 4, 0, id=c.id + "-gemv") for c in (CASES[0], CASES[2])]
                         + [pytest.param(*CASES[0].values, 3, 3, id="tiny-T8-3-parts"),
                            pytest.param(*CASES[2].values, 3, 5, id="partial-tiles-5-parts"),
                            pytest.param(*CASES[1].values, 3, 40, id="T1-more-parts-than-units"),
                            pytest.param(*CASES[0].values, 4, 3, id="tiny-T8-3-parts-gemv"),
                            pytest.param(*CASES[2].values, 5, 0, id="partial-tiles-weights-left"),
                            pytest.param(*CASES[0].values, 5, 3, id="tiny-T8-3-parts-weights-left"),
                            pytest.param(*CASES[0].values, 6, 3, id="tiny-T8-3-parts-word-codes"),
                            pytest.param(*CASES[2].values, 6, 0, id="partial-tiles-word-codes"),
                            pytest.param(*CASES[2].values, 7, 0, id="partial-tiles-one-dot"),
                            pytest.param(*CASES[0].values, 7, 3, id="tiny-T8-3-parts-one-dot")])
def test_moe_chain_matches_reference(T, dim, inter, E, top_k, scaling, norm_topk, task_n, mx_dot, parts):
    """mx_dot 4: the experts' GEMV path (only the tokens that chose an expert; act of the others
    stays NaN garbage, so a body that reads it poisons y). parts > 0: the experts as `parts`
    tasks per kind that split the routed (slot, tile) units at run time; the parts' boundaries
    fall inside slots, and with more parts than units some parts are empty."""
    check_moe_chain(T, dim, inter, E, top_k, scaling, norm_topk, task_n, mx_dot, parts)


@pytest.mark.parametrize("tiles", [dict(BLOCK_NC=32, STAGES_C=5), dict(XFLAT=1, STAGES_C=1),
                                   dict(COMB_GATHER=1, BLOCK_NC=32)],
                         ids=["combine-narrow-tiles-deep-pipeline", "flat-units-combine-unpipelined",
                              "combine-gathers-the-chosen-slots"])
def test_moe_chain_under_combine_and_unit_loop_switches(tiles):
    """moe_combine's own column tile (BLOCK_NC, several partial tiles per 64-column task here)
    and slot pipeline depth (STAGES_C), the experts' flattened unit loop (XFLAT), and the
    combine's gather of each row's chosen slots (COMB_GATHER): the same y."""
    check_moe_chain(*CASES[2].values, mx_dot=3, parts=5, tiles=tiles)


@pytest.mark.parametrize("case,mx_dot,parts", [(CASES[2], 3, 5), (CASES[1], 3, 40), (CASES[0], 4, 3)],
                         ids=["partial-tiles-5-parts", "T1-more-parts-than-units", "gemv-3-parts"])
def test_moe_chain_with_the_expert_queue(case, mx_dot, parts):
    """XQUEUE (LowerOptions.expert_queue): the plan task zeroes the sync buffer (it starts at 7
    here), the parts take their units from it, expert_down waits for one up_gate part and then
    per slot in its body: the same y, every unit taken once ([0] / [1]: the units plus one
    failed take per part) and each routed slot's count at its up_gate units."""
    arenas = check_moe_chain(*case.values, mx_dot=mx_dot, parts=parts, tiles=dict(XQUEUE=1))
    T, dim, inter = case.values[:3]
    count = int(arenas.view("plan")[0])
    sync = arenas.view("sync").tolist()
    up_tiles, down_tiles = -(-inter // BLOCK_N), -(-dim // BLOCK_N)
    assert sync[:2] == [count * up_tiles + parts, count * down_tiles + parts]
    assert sync[2:2 + count] == [up_tiles] * count and not any(sync[2 + count:])


@pytest.mark.parametrize("mx_dot,parts,queue", [(3, 3, 0), (3, 0, 0), (5, 3, 1)],
                         ids=["parts", "per-slot-tasks", "weights-left-queue"])
def test_moe_chain_with_whole_tiles_and_no_bounds_masks(mx_dot, parts, queue):
    """XEVEN (every expert tile inside its matrix, runtime/compiled.expert_tiles_whole): the weight
    loads and the K of the input loads lose their bounds masks, the same y. With a K that is not
    a multiple of the K step (96 columns, 64-column steps) the unmasked loads read the next row's
    bytes: y is wrong, which is why the program sets XEVEN only for whole tiles."""
    tiles = dict(XPIPE=1, XEVEN=1, XQUEUE=queue)
    check_moe_chain(*CASES[0].values[:-1], None, mx_dot=mx_dot, parts=parts, tiles=tiles)
    T, dim, inter, E, top_k, scaling, norm_topk, _ = CASES[2].values
    gen = torch.Generator().manual_seed(3)
    moe = make_moe(gen, dim=dim, inter=inter, n_experts=E, top_k=top_k, scaling=scaling, norm_topk=norm_topk)
    x = torch.randn(T, dim, generator=gen)
    y = {even: run_moe(moe, x, torch.ones(dim), E, parts=3, block_kx=64, tiles=dict(XPIPE=1, XEVEN=even)).view("y")
         for even in (0, 1)}
    with torch.no_grad():
        want = x + moe(RMSNorm(dim, 1e-5, torch.float32)(x)[None])[0]
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[1], want, rtol=1e-3, atol=1e-3)


def check_moe_chain(T, dim, inter, E, top_k, scaling, norm_topk, task_n, mx_dot, parts, tiles=None):
    gen = torch.Generator().manual_seed(100 * T + dim + E)
    moe = make_moe(gen, dim=dim, inter=inter, n_experts=E, top_k=top_k, scaling=scaling,
                   norm_topk=norm_topk)
    x = torch.randn(T, dim, generator=gen)
    norm = RMSNorm(dim, 1e-5, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen))
        xn = norm(x)
        want_y = x + moe(xn[None])[0]
    experts, weights = reference_plan(moe, xn)
    n_slots = min(E, len(experts) + 2)               # more slots than chosen experts: some empty
    arenas = run_moe(moe, x, norm.weight.detach(), n_slots, task_n=task_n, mx_dot=mx_dot, parts=parts,
                     block_kx=128 if mx_dot == 6 else None, tiles=tiles)   # 6: the GPU's K step, word tails masked
    plan = arenas.view("plan")
    count = int(plan[0])
    assert count == len(experts) and plan[1:1 + count].tolist() == experts
    assert count < n_slots, "the case must exercise empty slots"
    torch.testing.assert_close(arenas.view("xn"), xn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(arenas.view("weights")[:count], weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(arenas.view("y"), want_y, rtol=1e-5, atol=1e-5)
    return arenas


def test_combine_gather_is_the_all_slot_sum_bit_for_bit():
    """COMB_GATHER 1 adds each row's chosen slots only, in slot order: the same fp32 bits as the
    sum over every slot below the count (the skipped partials are exact zeros), with some rows
    choosing slots the others did not and empty slots (NaN garbage) past the count."""
    case = CASES[2].values
    got = check_moe_chain(*case, mx_dot=3, parts=0, tiles=dict(COMB_GATHER=1)).view("y").clone()
    want = check_moe_chain(*case, mx_dot=3, parts=0, tiles=dict(COMB_GATHER=0)).view("y")
    assert torch.equal(got, want)


def test_route_from_precomputed_logits():
    """gate < 0: the router logits come from linear tasks; the plan must be the same."""
    gen = torch.Generator().manual_seed(5)
    moe = make_moe(gen, dim=64, inter=32, n_experts=16, top_k=4)
    x = torch.randn(8, 64, generator=gen)
    arenas = run_moe(moe, x, torch.ones(64), 16, logits_in=True, stages={"moe_route"})
    experts, weights = reference_plan(moe, x)
    plan = arenas.view("plan")
    assert plan[1:1 + int(plan[0])].tolist() == experts
    torch.testing.assert_close(arenas.view("weights")[:len(experts)], weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route_dot,rn", [(0, 16), (1, 16), (2, 4)])
def test_split_router_matches_single_task(route_dot, rn):
    """split: logits of expert tiles on separate tasks (+ xn from the e0 == 0 tile), then the
    plan task reads the logits; same plan, weights and xn as the reference. For each router
    product (ROUTE_DOT: the FMA dot, tf32x3, the elementwise [BLOCK_RN, BLOCK_T, BLOCK_KR] form,
    whose 4-row tiles make the [16, 40) range three full tiles and a partial one)."""
    gen = torch.Generator().manual_seed(13)
    T, D, E = 8, 64, 40
    moe = make_moe(gen, dim=D, inter=32, n_experts=E, top_k=4, scaling=2.0)
    x, gain = torch.randn(T, D, generator=gen), 1 + 0.1 * torch.randn(D, generator=gen)
    b = moe_arenas(moe, x, gain, E)
    b.add("logits", torch.full((T, E), float("nan")), "f32")
    arenas = b.build()
    route = moe_records(b, moe, T, D, E)[0]
    # expert ranges [0, 16) (absent e1: one BLOCK_N=16 tile) then [16, 40) (two tiles, one partial)
    first = {} if rn == 16 else {"e1": 16}     # absent e1: one BLOCK_RN tile
    tiles = [TaskRecord("moe_route", 0, dict(route.args, split=1, e0=0, logits=b.offset("logits"), **first),
                        signals=[0]),
             TaskRecord("moe_route", 1, dict(route.args, split=1, e0=16, e1=E, logits=b.offset("logits")),
                        signals=[0])]
    plan_task = TaskRecord("moe_route", 9, dict(route.args, x=b.offset("logits"), gate=-1, norm=-1,
                                                xn=-1), waits=[(0, len(tiles), len(tiles))])
    run_tasks([tiles + [plan_task]], arenas, dict(BLOCK_T=16, BLOCK_E=64, BLOCK_RN=rn, BLOCK_K=32, BLOCK_KR=32,
                                                  ROUTE_DOT=route_dot),
              n_counters=1)
    norm = RMSNorm(D, 1e-5, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(gain)
        xn = norm(x)
    torch.testing.assert_close(arenas.view("logits"), xn @ moe.gate.weight.detach().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(arenas.view("xn"), xn, rtol=1e-5, atol=1e-6)
    experts, weights = reference_plan(moe, xn)
    plan = arenas.view("plan")
    assert plan[1:1 + int(plan[0])].tolist() == experts
    torch.testing.assert_close(arenas.view("weights")[:len(experts)], weights, rtol=1e-5, atol=1e-6)


def test_bias_steers_selection_but_not_weights():
    """A large bias on expert 3 forces it into every token's top-k; its weight is its unbiased score."""
    gen = torch.Generator().manual_seed(9)
    moe = make_moe(gen, dim=64, inter=32, n_experts=16, top_k=2)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[3] = 10.0
    x = torch.randn(4, 64, generator=gen)
    arenas = run_moe(moe, x, torch.ones(64), 16, logits_in=True, stages={"moe_route"})
    plan = arenas.view("plan")
    experts = plan[1:1 + int(plan[0])].tolist()
    assert 3 in experts
    _, weights = reference_plan(moe, x)
    got = arenas.view("weights")[experts.index(3)]
    torch.testing.assert_close(got, weights[experts.index(3)], rtol=1e-5, atol=1e-6)
    assert (got < 1).all() and (got > 0).all()


def test_ties_choose_the_lowest_expert():
    """All scores equal (zero router, zero bias): top-3 is experts 0, 1, 2 with weight 1/3 each."""
    gen = torch.Generator().manual_seed(21)
    moe = make_moe(gen, dim=64, inter=32, n_experts=8, top_k=3)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.e_score_correction_bias.zero_()
    arenas = run_moe(moe, torch.randn(4, 64, generator=gen), torch.ones(64), 8, stages={"moe_route"})
    plan = arenas.view("plan")
    assert plan[:4].tolist() == [3, 0, 1, 2]
    torch.testing.assert_close(arenas.view("weights")[:3], torch.full((3, 4), 1 / 3))


@pytest.mark.parametrize("mode", [0, 3, 4, 5, 7], ids=["branches", "bitcast", "bitcast-gemv", "bitcast-weights-left",
                                                   "bitcast-one-dot"])
def test_mxfp4_dequant_matches_models_mxfp4(mode):
    """Every E2M1 code and a spread of E8M0 scales (including 2, the smallest exact one)
    through one expert_up_gate tile, with both bit-level dequantizations (MX_DOT 0 and 3; 4 is 3
    into multiply-adds)."""
    from tilecomp.models.mxfp4 import dequantize_mxfp4
    gen = torch.Generator().manual_seed(2)
    T, D, inter = 1, 64, 32
    blocks = torch.randint(0, 256, (1, inter, D // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 128, (1, inter, D // 32), generator=gen, dtype=torch.uint8)
    scales[0, :2, 0] = torch.tensor([2, 3], dtype=torch.uint8)
    w = dequantize_mxfp4(blocks, scales)[0]                             # [inter, D]
    x = torch.randn(T, D, generator=gen)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("blocks", blocks, "u8"), b.add("scales", scales, "u8")
    b.add("plan", torch.tensor([1, 0], dtype=torch.int32), "i32")
    b.add("w1", torch.ones(1, T), "f32")
    b.reserve("act", (1, T, inter), "f32")
    arenas = b.build()
    rec = TaskRecord("expert_up_gate", 0, dict(
        x=b.offset("x"), plan=b.offset("plan"), gate_blocks=b.offset("blocks"),
        gate_scales=b.offset("scales"), up_blocks=b.offset("blocks"), up_scales=b.offset("scales"),
        act=b.offset("act"), slot=0, n0=0, n1=0, inter=inter, dim=D, n_rows=T, weights=b.offset("w1")))
    run_tasks([[rec]], arenas, dict(BLOCK_T=16, BLOCK_NX=32, BLOCK_KX=32, MX_DOT=mode))
    h = x @ w.T
    torch.testing.assert_close(arenas.view("act")[0], torch.nn.functional.silu(h) * h,
                               rtol=1e-5, atol=1e-5)
    assert torch.isfinite(arenas.view("act")).all()


def one_expert(gen, T, D, inter, scales_lo, scales_hi, x, act_in, w, edge_scales=(), repack=False, stile=False,
               afrag=False, xtile=None):
    """One expert (random MXFP4 gate / up / down, scale codes in [lo, hi), `edge_scales` on the
    first groups of row 0) in arenas, with an expert_up_gate record over its whole width (act
    from x) and an expert_down record over its whole dim (out from act_in, token weights w).
    repack: the arenas hold the codes as the engine stores them for MX_DOT 9; stile: the scales
    as the engine stores them for STILE 1 (codegen/layout.py tile_scales); afrag: the codes in
    AFRAG's element order before the MX_DOT 9 repack; xtile (BLOCK_NX, BLOCK_KX): the codes
    stored tile by tile after that (XTILE 1, codegen/layout.py tile_blocks).
    Returns (arenas, [up, down], (wg, wu, wd) dequantized)."""
    from tilecomp.models.mxfp4 import dequantize_mxfp4
    def mx(n, k):
        blocks = torch.randint(0, 256, (1, n, k // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(scales_lo, scales_hi, (1, n, k // 32), generator=gen, dtype=torch.uint8)
        if edge_scales:
            scales[0, 0, :len(edge_scales)] = torch.tensor(edge_scales, dtype=torch.uint8)
        return blocks, scales, dequantize_mxfp4(blocks, scales)[0]
    gb, gs, wg = mx(inter, D)
    ub, us, wu = mx(inter, D)
    db, ds, wd = mx(D, inter)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("act_in", act_in, "f32"), b.add("w", w, "f32")
    for name, t in dict(gb=gb, gs=gs, ub=ub, us=us, db=db, ds=ds).items():
        b.add(name, t, "u8")
    b.add("plan", torch.tensor([1, 0], dtype=torch.int32), "i32")
    b.reserve("act", (1, T, inter), "f32"), b.reserve("out", (1, T, D), "f32")
    if repack:
        from tilecomp.codegen.mxfp4_ptx import repack_words
        b.transform(lambda name, t: repack_words(t) if name in ("gb", "ub", "db") else t)
    if afrag:
        from tilecomp.codegen.mxfp4_ptx import afrag_order, repack_words
        b.transform(lambda name, t: repack_words(afrag_order(t)) if name in ("gb", "ub", "db") else t)
    if stile:
        from tilecomp.codegen.layout import tile_scales
        b.transform(lambda name, t: tile_scales(t) if name in ("gs", "us", "ds") else t)
    if xtile:
        from tilecomp.codegen.layout import tile_blocks
        b.transform(lambda name, t: tile_blocks(t, *xtile) if name in ("gb", "ub", "db") else t)
    arenas = b.build()
    up = TaskRecord("expert_up_gate", 0, dict(
        x=b.offset("x"), plan=b.offset("plan"), gate_blocks=b.offset("gb"), gate_scales=b.offset("gs"),
        up_blocks=b.offset("ub"), up_scales=b.offset("us"), act=b.offset("act"), slot=0, n0=0, n1=inter,
        inter=inter, dim=D, n_rows=T, weights=b.offset("w")))
    down = TaskRecord("expert_down", 1, dict(
        act=b.offset("act_in"), plan=b.offset("plan"), weights=b.offset("w"), blocks=b.offset("db"),
        scales=b.offset("ds"), out=b.offset("out"), slot=0, n0=0, n1=D, inter=inter, dim=D, n_rows=T))
    return arenas, [up, down], (wg, wu, wd)


@pytest.mark.parametrize("mode,xpipe,wleft", [(6, 0, 0), (9, 0, 0), (9, 1, 0), (9, 1, 1)],
                         ids=["words", "repacked-words", "repacked-words-xpipe", "repacked-words-xpipe-wleft"])
@pytest.mark.parametrize("salign,inter,block_kx", [(1, 160, 128), (4, 256, 128), (1, 160, 32)],
                         ids=["scale-bytes-K-tail", "scale-words", "one-group-K-steps"])
def test_word_code_dequant_is_exact_over_its_scale_range(salign, inter, block_kx, mode, xpipe, wleft):
    """MX_DOT 6 (32-bit words of codes, one multiply per element, 2^63 on the accumulator) and
    MX_DOT 9 (the engine's repacked words, rotate-and-mask routes in their Triton-op form
    PTX_ASM 0, 2^32 on the accumulator): every E2M1 code at every nibble position of a word,
    with the E8M0 scales at both ends of the range each is exact for, through expert_up_gate AND
    expert_down; a K tail shorter than the tile is masked (with SALIGN 4 the scale rows are
    whole 32-bit words, so K is a multiple of 128 there). XPIPE 1: the K loops as Triton's
    software pipeline (the raw tiles loaded in the step that uses them) instead of the one-step
    register prefetch. WLEFT 1: the dequantized weights as the dots' left operand (rows = M; on
    Hopper Triton then issues wgmma)."""
    gen = torch.Generator().manual_seed(6)
    T, D = 2, 384
    x = torch.randn(T, D, generator=gen) * 1e-3           # keeps the 2^64-scaled row finite
    act_in = torch.randn(1, T, inter, generator=gen)
    edges = {6: (65, 191), 9: (34, 160)}[mode]
    arenas, recs, (wg, wu, wd) = one_expert(gen, T, D, inter, 110, 132, x, act_in, torch.tensor([[1.0, 0.5]]),
                                            edge_scales=edges, repack=mode == 9)
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_NX=32, BLOCK_KX=block_kx, MX_DOT=mode, SALIGN=salign,
                                   XPIPE=xpipe, STAGES_X=3, WLEFT=wleft))
    assert_expert_outputs(arenas, x, act_in, wg, wu, wd, [1.0, 0.5])


def assert_expert_outputs(arenas, x, act_in, wg, wu, wd, w):
    """act and out of one_expert's records against float64 references; the bound is fp32
    rounding of sums whose terms cancel: 1e-5 of the sum of |terms| (a wrong code or scale is off
    by a whole term)."""
    x64, a64 = x.double(), act_in[0].double()
    g, u = x64 @ wg.double().T, x64 @ wu.double().T
    gm, um = x64.abs() @ wg.double().abs().T, x64.abs() @ wu.double().abs().T
    got = arenas.view("act")[0].double()
    want = torch.nn.functional.silu(g) * u
    assert ((got - want).abs() <= 1e-5 * (gm * um.clamp(min=u.abs()) + um * gm) + 1e-30).all()
    w = torch.tensor(w, dtype=torch.float64)[:, None]
    want = (a64 @ wd.double().T) * w
    bound = 1e-5 * (a64.abs() @ wd.double().abs().T) * w
    assert ((arenas.view("out")[0].double() - want).abs() <= bound).all()
    assert torch.isfinite(arenas.view("act")).all() and torch.isfinite(arenas.view("out")).all()


@pytest.mark.parametrize("mode,xpipe,block_kx", [(9, 1, 128), (9, 0, 256), (3, 0, 32)],
                         ids=["words-xpipe", "two-words-K-tail", "scale-bytes"])
def test_tiled_scales_read_the_engines_layout(mode, xpipe, block_kx):
    """STILE 1: the expert kinds read the scales in the engine's K-word-major layout
    (codegen/layout.py tile_scales) as 32-bit words (BLOCK_KX >= 128; up_gate's K = 384 leaves a
    one-word tail in a 256-wide step) or bytes (BLOCK_KX 32), through expert_up_gate and
    expert_down. Scale codes vary per group, so the row-major layout read as tiled fails."""
    gen = torch.Generator().manual_seed(8)
    T, D, inter = 2, 384, 256
    x = torch.randn(T, D, generator=gen) * 1e-3
    act_in = torch.randn(1, T, inter, generator=gen)
    arenas, recs, (wg, wu, wd) = one_expert(gen, T, D, inter, 110, 132, x, act_in, torch.tensor([[1.0, 0.5]]),
                                            repack=mode == 9, stile=True)
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_NX=32, BLOCK_KX=block_kx, MX_DOT=mode, SALIGN=4,
                                   XPIPE=xpipe, STAGES_X=3, WLEFT=1, STILE=1))
    assert_expert_outputs(arenas, x, act_in, wg, wu, wd, [1.0, 0.5])


@pytest.mark.parametrize("block_nx,block_kx,xpipe,stile", [(128, 128, 1, 1), (64, 256, 0, 0), (32, 128, 1, 0)],
                         ids=["rows-permuted-xpipe-stile", "two-blocks-per-step", "small-tile"])
def test_afrag_order_gives_the_exact_products(block_nx, block_kx, xpipe, stile):
    """AFRAG 1 (MX_DOT 9, WLEFT 1): the codes stored in afrag_order (each word holds the K pairs
    the wgmma register operand gives one thread) and the tile's rows loaded in afrag_rows order
    (BLOCK_NX 128: rows r and r + 8 of each warp's 16 swapped in from the second half) are put
    back in K order and natural rows before the dot: both kinds against float64 references, the
    scale codes spread per group. Without the engine's reorder the test fails."""
    gen = torch.Generator().manual_seed(10)
    T, D, inter = 2, 256, 384
    x = torch.randn(T, D, generator=gen) * 1e-3
    act_in = torch.randn(1, T, inter, generator=gen)
    arenas, recs, (wg, wu, wd) = one_expert(gen, T, D, inter, 110, 132, x, act_in, torch.tensor([[1.0, 0.5]]),
                                            afrag=True, stile=bool(stile))
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_NX=block_nx, BLOCK_KX=block_kx, MX_DOT=9, SALIGN=4,
                                   XPIPE=xpipe, STAGES_X=3, WLEFT=1, STILE=stile, AFRAG=1))
    assert_expert_outputs(arenas, x, act_in, wg, wu, wd, [1.0, 0.5])


@pytest.mark.parametrize("mode,xpipe,block_nx,block_kx,afrag", [(3, 0, 32, 32, 0), (9, 1, 32, 128, 0), (9, 1, 128, 128, 1)],
                         ids=["bytes-register-prefetch", "words-xpipe", "afrag-rows-permuted"])
def test_tiled_codes_read_the_engines_layout(mode, xpipe, block_nx, block_kx, afrag):
    """XTILE 1: the expert kinds read the codes stored tile by tile (codegen/layout.py
    tile_blocks: each BLOCK_NX x BLOCK_KX tile one contiguous run), through expert_up_gate (K 256:
    several K steps per row band) and expert_down (K 384), as bytes (MX_DOT 3, with the register
    prefetch's masked read past the row end) and as MX_DOT 9 words (AFRAG's permuted rows
    included): the float64 references. The row-major codes read as tiled fail."""
    gen = torch.Generator().manual_seed(12)
    T, D, inter = 2, 256, 384
    x = torch.randn(T, D, generator=gen) * 1e-3
    act_in = torch.randn(1, T, inter, generator=gen)
    tiles = dict(BLOCK_T=16, BLOCK_NX=block_nx, BLOCK_KX=block_kx, MX_DOT=mode, SALIGN=4, XPIPE=xpipe, STAGES_X=3,
                 WLEFT=int(mode == 9), STILE=1, AFRAG=afrag, XTILE=1)
    for xtile in ((block_nx, block_kx), None) if mode == 3 else ((block_nx, block_kx),):
        g = torch.Generator().manual_seed(13)
        arenas, recs, (wg, wu, wd) = one_expert(g, T, D, inter, 110, 132, x, act_in, torch.tensor([[1.0, 0.5]]),
                                                repack=mode == 9 and not afrag, afrag=bool(afrag), stile=True,
                                                xtile=xtile)
        run_tasks([recs], arenas, tiles)
        if xtile:
            assert_expert_outputs(arenas, x, act_in, wg, wu, wd, [1.0, 0.5])
        else:           # the kernel's tiled addresses on row-major codes
            with pytest.raises(AssertionError):
                assert_expert_outputs(arenas, x, act_in, wg, wu, wd, [1.0, 0.5])


def test_tile_blocks_layout():
    """tile_blocks puts tile (i, j) (rows 4i .., K elements 64j ..) at one contiguous run, rows in
    it in order; shapes that are not whole tiles are refused with the tile named."""
    from tilecomp.codegen.layout import tile_blocks
    blocks = torch.randint(0, 256, (2, 8, 6, 16), dtype=torch.uint8)     # 2 matrices of 8 rows x K 192
    tiled = tile_blocks(blocks, 4, 64)
    assert tiled.shape == blocks.shape and tiled.dtype == torch.uint8
    flat, rows = tiled.reshape(2, -1), blocks.reshape(2, 8, 96)
    for e in range(2):
        for i in range(2):
            for j in range(3):
                start = (i * 3 + j) * 4 * 32
                want = rows[e, 4 * i:4 * i + 4, 32 * j:32 * j + 32].reshape(-1)
                assert torch.equal(flat[e, start:start + 128], want)
    with pytest.raises(ValueError, match=r"rows 8 and K 192 must be multiples of the tile 4 x 128"):
        tile_blocks(blocks, 4, 128)


def test_afrag_source_keeps_each_word_in_one_scale_group():
    """afrag_source is a permutation of the 128 elements of a block; the 8 elements of word
    4q + g are in group g (one E8M0 scale), at the K pairs 2q, 2q + 1 (+ 8, + 16, + 24)."""
    from tilecomp.codegen.mxfp4_ptx import afrag_source
    src = afrag_source()
    assert sorted(src) == list(range(128))
    for w in range(16):
        q, g = divmod(w, 4)
        elems = src[8 * w:8 * w + 8]
        assert {k // 32 for k in elems} == {g}
        assert {k % 8 for k in elems} == {2 * q, 2 * q + 1}


def test_tile_scales_layout():
    """tile_scales: row n's groups 4w .. 4w + 3 become word w * N + n of each matrix; K/32 not a
    multiple of 4 is refused."""
    from tilecomp.codegen.layout import tile_scales
    s = torch.arange(2 * 3 * 8, dtype=torch.uint8).reshape(2, 3, 8)        # E 2, N 3, K/32 8
    t = tile_scales(s).view(2, -1, 4)                                      # words
    for e in range(2):
        for n in range(3):
            for w in range(2):
                assert t[e, w * 3 + n].tolist() == s[e, n, 4 * w:4 * w + 4].tolist()
    with pytest.raises(ValueError, match="multiple of 4"):
        tile_scales(torch.zeros(1, 3, 6, dtype=torch.uint8))


@pytest.mark.parametrize("D,inter,block_kx,salign,mode", [(128, 256, 128, 4, 1), (64, 96, 64, 1, 1),
                                                         (128, 256, 128, 4, 2)],
                         ids=["scale-words", "scale-bytes", "register-prefetch"])
def test_mx_dot_expert_loops_match_dequantized_weights(D, inter, block_kx, salign, mode):
    """MX_DOT=1 (pipelined) and 2 (register prefetch): expert_up_gate and expert_down through
    tl.dot_scaled, with the scales read as 32-bit words (SALIGN 4) or bytes. Activations are bf16 values (the
    path multiplies in bf16), so the products are exact and the bound is fp32's."""
    gen = torch.Generator().manual_seed(7)
    T = 3
    x = torch.randn(T, D, generator=gen).bfloat16().float()
    act_in = torch.randn(1, T, inter, generator=gen).bfloat16().float()
    arenas, recs, (wg, wu, wd) = one_expert(gen, T, D, inter, 120, 130, x, act_in, torch.tensor([[1.0, 0.5, 2.0]]))
    run_tasks([recs], arenas, dict(BLOCK_T=16, BLOCK_NX=32, BLOCK_KX=block_kx, MX_DOT=mode,
                                   SALIGN=salign, STAGES_X=2))
    g, u = x @ wg.T, x @ wu.T
    torch.testing.assert_close(arenas.view("act")[0], torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-5)
    want = (act_in[0] @ wd.T) * torch.tensor([1.0, 0.5, 2.0])[:, None]
    torch.testing.assert_close(arenas.view("out")[0], want, rtol=1e-5, atol=1e-4)


BUILD_SCRIPT = """
import sys
from tilecomp.codegen.build import build_report
from tilecomp.codegen.triton_gen import generate_kernel
kinds, path = sys.argv[1].split(","), sys.argv[2]
const = dict(BLOCK_T=16, BLOCK_TA=16, BLOCK_S=32, BLOCK_HD=256, BLOCK_HV=128, BLOCK_E=256, BLOCK_K=64, BLOCK_KX=64, BLOCK_KR=64,
             BLOCK_RN=16, BLOCK_N=64, BLOCK_NX=64)
open(path, "w").write(generate_kernel(kinds, constexprs=const))
print(build_report(path, programs=132).line())
"""


@pytest.mark.slow
def test_attention_and_moe_bodies_build_for_sm90(tmp_path):
    """The six bodies of this area in one kernel, MiMo-V2-Flash tile sizes (head dims 192/128,
    256 experts), built for Hopper without a GPU (a fresh process: the suite interprets)."""
    import os
    import subprocess
    import sys
    kinds = "attn_partial,attn_reduce,moe_route,expert_up_gate,expert_down,moe_combine"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TILECOMP_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, kinds, str(tmp_path / "k.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sm_90" in out.stdout and out.stdout.strip().endswith(" ok"), out.stdout
