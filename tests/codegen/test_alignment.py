"""The WALIGN hint (16-byte weight loads) holds for every record the engine and compiler make;
the AALIGN hint (16-byte fp32 activation loads) is lowered to what the records allow."""
import re

import pytest
import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.kernels import weight_alignment
from tilecomp.errors import ScheduleError
from tilecomp.models.presets import preset


def test_presets_get_the_16_byte_hint_and_odd_dims_do_not():
    for name in ("tiny", "small", "mimo-v2-flash"):
        assert weight_alignment(*preset(name, 2)) == 8
    cfg, dcfg = preset("tiny", 2)
    cfg.intermediate_size += 4
    assert weight_alignment(cfg, dcfg) == 1


def test_misaligned_weight_offset_is_named():
    rec = L.TaskRecord("linear", 7, dict(w=64, w_up=-1, k_dim=100, k0=0, k1=100))
    with pytest.raises(ScheduleError, match=r"linear L0.q: arg k_dim=100 is not a multiple of WALIGN=8"):
        L.check_alignment([[rec]], 8, {7: "L0.q"})
    L.check_alignment([[rec]], 1)                                  # no hint: nothing to check


def test_compiled_step_records_are_aligned():
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    from tilecomp.passes.pipeline import compile_model, engine_options
    from tilecomp.runtime.compiled import RecordBuilder
    from tilecomp.runtime.megakernel import MegakernelEngine
    torch.manual_seed(0)
    cfg, dcfg = preset("tiny", 2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    given = compile_model(cfg, dcfg, engine_options(32, 4, False))           # the GPU options
    # the engine's own programs (compiled with its switches) and the ones it is given
    for engine in (MegakernelEngine(target, draft, max_len=32, programs=4, qkv_q_heads=1),
                   MegakernelEngine(target, draft, max_len=32, programs=4, schedule=given),
                   MegakernelEngine(target, None, max_len=32, programs=4, qkv_q_heads=1)):
        walign = engine.consts["WALIGN"]
        assert walign == 8
        programs = [engine.schedule, engine.prefill_schedule, engine.plain_schedule]
        assert (programs[0] is None) == (engine.draft is None) and all(programs[1:])
        for tp in filter(None, programs):
            queues = RecordBuilder(engine.builder, tp).queues()
            L.check_alignment(queues, walign)
            # every activation offset / row length of the presets allows 16-byte loads
            assert L.act_alignment(queues, 4) == 4
        assert all(step.kernel.constexprs["AALIGN"] == 4 for step in map(engine.step_program, ("prefill", "plain")))
    # the RMSNorm gains sit where the kernels read them (NORM_F32), and a record naming a gain
    # in the other arena is refused with the gain named
    for norm_f32, arena, other in ((0, "w", "f32"), (1, "f32", "w")):
        eng = MegakernelEngine(target, None, max_len=32, programs=4, qkv_q_heads=1, tiles={"NORM_F32": norm_f32})
        assert eng.builder.slots["model.layers.0.input_layernorm.weight"].arena == arena == L.norm_arena(eng.consts)
        assert eng.builder.slots["model.norm.weight"].arena == arena
        assert eng.builder.slots["model.layers.0.self_attn.q_proj.weight"].arena == "w"
        RecordBuilder(eng.builder, eng.plain_schedule, norm_arena=arena).queues()
        with pytest.raises(ScheduleError, match=rf"RMSNorm gain model\.layers\.\d+\.\w+layernorm\.weight is in "
                                                rf"the '{arena}' arena, the kernels read gains from '{other}'"):
            RecordBuilder(eng.builder, eng.plain_schedule, norm_arena=other).queues()


def test_activation_alignment_is_lowered_to_what_the_records_allow():
    """act_alignment: the largest power of 2 <= cap dividing every hinted activation arg (absent
    args, -1, do not count); args other kinds or other names hold are not constrained."""
    lin = L.TaskRecord("linear", 1, dict(x=128, x_stride=64, res=-1, res_stride=0, y=256, y_stride=64, k_dim=3))
    assert L.act_alignment([[lin]], 4) == 4
    assert L.act_alignment([[lin]], 1) == 1
    odd = L.TaskRecord("lm_head", 2, dict(x=130, x_stride=64, dim=4096))     # x: a row of a 2-wide offset
    assert L.act_alignment([[lin], [odd]], 4) == 2
    assert L.act_alignment([[lin, L.TaskRecord("expert_down", 3, dict(act=64, inter=37, out=0, dim=64))]], 4) == 1
    assert L.act_alignment([[L.TaskRecord("attn_partial", 4, dict(q=3))]], 4) == 4
    # the reductions' and embed's rows (their 16-byte loads and stores, version 25)
    comb = dict(part=0, res=-1, y=64, dim=4096, n0=0, n1=128)
    assert L.act_alignment([[L.TaskRecord("moe_combine", 5, comb)]], 4) == 4
    assert L.act_alignment([[L.TaskRecord("moe_combine", 5, dict(comb, n1=66))]], 4) == 2
    red = dict(part=0, split_stride=32768, n_dim=4096, n0=0, n1=64, res=128, y=256, y_stride=4096)
    assert L.act_alignment([[L.TaskRecord("linear_reduce", 6, red)]], 4) == 4
    assert L.act_alignment([[L.TaskRecord("linear_reduce", 6, dict(red, split_stride=32769))]], 4) == 1
    assert L.act_alignment([[L.TaskRecord("embed", 7, dict(out=6, table=0, dim=64))]], 4) == 2


def test_embed_table_rows_must_be_weight_aligned():
    ok = L.TaskRecord("embed", 1, dict(table=64, mask_row=-1, dim=64, out=0))
    L.check_alignment([[ok]], 8)
    with pytest.raises(ScheduleError, match="embed .*arg table=68 is not a multiple of WALIGN=8"):
        L.check_alignment([[L.TaskRecord("embed", 1, dict(ok.args, table=68))]], 8)


def test_the_frame_loads_hinted_activation_args_with_multiple_of():
    from tilecomp.codegen.triton_gen import generate_kernel
    tiles = dict(BLOCK_T=16, BLOCK_N=32, BLOCK_K=32, BLOCK_TA=16, BLOCK_S=16, BLOCK_HD=16, BLOCK_HV=16)
    src = generate_kernel(["linear", "attn_partial"], name="k", constexprs=tiles)
    assert "r_x = tl.multiple_of(tl.load(rec + " in src and "r_y_stride = tl.multiple_of(" in src
    assert "r_w = tl.multiple_of(tl.load(rec + " in src and "r_q = tl.load(rec + " in src   # weights: WALIGN; q: none
    assert re.search(r"r_w = tl.multiple_of\(tl.load\(rec \+ \d+\), WALIGN\)", src)
    assert "r_part_acc = tl.multiple_of(tl.load(rec + " in src                            # attention's fixed 8
    assert "AALIGN: tl.constexpr" in src
