
from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.passes.fuse_norm_prologue import fuse_norm_prologue
from tilecomp.passes.fuse_router import fuse_router
from tilecomp.passes.fuse_swiglu import fuse_swiglu


def test_norms_move_into_matmul_prologues(tiny_step, count_kinds):
    graph = tiny_step.graph
    fused = fuse_norm_prologue(fuse_swiglu(fuse_router(graph)))
    assert OpKind.RMSNORM not in count_kinds(fused)
    normed = [op for op in fused.ops if op.kwarg("norm")]
    assert {op.kind for op in normed} == {OpKind.LINEAR, OpKind.LM_HEAD, OpKind.SWIGLU_MLP, OpKind.MOE_ROUTE}
    assert all("eps" in op.attrs for op in normed)
    # the router normalises the MoE input and hands the normed rows to the experts
    routes = [op for op in fused.ops if op.kind is OpKind.MOE_ROUTE]
    assert len(routes) == count_kinds(graph)[OpKind.ROUTE_TOPK]
    experts = {op.args[0] for op in fused.ops if op.kind is OpKind.MOE_EXPERTS}
    assert {op.outputs[3].name for op in routes} == experts
    tiny_step.assert_same_outputs(fused)


def test_norm_with_a_non_matmul_user_stays():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(DType.F32, (2, 8)))
    h = b.op(OpKind.RMSNORM, [x, b.param("n", TensorType(DType.F32, (8,)))], "h", eps=1e-6)
    y = b.op(OpKind.LINEAR, [h, b.param("w", TensorType(DType.F32, (4, 8)))], "y")
    s = b.op(OpKind.SILU, [h], "s")
    graph = b.ret(y, s)
    assert fuse_norm_prologue(graph) == graph
    graph.outputs = [y]
    graph.ops.pop()                                       # drop the silu user
    out = fuse_norm_prologue(graph)
    assert [op.kind for op in out.ops] == [OpKind.LINEAR]
    assert out.ops[0].args[0] == x and out.ops[0].kwarg("norm") == "@n" and out.ops[0].attrs == {"eps": 1e-6}
