import dataclasses


from tilecomp.ir.graph import OpKind
from tilecomp.passes.fuse_norm_prologue import fuse_norm_prologue
from tilecomp.passes.fuse_rope_kv import fuse_rope_kv


def test_qkv_rope_and_cache_writes_fuse_per_attention(tiny_step, count_kinds):
    graph = tiny_step.graph
    for prepared in (graph, fuse_norm_prologue(graph)):
        fused = fuse_rope_kv(prepared)
        after = count_kinds(fused)
        assert after[OpKind.QKV_ROPE_KV] == count_kinds(graph)[OpKind.ATTENTION]
        # the draft's context K/V (rope + counted cache write, no query) stay unfused
        n_draft = sum(1 for op in graph.ops if op.kind is OpKind.KV_WRITE and op.kwarg("count"))
        assert after[OpKind.KV_WRITE] == n_draft and after[OpKind.ROPE] == n_draft // 2
        tiny_step.assert_same_outputs(fused)
    target = next(op for op in fused.ops if op.kind is OpKind.QKV_ROPE_KV and op.attrs.get("value_scale"))
    assert target.kwarg("norm") and target.attrs["rope_dim"] == 8


def test_mismatched_positions_do_not_fuse(tiny_step, count_kinds):
    graph = tiny_step.graph
    ops = list(graph.ops)
    i = next(i for i, op in enumerate(ops) if op.kind is OpKind.ROPE and op.args[1] == "%pos")
    ops[i] = dataclasses.replace(ops[i], args=(ops[i].args[0], "%n_new"))   # q roped at another position
    broken = dataclasses.replace(graph, ops=ops)
    fused = fuse_rope_kv(broken)
    assert count_kinds(fused)[OpKind.QKV_ROPE_KV] == count_kinds(graph)[OpKind.ATTENTION] - 1
