"""Counts and bytes of a graph: ops by kind, parameter bytes, and the weight bytes
one step reads (MoE: at most min(E, T * k) of the E experts per layer, since each
routed expert is read once however many tokens chose it; embeddings: the rows gathered)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .graph import Graph, OpKind

EXPERT_KINDS = (OpKind.EXPERT_LINEAR, OpKind.MOE_EXPERTS)


@dataclass(frozen=True)
class GraphStats:
    ops_by_kind: dict[str, int]
    n_params: int
    param_bytes: int
    param_bytes_by_dtype: dict[str, int]
    step_weight_bytes: int          # weights a step reads (routed experts: worst case)
    state_bytes: int                # inputs: KV caches, taps, tokens, scalars

    def floor_seconds(self, gbps: float) -> float:
        return self.step_weight_bytes / (gbps * 1e9)


def _touched_fraction(graph: Graph) -> dict[str, float]:
    """Param name -> fraction of it one step can touch: routed experts (at most T * k of E)
    and embedding tables (only the gathered rows). Other parameters are read whole."""
    types = graph.types()
    fraction: dict[str, float] = {}
    gathered: dict[str, int] = {}
    for op in graph.ops:
        if op.kind is OpKind.EMBED:
            gathered[op.args[1]] = gathered.get(op.args[1], 0) + types[op.args[0]].shape[0]
        if op.kind not in EXPERT_KINDS:
            continue
        ids = op.args[2] if op.kind is OpKind.EXPERT_LINEAR else op.args[1]
        tokens, k = types[ids].shape
        weights = [op.args[1]] if op.kind is OpKind.EXPERT_LINEAR else list(op.args[3:6])
        for w in weights:
            experts = types[w].shape[0]
            fraction[w] = min(1.0, tokens * k / experts)
    readers = {name for op in graph.ops if op.kind is not OpKind.EMBED for name in op.operands()}
    for table, rows in gathered.items():
        if table not in readers:                    # e.g. a tied LM head reads the whole table
            fraction[table] = min(1.0, rows / types[table].shape[0])
    return fraction


def graph_stats(graph: Graph) -> GraphStats:
    by_dtype: Counter = Counter()
    for p in graph.params:
        by_dtype[p.type.dtype.value] += p.type.nbytes
    fraction = _touched_fraction(graph)
    step = sum(int(p.type.nbytes * fraction.get(p.name, 1.0)) for p in graph.params)
    kinds = Counter(op.kind.value for op in graph.ops)
    return GraphStats(dict(sorted(kinds.items())), len(graph.params), sum(by_dtype.values()),
                      dict(sorted(by_dtype.items())), step, sum(v.type.nbytes for v in graph.inputs))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.3f} MiB"


def format_graph_stats(graph: Graph, stats: GraphStats, gbps: float) -> str:
    lines = [f"graph {graph.name}: {len(graph.ops)} ops, {len(graph.inputs)} inputs, "
             f"{stats.n_params} params"]
    lines.append("ops by kind:")
    lines += [f"  {kind:<16} {n:>6}" for kind, n in stats.ops_by_kind.items()]
    lines.append(f"parameter bytes:   {stats.param_bytes:>16,} ({_gib(stats.param_bytes)})")
    lines += [f"  {dtype:<16} {n:>16,}" for dtype, n in stats.param_bytes_by_dtype.items()]
    lines.append(f"weights per step:  {stats.step_weight_bytes:>16,} ({_gib(stats.step_weight_bytes)}; "
                 f"routed experts: at most min(E, T*k) per layer; embeddings: gathered rows)")
    lines.append(f"state (inputs):    {stats.state_bytes:>16,} ({_gib(stats.state_bytes)})")
    lines.append(f"bandwidth floor at {gbps:g} GB/s: {stats.floor_seconds(gbps) * 1e6:,.1f} us per step "
                 f"(weights once)")
    return "\n".join(lines) + "\n"
