"""fuse_swiglu: gate, up, silu, mul, down (+ expert combine) -> one MLP op.

Dense:   down(silu(gate(x)) * up(x))                       -> swiglu_mlp(x, wg, wu, wd)
Experts: moe_combine(expert_linear(silu(expert_linear(x, wg, ids)) * expert_linear(x, wu, ids),
         wd, ids), weights)                                -> moe_experts(x, ids, weights, wg, wu, wd)
moe_experts takes the routing op's unique-expert plan (plan=) when the ids
come from a moe_route. Intermediates must have no other users.
"""
from __future__ import annotations

from tilecomp.ir.graph import Graph, Op, OpKind

from .rewrite import Rewriter, Uses, graph_pass, make_op


def _gate_up(uses: Uses, mul: Op, proj: OpKind):
    """(silu, gate, up) feeding `mul` in either operand order, or None."""
    for a, b in (mul.args, mul.args[::-1]):
        act, up = uses.op(a, OpKind.SILU), uses.op(b, proj)
        gate = uses.op(act.args[0], proj) if act is not None else None
        if act is None or gate is None or up is None or gate.kwargs != up.kwargs:
            continue
        if gate.args[0] != up.args[0] or proj is OpKind.EXPERT_LINEAR and gate.args[2] != up.args[2]:
            continue
        if uses.only_user(gate.out.name, act) and uses.only_user(act.out.name, mul) \
                and uses.only_user(up.out.name, mul):
            return act, gate, up
    return None


@graph_pass
def fuse_swiglu(graph: Graph) -> Graph:
    rw = Rewriter(graph)
    uses, types = rw.uses, graph.types()
    for mul in graph.ops:
        if mul.kind is not OpKind.MUL:
            continue
        dense = _gate_up(uses, mul, OpKind.LINEAR)
        if dense is not None:
            act, gate, up = dense
            down = uses.single_user(mul.out.name, OpKind.LINEAR)
            if down is None or down.kwarg("norm") or gate.kwarg("residual"):
                continue
            fused = make_op(OpKind.SWIGLU_MLP, [gate.args[0], gate.args[1], up.args[1], down.args[1]],
                            [down.out.name], types,
                            {"norm": gate.kwarg("norm"), "residual": down.kwarg("residual")},
                            eps=gate.attrs.get("eps"))
            rw.claim([gate, up, act, mul, down], fused)
            continue
        experts = _gate_up(uses, mul, OpKind.EXPERT_LINEAR)
        if experts is None:
            continue
        act, gate, up = experts
        down = uses.single_user(mul.out.name, OpKind.EXPERT_LINEAR)
        combine = down and uses.single_user(down.out.name, OpKind.MOE_COMBINE)
        if not combine or down.args[2] != gate.args[2]:
            continue
        ids = gate.args[2]
        route = uses.op(ids, OpKind.MOE_ROUTE)
        plan = route.outputs[2].name if route is not None else None
        fused = make_op(OpKind.MOE_EXPERTS, [gate.args[0], ids, combine.args[1], gate.args[1], up.args[1],
                                             down.args[1]],
                        [combine.out.name], types, {"plan": plan, "residual": combine.kwarg("residual")})
        rw.claim([gate, up, act, mul, down, combine], fused)
    return rw.result()
