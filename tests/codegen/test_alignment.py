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
            L.check_alignment(RecordBuilder(engine.builder, tp).queues(), walign)
