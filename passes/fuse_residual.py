"""fuse_residual: `add(%x, %y)` where %y comes from a projection / MLP op used only
by that add becomes the op's epilogue: `residual=%x`, result named as the add's.

    %o = linear(%a, @wo);  %x2 = add(%x, %o)   ->   %x2 = linear(%a, @wo, residual=%x)

Producers that take residual=: linear, swiglu_mlp, moe_experts, moe_combine.
"""
from __future__ import annotations

import dataclasses

from tilecomp.ir.graph import Graph, OpKind, Value

from .rewrite import Rewriter, graph_pass

EPILOGUE_KINDS = (OpKind.LINEAR, OpKind.SWIGLU_MLP, OpKind.MOE_EXPERTS, OpKind.MOE_COMBINE)


@graph_pass
def fuse_residual(graph: Graph) -> Graph:
    rw = Rewriter(graph)
    uses = rw.uses
    for add in graph.ops:
        if add.kind is not OpKind.ADD or add.args[0] == add.args[1]:
            continue
        for residual, y in (add.args, add.args[::-1]):        # prefer the later operand as y
            producer = uses.op(y)
            if producer is None or producer.kind not in EPILOGUE_KINDS or producer.kwarg("residual") \
                    or not uses.only_user(y, add) or producer.out.type != add.out.type:
                continue
            fused = dataclasses.replace(producer, kwargs=producer.kwargs + (("residual", residual),),
                                        outputs=(Value(add.out.name, add.out.type),))
            if rw.claim([producer, add], fused):
                break
    return rw.result()
