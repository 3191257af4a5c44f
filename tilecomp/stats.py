"""Numbers about a tile program: tasks by kind, bytes moved, the bandwidth floor, balance.

`bytes moved` adds every region each task reads and writes (what the tasks
really stream); `unique bytes` counts each distinct region once (a row block
that 32 N tiles all read counts once; a region at a runtime index, such as
the weights of the expert a slot holds, counts once per task, since the
unique-expert plan gives every slot a different expert): the floor for a
step that moves every byte through HBM exactly once (all slots in use). Floors are in microseconds at a given GB/s.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tilecomp.ir.tile import TASK_KINDS, TileProgram


@dataclass
class TileStats:
    tasks: int
    buffers: int
    counters: int
    tasks_by_kind: dict[str, int]
    bytes_by_kind: dict[str, int]
    bytes_by_buffer_kind: dict[str, int]     # weight / activation / scratch / kv_cache / state
    bytes_moved: int
    unique_bytes: int
    program_bytes: list[int] = field(default_factory=list)    # per program, when scheduled

    def floor_us(self, gbps: float, unique: bool = False) -> float:
        return (self.unique_bytes if unique else self.bytes_moved) / (gbps * 1e3)

    @property
    def imbalance(self) -> float:
        """Busiest program's bytes over the mean (1.0 = perfectly balanced)."""
        if not self.program_bytes or not sum(self.program_bytes):
            return 1.0
        return max(self.program_bytes) / (sum(self.program_bytes) / len(self.program_bytes))


def tile_stats(tp: TileProgram) -> TileStats:
    by_kind: Counter = Counter()
    by_buffer: Counter = Counter()
    seen = set()
    unique = 0
    task_bytes = []
    for t in tp.tasks:
        nbytes = 0
        for r in (*t.reads, *t.writes):
            b = tp.region_bytes(r)
            nbytes += b
            by_buffer[tp.buffers[r.buffer].kind] += b
            key = (r, t.id) if any(d.index is not None for d in r.dims) else r
            if key not in seen:          # a runtime-indexed region (an expert slot's weights) is its own
                seen.add(key)
                unique += b
        by_kind[t.kind] += nbytes
        task_bytes.append(nbytes)
    programs = [sum(task_bytes[i] for i in q) for q in tp.programs] if tp.programs is not None else []
    order = {k: i for i, k in enumerate(TASK_KINDS)}
    kinds = sorted({t.kind for t in tp.tasks}, key=lambda k: order.get(k, len(order)))
    count = Counter(t.kind for t in tp.tasks)
    return TileStats(len(tp.tasks), len(tp.buffers), len(tp.counters), {k: count[k] for k in kinds},
                     {k: by_kind[k] for k in kinds}, dict(by_buffer), sum(task_bytes), unique, programs)


@dataclass
class Chain:
    depth: int                        # phases on the longest dependency chain
    tasks: list[int]                  # one task per link, first to last (the largest of the deepest)
    kinds: dict[str, int]             # links per task kind
    link_bytes: list[int]             # bytes of each link's task


def critical_chain(tp: TileProgram) -> Chain:
    """The longest chain of dependent tasks (through counters), largest task per link."""
    from tilecomp.passes.schedule import task_graph      # signalers, topological order; names a cycle
    g = task_graph(tp)
    nbytes = {t.id: tp.task_bytes(t) for t in tp.tasks}
    by_id = {t.id: t for t in tp.tasks}
    depth: dict[int, int] = {}
    best_pred: dict[int, int | None] = {}
    for i in g.order:
        preds = [j for c, _ in by_id[i].waits for j in g.signalers.get(c, ())]
        pick = max(preds, key=lambda j: (depth[j], nbytes[j]), default=None)
        depth[i] = 1 + (depth[pick] if pick is not None else 0)
        best_pred[i] = pick
    if not depth:
        return Chain(0, [], {}, [])
    last = max(depth, key=lambda i: (depth[i], nbytes[i]))
    chain = []
    while last is not None:
        chain.append(last)
        last = best_pred[last]
    chain.reverse()
    kinds = Counter(by_id[i].kind for i in chain)
    order = {k: n for n, k in enumerate(TASK_KINDS)}
    return Chain(len(chain), chain, {k: kinds[k] for k in sorted(kinds, key=lambda k: order.get(k, len(order)))},
                 [nbytes[i] for i in chain])


def format_tile_stats(tp: TileProgram, gbps: float) -> str:
    s = tile_stats(tp)
    head = f"tile program: {s.tasks} tasks, {s.buffers} buffers, {s.counters} counters"
    if s.program_bytes:
        head += f", {len(s.program_bytes)} programs (busiest / mean bytes = {s.imbalance:.2f})"
    lines = [head, f"  {'kind':<16} {'tasks':>7} {'bytes moved':>18}"]
    lines += [f"  {k:<16} {n:>7} {s.bytes_by_kind[k]:>18,}" for k, n in s.tasks_by_kind.items()]
    lines.append(f"  {'total':<16} {s.tasks:>7} {s.bytes_moved:>18,}")
    lines.append("  by buffer kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.bytes_by_buffer_kind.items())))
    lines.append(f"unique bytes (each distinct region once): {s.unique_bytes:,}")
    lines.append(f"bandwidth floor at {gbps:g} GB/s: {s.floor_us(gbps):,.1f} us per step "
                 f"(bytes moved), {s.floor_us(gbps, unique=True):,.1f} us (unique bytes)")
    ch = critical_chain(tp)
    lines.append(f"longest dependency chain: {ch.depth} phases (" +
                 ", ".join(f"{k} {n}" for k, n in ch.kinds.items()) + ")")
    if s.program_bytes and ch.depth:
        per = gbps / len(s.program_bytes)
        lines.append(f"  its largest task per link streams {sum(ch.link_bytes):,} bytes: "
                     f"{sum(ch.link_bytes) / (per * 1e3):,.1f} us at {per:.1f} GB/s per program "
                     f"({gbps:g} GB/s over {len(s.program_bytes)} programs), a bound on the step "
                     f"that more total bandwidth does not lower")
    return "\n".join(lines) + "\n"
