"""`tilecomp bench --phases` on CPU (interpreter): every kind of the step is replayed alone,
its tasks really run (they redo their outputs), and the weight bytes it reports are the
model's: the LM head's whole matrix, the q/k/v projections, the routed experts' MXFP4 bytes."""
import pytest
import torch

from tilecomp.bench.floor import MXFP4_BYTES_PER_ELEM
from tilecomp.bench.phases import byte_imbalance, format_phases, replay_phases, task_bytes
from tilecomp.codegen import layout as L
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.runtime.megakernel import MegakernelEngine


@pytest.mark.parametrize("lower,q_heads", [(None, None), ({"expert_parts": 3, "qkv_split_rope": 1}, 1)],
                         ids=["slot-tasks", "expert-parts-split-qkv"])
def test_phase_replay_runs_each_kind_alone_and_counts_its_weight_bytes(lower, q_heads):
    """expert-parts: the experts as 3 tasks per kind that split the routed units at run time;
    their bytes are still the routed experts' (each part's share from the plan's count). With
    one query head per qkv task, k and v are tasks of their own and each q / k head's rotary rows
    are apart from its other rows: q/k/v bytes still add up."""
    torch.manual_seed(3)
    cfg, dcfg = preset("tiny", layers=2)
    target = MiMoForCausalLM(cfg)
    engine = MegakernelEngine(target, DFlashDraft(dcfg, cfg), max_len=64, lower=lower, qkv_q_heads=q_heads)
    engine.generate([5, 9, 2, 7], 1)                      # prefill + one step: real plans and rows
    step = engine.step_program("plain")
    step.launch(engine.arenas)
    step.check()
    kinds_in_step = {name for name, k in L.KINDS.items()
                     if (step.records[:, L.F_KIND] == k.id).any()}
    heads = [r for r in step.records.tolist() if r[L.F_KIND] == L.KIND_IDS["lm_head"]]
    word = L.kind_abi("lm_head").arg_word
    f32 = engine.arenas.data["f32"]
    spots = [(r[word("tile_key")] + r[word("tile")], r[word("n_tiles")]) for r in heads]
    want = [f32[o].item() for o, _ in spots]
    for o, _ in spots:
        f32[o] = -7.0
    one = replay_phases(step, engine.arenas, iters=1, kinds=["lm_head"], alone=True)
    assert [f32[o].item() for o, _ in spots] == want      # the lm_head phase alone redid its keys
    assert set(one["kinds"]) == {"lm_head"} and one["kinds"]["lm_head"]["alone_ms"] > 0
    out = replay_phases(step, engine.arenas, iters=1)
    assert set(out["kinds"]) == kinds_in_step
    wbytes = engine.arenas.data["w"].element_size()
    assert out["kinds"]["lm_head"]["bytes"] == cfg.vocab_size * cfg.hidden_size * wbytes
    specs = [cfg.attn(i) for i in range(cfg.num_hidden_layers)]
    qkv = sum(a.n_heads * a.head_dim + a.n_kv_heads * (a.head_dim + a.v_head_dim) for a in specs)
    assert out["kinds"]["qkv_rope_kv"]["bytes"] == qkv * cfg.hidden_size * wbytes
    qkv_rows = [r for r in step.records.tolist() if r[L.F_KIND] == L.KIND_IDS["qkv_rope_kv"]]
    each = [task_bytes("qkv_rope_kv", r, engine.consts, wbytes, None) for r in qkv_rows]
    assert all(b > 0 for b in each)          # a v-only task streams its v rows too
    plans = [r for r in step.records.tolist() if r[L.F_KIND] == L.KIND_IDS["expert_down"]]
    plan_offsets = {r[L.kind_abi("expert_down").arg_word("plan")] for r in plans}
    routed = sum(int(engine.arenas.data["i32"][o]) for o in plan_offsets)
    expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * MXFP4_BYTES_PER_ELEM
    got = out["kinds"]["expert_up_gate"]["bytes"] + out["kinds"]["expert_down"]["bytes"]
    assert routed > 0 and abs(got - routed * expert) <= 2 * len(plans)
    if lower:
        assert len(plans) == 3 * len(plan_offsets)
    assert "sum of phases" in format_phases(out)
    # launches, not graph replays, here (no CUDA): the table says its times hold the host's work
    assert out["graph"] is False and "host launch work included" in format_phases(out)

    assert out["kinds"]["lm_head"]["byte_imbalance"] == 1.0       # one program in the interpreter
    assert "max/mean B" in format_phases(out)


def test_byte_imbalance_is_the_busiest_programs_bytes_over_the_mean():
    bounds = [0, 2, 3, 3, 5]                     # 4 programs: records 0-1, 2, none, 3-4
    assert byte_imbalance(bounds, {0: 10, 1: 10, 2: 20, 3: 5, 4: 5}) == 1.6         # 20 / (50 / 4)
    assert byte_imbalance(bounds, {0: 5, 2: 5, 3: 5}) == 4 / 3                       # records not of the kind: 0
    assert byte_imbalance([0, 1, 2], {0: 7, 1: 7}) == 1.0
