
from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.passes.fuse_router import fuse_router
from tilecomp.passes.fuse_swiglu import fuse_swiglu


def test_dense_and_expert_mlps_become_one_op_each(tiny_step, count_kinds):
    graph = tiny_step.graph
    fused = fuse_swiglu(graph)
    after = count_kinds(fused)
    n_expert_layers = count_kinds(graph)[OpKind.EXPERT_LINEAR] // 3
    assert after[OpKind.MOE_EXPERTS] == n_expert_layers
    assert after[OpKind.SWIGLU_MLP] == 1 + 2            # target layer 0 + two draft layers
    assert OpKind.SILU not in after and OpKind.MUL not in after and OpKind.EXPERT_LINEAR not in after
    assert all(op.kwarg("plan") is None for op in fused.ops if op.kind is OpKind.MOE_EXPERTS)
    tiny_step.assert_same_outputs(fused)


def test_expert_mlp_takes_the_routing_plan(tiny_step):
    graph = tiny_step.graph
    fused = fuse_swiglu(fuse_router(graph))
    experts = [op for op in fused.ops if op.kind is OpKind.MOE_EXPERTS]
    plans = {op.outputs[2].name for op in fused.ops if op.kind is OpKind.MOE_ROUTE}
    assert experts and {op.kwarg("plan") for op in experts} == plans
    tiny_step.assert_same_outputs(fused)


def test_mlp_whose_activation_escapes_is_left_alone():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(DType.F32, (2, 8)))
    g = b.op(OpKind.LINEAR, [x, b.param("wg", TensorType(DType.F32, (16, 8)))], "gate")
    u = b.op(OpKind.LINEAR, [x, b.param("wu", TensorType(DType.F32, (16, 8)))], "up")
    a = b.op(OpKind.SILU, [g], "act")
    m = b.op(OpKind.MUL, [u, a], "gated")                 # operands in the other order
    d = b.op(OpKind.LINEAR, [m, b.param("wd", TensorType(DType.F32, (8, 16)))], "down")
    graph = b.ret(d, a)
    assert fuse_swiglu(graph) == graph
    graph.outputs = [d]
    out = fuse_swiglu(graph)
    assert [op.kind for op in out.ops] == [OpKind.SWIGLU_MLP] and out.ops[0].outputs[0].name == d
