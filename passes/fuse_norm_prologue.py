"""fuse_norm_prologue: RMSNorm into the prologue of the matmuls that read it.

A norm whose every user can normalise its own input (linear, lm_head,
swiglu_mlp, moe_route; as their first operand, without a norm already)
disappears into those users as `norm=`:

    %h = rmsnorm(%x, @w) {eps};  %q = linear(%h, @wq);  %k = linear(%h, @wk)
becomes
    %q = linear(%x, @wq, norm=@w) {eps};  %k = linear(%x, @wk, norm=@w) {eps}

The MoE input is read by the router and by the experts: the router normalises
it and also returns the normed rows (`xn`) that the experts read:

    %h = rmsnorm(%x, @w);  %ids, %wts, %plan = moe_route(%h, ...);  moe_experts(%h, ...)
becomes
    %ids, %wts, %plan, %h = moe_route(%x, ..., norm=@w) {eps};  moe_experts(%h, ...)

A norm with any other user stays.
"""
from __future__ import annotations

import dataclasses

from tilecomp.ir.graph import Graph, Op, OpKind, Value

from .rewrite import GRAPH_OUTPUT, Uses, graph_pass

PROLOGUE_KINDS = (OpKind.LINEAR, OpKind.LM_HEAD, OpKind.SWIGLU_MLP, OpKind.MOE_ROUTE)


def _takes_prologue(op: Op, h: str) -> bool:
    """`op` reads h only as its first operand and has no norm yet."""
    return (op.kind in PROLOGUE_KINDS and op.args[0] == h and op.kwarg("norm") is None
            and h not in op.args[1:] and h not in dict(op.kwargs).values())


def _with_norm(op: Op, norm: Op) -> Op:
    return dataclasses.replace(op, args=(norm.args[0],) + op.args[1:],
                               kwargs=(("norm", norm.args[1]),) + op.kwargs,
                               attrs={**op.attrs, "eps": norm.attrs["eps"]})


def _router_and_experts(ops: list[Op], h: str):
    """(router, experts) when `ops` are one moe_route before one moe_experts reading h as x."""
    if len(ops) != 2 or ops[0].kind is not OpKind.MOE_ROUTE or ops[1].kind is not OpKind.MOE_EXPERTS:
        return None
    router, experts = ops
    if not _takes_prologue(router, h) or experts.args[0] != h or h in experts.args[1:] \
            or h in dict(experts.kwargs).values():
        return None
    return router, experts


@graph_pass
def fuse_norm_prologue(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewritten: dict[int, Op | None] = {}           # op index -> new op (None: removed)
    for i, norm in enumerate(graph.ops):
        if norm.kind is not OpKind.RMSNORM:
            continue
        h = norm.out.name
        users = uses.users.get(h, [])
        if not users or GRAPH_OUTPUT in users or len(set(users)) != len(users):
            continue
        ops = [rewritten.get(u, graph.ops[u]) for u in users]
        if all(_takes_prologue(op, h) for op in ops):
            for u, op in zip(users, ops):
                rewritten[u] = _with_norm(op, norm)
            rewritten[i] = None
        elif _router_and_experts(ops, h) is not None:
            router = _with_norm(ops[0], norm)
            router.outputs = router.outputs + (Value(h, norm.out.type),)
            rewritten[users[0]] = router
            rewritten[i] = None
    ops = [rewritten.get(i, op) for i, op in enumerate(graph.ops)]
    return dataclasses.replace(graph, ops=[op for op in ops if op is not None])
