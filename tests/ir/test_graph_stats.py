from tilecomp.ir.graph import DType, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.ir.graph_stats import format_graph_stats, graph_stats


def moe_graph(tokens):
    b = GraphBuilder("g")
    ids = b.input("ids", TensorType(DType.I32, (tokens,)))
    table = b.param("embed", TensorType(DType.BF16, (100, 64)))
    x = b.op(OpKind.EMBED, [ids, table], "x")
    gate = b.param("gate", TensorType(DType.F32, (16, 64)))
    bias = b.param("bias", TensorType(DType.F32, (16,)))
    e_ids, w, plan = b.op(OpKind.MOE_ROUTE, [x, gate, bias], ("ids", "w", "plan"), k=2, renorm=True, scale=1.0)
    wg = b.param("wg", TensorType(DType.MXFP4, (16, 32, 64)))
    wu = b.param("wu", TensorType(DType.MXFP4, (16, 32, 64)))
    wd = b.param("wd", TensorType(DType.MXFP4, (16, 64, 32)))
    y = b.op(OpKind.MOE_EXPERTS, [x, e_ids, w, wg, wu, wd], "y", {"plan": plan})
    return b.ret(y)


def test_step_bytes_count_routed_experts_and_gathered_rows():
    expert_bytes = 16 * 32 * 64 // 2 + 16 * 32 * 64 // 32          # one mxfp4 [16, 32, 64] tensor
    router_bytes = 16 * 64 * 4 + 16 * 4
    stats = graph_stats(moe_graph(tokens=2))                        # 2 tokens x top-2: 4 of 16 experts
    assert stats.param_bytes == 100 * 64 * 2 + router_bytes + 3 * expert_bytes
    assert stats.param_bytes_by_dtype == {"bf16": 100 * 64 * 2, "f32": router_bytes, "mxfp4": 3 * expert_bytes}
    assert stats.step_weight_bytes == 2 * 64 * 2 + router_bytes + 3 * expert_bytes // 4
    assert stats.ops_by_kind == {"embed": 1, "moe_experts": 1, "moe_route": 1}
    full = graph_stats(moe_graph(tokens=8))                         # 16 choices: every expert may be hit
    assert full.step_weight_bytes == 8 * 64 * 2 + router_bytes + 3 * expert_bytes
    assert full.floor_seconds(1.0) == full.step_weight_bytes / 1e9
    text = format_graph_stats(moe_graph(2), stats, 2000)
    assert "bandwidth floor at 2000 GB/s" in text and "moe_route" in text
