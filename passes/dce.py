"""dce: drop ops whose results nothing uses (transitively) and parameters no op reads.

Graph inputs stay: they are the step's interface. One reverse sweep.
"""
from __future__ import annotations

import dataclasses

from tilecomp.ir.graph import Graph

from .rewrite import graph_pass


@graph_pass
def dce(graph: Graph) -> Graph:
    live = set(graph.outputs)
    kept = []
    for op in reversed(graph.ops):
        if any(v.name in live for v in op.outputs):
            kept.append(op)
            live.update(op.operands())
    params = [p for p in graph.params if p.name in live]
    return dataclasses.replace(graph, ops=kept[::-1], params=params, inputs=list(graph.inputs),
                               outputs=list(graph.outputs))
