"""fuse_norm_prologue: an RMSNorm whose every user can normalise its own input
(linear, lm_head, swiglu_mlp, moe_route; as their first operand, without a norm
already) disappears into those users as `norm=` (a prologue on the matmul's x tile).

    %h = rmsnorm(%x, @w) {eps};  %q = linear(%h, @wq);  %k = linear(%h, @wk)
becomes
    %q = linear(%x, @wq, norm=@w) {eps};  %k = linear(%x, @wk, norm=@w) {eps}

A norm with any other user (e.g. the MoE input, also read by moe_experts) stays.
"""
from __future__ import annotations

import dataclasses

from tilecomp.ir.graph import Graph, OpKind

from .rewrite import GRAPH_OUTPUT, Uses, graph_pass

PROLOGUE_KINDS = (OpKind.LINEAR, OpKind.LM_HEAD, OpKind.SWIGLU_MLP, OpKind.MOE_ROUTE)


@graph_pass
def fuse_norm_prologue(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewritten: dict[int, object] = {}           # op index -> new op (None: removed)
    for i, norm in enumerate(graph.ops):
        if norm.kind is not OpKind.RMSNORM:
            continue
        h = norm.out.name
        users = uses.users.get(h, [])
        if not users or GRAPH_OUTPUT in users or len(set(users)) != len(users):
            continue
        ops = [rewritten.get(u, graph.ops[u]) for u in users]
        if not all(op.kind in PROLOGUE_KINDS and op.args[0] == h and op.kwarg("norm") is None
                   and h not in op.args[1:] and h not in dict(op.kwargs).values() for op in ops):
            continue
        for u, op in zip(users, ops):
            rewritten[u] = dataclasses.replace(
                op, args=(norm.args[0],) + op.args[1:], kwargs=(("norm", norm.args[1]),) + op.kwargs,
                attrs={**op.attrs, "eps": norm.attrs["eps"]})
        rewritten[i] = None
    ops = [rewritten.get(i, op) for i, op in enumerate(graph.ops)]
    return dataclasses.replace(graph, ops=[op for op in ops if op is not None])
