
from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.passes.fuse_router import fuse_router


def test_router_chain_becomes_one_moe_route(tiny_step, count_kinds):
    graph = tiny_step.graph
    fused = fuse_router(graph)
    before, after = count_kinds(graph), count_kinds(fused)
    n_moe = before[OpKind.ROUTE_TOPK]
    assert after[OpKind.MOE_ROUTE] == n_moe
    for kind in (OpKind.ROUTE_TOPK, OpKind.ROUTE_NORMALIZE, OpKind.SIGMOID, OpKind.CAST):
        assert kind not in after
    assert after[OpKind.LINEAR] == before[OpKind.LINEAR] - n_moe
    route = next(op for op in fused.ops if op.kind is OpKind.MOE_ROUTE)
    assert route.outputs[2].name.endswith(".plan") and route.attrs["k"] == 4
    tiny_step.assert_same_outputs(fused)


def test_router_with_other_users_of_the_scores_is_left_alone():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(DType.F32, (4, 16)))
    logits = b.op(OpKind.LINEAR, [x, b.param("gate", TensorType(DType.F32, (8, 16)))], "logits")
    scores = b.op(OpKind.SIGMOID, [logits], "scores")
    ids, w = b.op(OpKind.ROUTE_TOPK, [scores, b.param("bias", TensorType(DType.F32, (8,)))], ("ids", "w"), k=2)
    w = b.op(OpKind.ROUTE_NORMALIZE, [w], "weights", renorm=True, scale=1.0)
    g = b.ret(ids, w, scores)                      # scores escape: cannot fuse
    assert fuse_router(g) == g
    g.outputs = [ids, w]
    assert [op.kind for op in fuse_router(g).ops] == [OpKind.MOE_ROUTE]
