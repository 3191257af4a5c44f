"""fuse_router: router matmul + sigmoid + biased top-k + weight normalisation -> moe_route.

    %xf = cast(%h) {dtype="f32"}                 (optional)
    %logits = linear(%xf, @gate)
    %scores = sigmoid(%logits)
    %ids, %w = route_topk(%scores, @bias) {k}
    %weights = route_normalize(%w) {renorm, scale}
becomes
    %ids, %weights, %plan = moe_route(%h, @gate, @bias) {k, renorm, scale}
where %plan lists the unique experts of the step (-1 padded), so each routed
expert's weights are read once however many tokens chose it.
"""
from __future__ import annotations

from tilecomp.ir.graph import DType, Graph, OpKind

from .rewrite import Rewriter, graph_pass, make_op


@graph_pass
def fuse_router(graph: Graph) -> Graph:
    rw = Rewriter(graph)
    uses, types = rw.uses, graph.types()
    for topk in graph.ops:
        if topk.kind is not OpKind.ROUTE_TOPK:
            continue
        ids, w = topk.outputs
        sig = uses.op(topk.args[0], OpKind.SIGMOID)
        norm = uses.single_user(w.name, OpKind.ROUTE_NORMALIZE)
        if sig is None or norm is None or not uses.only_user(sig.out.name, topk):
            continue
        lin = uses.op(sig.args[0], OpKind.LINEAR)
        if lin is None or lin.kwargs or not uses.only_user(lin.out.name, sig):
            continue
        pattern, x = [lin, sig, topk, norm], lin.args[0]
        cast = uses.op(x, OpKind.CAST)
        if cast is not None and cast.attrs["dtype"] == DType.F32.value and uses.only_user(x, lin):
            pattern.insert(0, cast)
            x = cast.args[0]
        plan = rw.fresh(ids.name.rsplit(".", 1)[0] + ".plan")
        fused = make_op(OpKind.MOE_ROUTE, [x, lin.args[1], topk.args[1]],
                        [ids.name, norm.out.name, plan], types,
                        k=topk.attrs["k"], renorm=norm.attrs["renorm"], scale=norm.attrs["scale"])
        rw.claim(pattern, fused)
    return rw.result()
