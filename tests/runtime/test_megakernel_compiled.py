"""The compiler's own scheduled DFlash step (passes/pipeline.compile_model -> schedule) run by
MegakernelEngine on CPU: the same tokens as ReferenceEngine, and no store outside the arenas."""
import torch

from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import CompileOptions, compile_model
from tilecomp.runtime.megakernel import MegakernelEngine
from tilecomp.runtime.reference import ReferenceEngine

MAX_LEN = 64


def test_compiled_schedule_gives_reference_tokens_and_stays_in_bounds(arena_guards):
    torch.manual_seed(7)
    cfg, dcfg = preset("tiny", layers=2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    compiled = compile_model(cfg, dcfg, CompileOptions(max_len=MAX_LEN, programs=1,
                                                       interpreter_order=True))
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, schedule=compiled.schedule)
    ids = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(8)).tolist()
    got = engine.generate(ids, 5)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 5)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance
    assert engine.step_program("dflash").records.shape[0] == len(compiled.schedule.tasks)
    arena_guards()
