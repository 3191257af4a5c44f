
from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.passes.fuse_residual import fuse_residual
from tilecomp.passes.fuse_swiglu import fuse_swiglu


def test_residual_adds_become_epilogues(tiny_step, count_kinds):
    graph = tiny_step.graph
    fused = fuse_residual(fuse_swiglu(graph))
    assert OpKind.ADD not in count_kinds(fused)
    with_residual = [op for op in fused.ops if op.kwarg("residual")]
    layers = len([op for op in graph.ops if op.kind is OpKind.ATTENTION])
    assert len(with_residual) == 2 * layers
    assert {op.kind for op in with_residual} == {OpKind.LINEAR, OpKind.SWIGLU_MLP, OpKind.MOE_EXPERTS}
    o_proj = next(op for op in with_residual if op.kind is OpKind.LINEAR)
    assert o_proj.outputs[0].name.endswith(".x")          # the fused op takes the add's name
    tiny_step.assert_same_outputs(fused)


def test_add_of_a_value_with_other_users_stays():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(DType.F32, (2, 8)))
    y = b.op(OpKind.LINEAR, [x, b.param("w", TensorType(DType.F32, (8, 8)))], "y")
    s = b.op(OpKind.ADD, [x, y], "s")
    graph = b.ret(s, y)
    assert fuse_residual(graph) == graph
    graph.outputs = [s]
    out = fuse_residual(graph)
    assert [op.kind for op in out.ops] == [OpKind.LINEAR] and out.ops[0].kwarg("residual") == x
    assert out.ops[0].outputs[0].name == s
