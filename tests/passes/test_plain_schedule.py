"""The plain (no-draft, block 1) decode step goes through the same passes as the DFlash step."""
from collections import Counter

import pytest

from tilecomp.errors import TilecompError
from tilecomp.ir.graph import parse_graph, print_graph, verify_graph
from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule, verify_tile
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import CompileOptions, compile_model
from tilecomp.settings import Settings


@pytest.fixture(scope="module")
def compiled():
    return compile_model(*preset("tiny"), CompileOptions(programs=4), settings=Settings())


def test_plain_graph_is_one_token_with_plain_acceptance(compiled):
    g = verify_graph(compiled.plain)
    types = g.types()
    assert g.name == "plain_step" and types["%block"].shape == (1,)
    assert {v.name for v in g.inputs} >= {"%block", "%pos", "%seed", "%temperature", "%top_p"}
    assert not any(v.name.startswith(("%draft_cache", "%taps", "%n_new")) for v in g.inputs)
    accept = next(op for op in g.ops if op.kind.value == "accept")
    assert accept.attrs["mask_token_id"] == -1
    sample = next(op for op in g.ops if op.kind.value == "sample")
    assert sample.attrs["offset"] == 1


def test_plain_schedule_verifies(compiled):
    tp = compiled.plain_schedule
    verify_tile(tp)
    verify_schedule(tp)
    assert tp.annotations["step"] == "plain_step" and len(tp.programs) == 4
    assert sorted(i for q in tp.programs for i in q) == list(range(len(tp.tasks)))
    assert compiled.plain_tile.programs is None and len(compiled.plain_tile.tasks) == len(tp.tasks)


def test_plain_schedule_has_no_draft_tasks(compiled):
    kinds = Counter(t.kind for t in compiled.plain_schedule.tasks)
    assert kinds["accept"] == 1 and kinds["sample_reduce"] == 1
    tasks = compiled.plain_schedule.tasks
    plans = [t for t in tasks if t.kind == "moe_route" and not t.attrs.get("split")]
    moe_layers = {t.attrs["op"] for t in tasks if t.kind == "expert_up_gate"}
    assert moe_layers and len(plans) == len(moe_layers)          # one routing plan per target MoE layer
    accept = next(t for t in compiled.plain_schedule.tasks if t.kind == "accept")
    assert accept.attrs["n_block"] == 1 and accept.attrs["mask_id"] == -1
    assert accept.attrs["next_pos"] == "pos"            # kv_commit folded in: pos += 1 in place
    embed = next(t for t in compiled.plain_schedule.tasks if t.kind == "embed")
    assert embed.attrs["n_rows"] == 1 and embed.attrs["ids"] == "block"
    assert not any(name.startswith("draft_cache") for name in compiled.plain_schedule.buffers)
    # the target's caches are laid out as in the DFlash step (one set of KV slots for both)
    for name, buf in compiled.plain_schedule.buffers.items():
        if name.startswith("cache."):
            assert buf.shape == compiled.schedule.buffers[name].shape, name


@pytest.mark.parametrize("stage", ["plain_tile", "plain_schedule"])
def test_plain_stages_round_trip(compiled, stage):
    tp = getattr(compiled, stage)
    text = print_tile(tp)
    again = parse_tile(text)
    assert again == tp and print_tile(again) == text


def test_plain_graphs_round_trip(compiled):
    for g in (compiled.plain, compiled.plain_fused):
        assert parse_graph(print_graph(g)) == g


def test_interpreter_order_plain_is_one_topological_queue():
    c = compile_model(*preset("tiny"), CompileOptions(interpreter_order=True, max_len=40), settings=Settings())
    assert len(c.plain_schedule.programs) == 1
    verify_schedule(c.plain_schedule, interpreter_order=True)


def test_plain_stages_are_dumped(tmp_path):
    compile_model(*preset("tiny"), CompileOptions(max_len=40), settings=Settings(dump_dir=str(tmp_path)))
    for name in ("plain_step.tile.ir", "plain_step.schedule.ir"):
        verify_tile(parse_tile((tmp_path / name).read_text()))
    for name in ("plain_step.graph.ir", "plain_step.graph.fused.ir"):
        assert verify_graph(parse_graph((tmp_path / name).read_text())).name == "plain_step"


def test_target_without_a_draft_compiles_the_plain_step_and_the_prefill_chunk(tmp_path):
    cfg, _ = preset("tiny")
    c = compile_model(cfg, None, CompileOptions(block=8, max_len=40, interpreter_order=True),
                      settings=Settings(dump_dir=str(tmp_path)))
    assert c.graph is None and c.fused is None and c.schedule is None and c.draft_config is None
    for tp in (c.plain_schedule, c.prefill_schedule):
        verify_tile(tp)
        verify_schedule(tp, interpreter_order=True)
        assert not any(name.startswith(("draft_cache", "taps")) for name in tp.buffers)
        assert not any(name.startswith("dflash.") or (buf.param or "").startswith("dflash.")
                       for name, buf in tp.buffers.items())
    embed = next(t for t in c.prefill_schedule.tasks if t.kind == "embed")
    assert embed.attrs["n_rows"] == 8
    # the caches are laid out as with a draft of the same block size
    with_draft = compile_model(*preset("tiny"), CompileOptions(max_len=40), settings=Settings())
    for name, buf in c.plain_schedule.buffers.items():
        if name.startswith("cache."):
            assert buf.shape == with_draft.plain_schedule.buffers[name].shape, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{step}.{stage}.ir" for step in ("plain_step", "prefill_step")
        for stage in ("graph", "graph.fused", "tile", "schedule"))


def test_target_without_a_draft_needs_a_block_size():
    cfg, dcfg = preset("tiny")
    with pytest.raises(TilecompError, match="needs a positive block size"):
        compile_model(cfg, None, CompileOptions(max_len=40), settings=Settings())
    with pytest.raises(TilecompError, match="the draft's block size is 8"):
        compile_model(cfg, dcfg, CompileOptions(max_len=40, block=4), settings=Settings())
