"""The prefill chunk goes through the same tile passes as the decode step (one lowering)."""
from collections import Counter

import pytest

from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule, verify_tile
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import CompileOptions, compile_model
from tilecomp.settings import Settings


@pytest.fixture(scope="module")
def compiled():
    return compile_model(*preset("tiny"), CompileOptions(programs=4), settings=Settings())


def test_prefill_schedule_verifies(compiled):
    tp = compiled.prefill_schedule
    verify_tile(tp)
    verify_schedule(tp)
    assert tp.annotations["step"] == "prefill_step" and len(tp.programs) == 4
    assert sorted(i for q in tp.programs for i in q) == list(range(len(tp.tasks)))
    assert compiled.prefill_tile.programs is None and len(compiled.prefill_tile.tasks) == len(tp.tasks)


def test_prefill_schedule_has_no_decode_only_tasks(compiled):
    kinds = Counter(t.kind for t in compiled.prefill_schedule.tasks)
    assert kinds["accept"] == 0 and kinds["sample_reduce"] == 1
    assert kinds["qkv_rope_kv"] > 0 and kinds["lm_head"] > 0
    plans = [t for t in compiled.prefill_schedule.tasks if t.kind == "moe_route" and not t.attrs.get("split")]
    assert len(plans) == 5                                  # one routing plan per MoE layer of tiny
    # T = block rows: every row of the chunk is computed (the engine pads a short last chunk)
    embed = next(t for t in compiled.prefill_schedule.tasks if t.kind == "embed")
    assert embed.attrs["n_rows"] == compiled.draft_config.block_size


@pytest.mark.parametrize("stage", ["prefill_tile", "prefill_schedule"])
def test_prefill_stages_round_trip(compiled, stage):
    tp = getattr(compiled, stage)
    text = print_tile(tp)
    again = parse_tile(text)
    assert again == tp and print_tile(again) == text


def test_interpreter_order_prefill_is_one_topological_queue():
    c = compile_model(*preset("tiny"), CompileOptions(interpreter_order=True, max_len=40), settings=Settings())
    assert len(c.prefill_schedule.programs) == 1
    verify_schedule(c.prefill_schedule, interpreter_order=True)


def test_prefill_chunk_option_sets_the_rows():
    c = compile_model(*preset("tiny"), CompileOptions(prefill_chunk=3, max_len=40), settings=Settings())
    embed = next(t for t in c.prefill_schedule.tasks if t.kind == "embed")
    assert embed.attrs["n_rows"] == 3
    verify_schedule(c.prefill_schedule)


def test_prefill_stages_are_dumped(tmp_path):
    compile_model(*preset("tiny"), CompileOptions(max_len=40), settings=Settings(dump_dir=str(tmp_path)))
    for name in ("prefill_step.tile.ir", "prefill_step.schedule.ir"):
        verify_tile(parse_tile((tmp_path / name).read_text()))
