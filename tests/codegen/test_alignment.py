"""The WALIGN hint (16-byte weight loads) holds for every record the engine and compiler make."""
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


def test_engine_plans_and_compiled_step_records_are_aligned():
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    from tilecomp.passes.pipeline import compile_model, engine_options
    from tilecomp.runtime.compiled import RecordBuilder
    from tilecomp.runtime.megakernel import MegakernelEngine
    torch.manual_seed(0)
    cfg, dcfg = preset("tiny", 2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    schedule = compile_model(cfg, dcfg, engine_options(32, 4, False)).schedule   # the GPU options
    engine = MegakernelEngine(target, draft, max_len=32, programs=4, schedule=schedule, qkv_q_heads=1)
    walign = engine.consts["WALIGN"]
    assert walign == 8
    L.check_alignment(RecordBuilder(engine.builder, schedule).queues(), walign)
    for rows in (1, engine.rows):
        p = engine._planner(rows)
        h = p.target_forward(p.o("prompt"), taps=True)
        p.head("lm_head", p.o(h), p.o("model.norm.weight"), p.o("post_tok"), pos_shift=rows, rows_n=1,
               eps=p.eps)
        L.check_alignment(p.stages.queues(4)[0], walign)
