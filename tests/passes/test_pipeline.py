import time

import pytest
import torch

from tilecomp.interpret import run_graph
from tilecomp.ir.graph import OpKind, parse_graph, print_graph, verify_graph
from tilecomp.ir.tile import parse_tile, verify_tile
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import GRAPH_PASSES, CompileOptions, compile_model
from tilecomp.settings import Settings
from tilecomp.trace import build_modules, trace_decode_step


def test_fused_graph_equals_the_traced_graph(tiny_step, count_kinds):
    graph = tiny_step.graph
    fused = graph
    for graph_pass in GRAPH_PASSES:
        fused = graph_pass(fused)
    tiny_step.assert_same_outputs(fused)
    assert set(count_kinds(fused)) <= {OpKind(k) for k in (
        "embed", "rmsnorm", "linear", "rope", "kv_write", "attention", "swiglu_mlp", "moe_route",
        "moe_experts", "qkv_rope_kv", "lm_head", "sample", "accept", "kv_commit", "concat", "slice", "sub")}


def test_sampled_step_is_unchanged_by_fusion(tiny_step):
    graph, params, inputs, _ = tiny_step
    inputs = {**inputs, "%temperature": torch.tensor(0.8), "%top_p": torch.tensor(0.9)}
    expected = run_graph(graph, params, inputs)
    fused = compile_model(*preset("tiny"), CompileOptions(dtype="f32", max_len=40), settings=Settings()).fused
    tiny_step.assert_same_outputs(fused, inputs, expected)


def test_compile_model_is_deterministic_and_dumps(tmp_path):
    cfg, dcfg = preset("tiny")
    lines = []
    a = compile_model(cfg, dcfg, progress=lines.append, settings=Settings(dump_dir=str(tmp_path), debug=2))
    b = compile_model(cfg, dcfg, settings=Settings())
    assert a == b and print_graph(a.fused) == print_graph(b.fused)
    assert any(line.startswith("decode_step: fuse_rope_kv: ") and line.endswith(" ops)") for line in lines)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "decode_step.graph.ir" in names and "prefill_step.graph.fused.ir" in names
    assert "decode_step.04.fuse_rope_kv.ir" in names
    assert "decode_step.tile.ir" in names and "decode_step.schedule.ir" in names
    assert f"decode_step.{len(GRAPH_PASSES) + 1:02d}.tile.ir" in names
    for p in tmp_path.iterdir():
        if ".graph" in p.name or p.name.split(".")[2] in {gp.__name__ for gp in GRAPH_PASSES}:
            verify_graph(parse_graph(p.read_text(), p.name), p.name)
        else:
            verify_tile(parse_tile(p.read_text()))
    assert a.tile is not None and a.schedule is not None and a.schedule.programs is not None


def test_mimo_v2_flash_graph_stages_compile_in_seconds(count_kinds):
    cfg, dcfg = preset("mimo-v2-flash")
    start = time.process_time()
    fused = trace_decode_step(*build_modules(cfg, dcfg), CompileOptions().trace_options())
    for graph_pass in GRAPH_PASSES:
        fused = graph_pass(fused)
    elapsed = time.process_time() - start
    assert cfg.num_hidden_layers == 48
    assert count_kinds(fused)[OpKind.MOE_EXPERTS] == 47
    assert count_kinds(fused)[OpKind.QKV_ROPE_KV] == 48 + dcfg.num_hidden_layers
    assert elapsed < 10, f"graph stages took {elapsed:.1f} CPU s"


@pytest.mark.parametrize("chunk", [0, 9])
def test_bad_prefill_chunk_is_a_clear_error(chunk):
    from tilecomp.errors import TilecompError
    with pytest.raises(TilecompError, match="prefill_chunk: expected 1..8"):
        compile_model(*preset("tiny"), CompileOptions(prefill_chunk=chunk), settings=Settings())


def test_passes_do_not_mutate_their_input(tiny_step):
    graph = tiny_step.graph
    text = print_graph(graph)
    snapshot = parse_graph(text)
    fused = graph
    for graph_pass in GRAPH_PASSES:
        fused = graph_pass(fused)
    assert graph == snapshot and print_graph(graph) == text
    assert fused != graph


def test_fused_prefill_equals_the_traced_prefill(tiny_step):
    compiled = compile_model(*preset("tiny"), CompileOptions(dtype="f32", max_len=40), settings=Settings())
    torch.manual_seed(2)
    inputs = {v.name: torch.randn(v.type.shape) * 0.5 for v in compiled.prefill.inputs if v.type.dtype.is_float}
    inputs.update({"%ids": torch.randint(0, 500, (8,), dtype=torch.int32), "%pos": torch.tensor(13, dtype=torch.int32),
                   "%seed": torch.tensor(1, dtype=torch.int32), "%temperature": torch.tensor(0.0),
                   "%top_p": torch.tensor(1.0)})
    expected = run_graph(compiled.prefill, tiny_step.params, inputs)
    tiny_step.assert_same_outputs(compiled.prefill_fused, inputs, expected)
