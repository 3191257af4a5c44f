from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.passes.dce import dce


def test_dead_ops_and_their_params_go_live_ones_stay():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(DType.F32, (2, 8)))
    unused_input = b.input("unused", TensorType(DType.I32, ()))
    dead = b.op(OpKind.LINEAR, [x, b.param("dead_w", TensorType(DType.F32, (4, 8)))], "dead")
    b.op(OpKind.SILU, [dead], "dead2")
    y = b.op(OpKind.SILU, [x], "y")
    out = dce(b.ret(y))
    assert [op.outputs[0].name for op in out.ops] == [y]
    assert out.params == [] and [v.name for v in out.inputs] == [x, unused_input]


def test_dce_keeps_a_whole_traced_step(tiny_step):
    graph = tiny_step.graph
    assert dce(graph) == graph
