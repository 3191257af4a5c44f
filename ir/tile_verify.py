"""Verifiers of the tile IR.

`verify_tile` checks that a program is well formed (IRError): names resolve,
regions lie inside their buffers, kinds are known, counters are padded.

`verify_schedule` proves that the dependency structure cannot deadlock when
all programs are co-resident (ScheduleError, naming task and counter):
  1. every counter receives exactly `expected` signals per step and every wait
     target is at most that (so every wait can be satisfied);
  2. the task graph (task -> counter -> task) is acyclic;
  3. every task that reads data written in the same step (on its rank: each
     rank holds its own copy of every buffer) waits on a counter its producer
     signals (a read of persistent state without such a wait reads the
     previous step, so the writer must come after the reader);
  4. the per-program queues are consistent with ONE global topological order
     (the graph plus "next in queue" edges stays acyclic). Then the earliest
     unfinished task in that order always has its inputs done and sits at the
     head of its queue, so some program always makes progress;
  5. with `interpreter_order=True`: every dependency points to an earlier
     program or earlier in the same queue (Triton's CPU interpreter runs the
     programs one after another in pid order).
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict, deque

from tilecomp.errors import IRError, ScheduleError

from .tile import (BUFFER_KINDS, COUNTER_LINE_SLOTS, DTYPE_BYTES, TASK_KINDS, Region, Task,
                   TileProgram, format_region)


# ----------------------------------------------------------------------------- structure

def _check_region(tp: TileProgram, t: Task, r: Region, what: str):
    b = tp.buffers.get(r.buffer)
    if b is None:
        raise IRError(f"task {t.name} ({t.kind}) {what} unknown buffer {r.buffer!r}")
    if len(r.dims) != len(b.shape):
        raise IRError(f"task {t.name} ({t.kind}) {what} {format_region(r)}: "
                      f"expected {len(b.shape)} dims for {b.name} {list(b.shape)}, found {len(r.dims)}")
    for d, size in zip(r.dims, b.shape):
        bad = d.lo < 0 or d.hi <= d.lo or (d.hi > size if d.index is None else d.extent > size)
        if bad:
            raise IRError(f"task {t.name} ({t.kind}) {what} {format_region(r)}: "
                          f"range {d.lo}:{d.hi} outside {b.name} {list(b.shape)}")


def _check_attr(owner: str, key: str, v):
    if isinstance(v, float) and not math.isfinite(v):
        raise IRError(f"{owner}: attribute {key} = {v!r} is not finite")
    if isinstance(v, list):
        for x in v:
            _check_attr(owner, key, x)


def verify_tile(tp: TileProgram) -> TileProgram:
    """Check the program is well formed; returns it. Raises IRError naming the task/buffer."""
    ranks = tp.annotations.get("ranks", 1)
    for b in tp.buffers.values():
        if b.dtype not in DTYPE_BYTES:
            raise IRError(f"buffer {b.name}: dtype {b.dtype!r} not one of {sorted(DTYPE_BYTES)}")
        if b.kind not in BUFFER_KINDS:
            raise IRError(f"buffer {b.name}: kind {b.kind!r} not one of {list(BUFFER_KINDS)}")
        if any(s <= 0 for s in b.shape):
            raise IRError(f"buffer {b.name}: shape {list(b.shape)} has a non-positive size")
        if b.kind == "weight" and not b.param:
            raise IRError(f"buffer {b.name}: a weight buffer needs param=<checkpoint tensor name>")
    lines: dict[int, str] = {}
    for c in tp.counters.values():
        if c.expected < 1 or c.slot < 0:
            raise IRError(f"counter {c.name}: expected={c.expected} slot={c.slot}, both must be >= 1 / >= 0")
        line = c.slot // COUNTER_LINE_SLOTS
        if line in lines:
            raise IRError(f"counter {c.name}: slot {c.slot} shares a cache line with counter {lines[line]}")
        lines[line] = c.name
    checked: set[Region] = set()          # regions already found inside their buffer
    for i, t in enumerate(tp.tasks):
        if t.id != i:
            raise IRError(f"task {t.name}: expected id {i} (tasks are numbered in order)")
        if t.kind not in TASK_KINDS:
            raise IRError(f"task {t.name}: kind {t.kind!r} not one of {list(TASK_KINDS)}")
        if not 0 <= t.rank < ranks:
            raise IRError(f"task {t.name} ({t.kind}): rank {t.rank} outside 0..{ranks - 1}")
        for r in t.reads:
            if r not in checked:
                _check_region(tp, t, r, "reads")
                checked.add(r)
        for r in t.writes:
            if r not in checked:
                _check_region(tp, t, r, "writes")
                checked.add(r)
            if tp.buffers[r.buffer].kind == "weight":
                raise IRError(f"task {t.name} ({t.kind}) writes weight buffer {r.buffer}")
        arrive = t.attrs.get("arrive")
        if arrive is not None and arrive not in tp.counters:
            raise IRError(f"task {t.name} ({t.kind}): arrives at unknown counter {arrive!r}")
        for c, n in list(t.waits) + list(t.signals):
            if c not in tp.counters:
                raise IRError(f"task {t.name} ({t.kind}): unknown counter {c!r}")
            if n < 1:
                raise IRError(f"task {t.name} ({t.kind}): counter {c} amount {n} must be >= 1")
        for k, v in t.attrs.items():
            if type(v) is float or type(v) is list:
                _check_attr(f"task {t.name}", k, v)
    for k, v in tp.annotations.items():
        _check_attr("annotation", k, v)
    if tp.programs is not None:
        n = len(tp.tasks)
        for p, queue in enumerate(tp.programs):
            for i in queue:
                if not 0 <= i < n:
                    raise IRError(f"program {p}: unknown task t{i}")
    return tp


# ----------------------------------------------------------------------------- schedule

def check_counters(tp: TileProgram):
    """Every counter gets `expected` signals per step (a task with `arrive = c` adds one to c
    itself, passes/fold_reduce.py); every wait target is reachable."""
    total: dict[str, int] = defaultdict(int)
    for t in tp.tasks:
        for c, n in t.signals:
            total[c] += n
        if "arrive" in t.attrs:
            if any(c == t.attrs["arrive"] for c, _ in list(t.signals) + list(t.waits)):
                raise ScheduleError(f"task {t.name} ({t.kind}) arrives at counter {t.attrs['arrive']} "
                                    "and also signals or waits on it")
            total[t.attrs["arrive"]] += 1
    for c in tp.counters.values():
        if total[c.name] != c.expected:
            raise ScheduleError(f"counter {c.name} expects {c.expected} signals per step "
                                f"but its tasks signal it {total[c.name]} times")
    for t in tp.tasks:
        for c, n in t.waits:
            if n > total[c]:
                raise ScheduleError(f"task {t.name} ({t.kind}) waits for counter {c} >= {n}, "
                                    f"but only {total[c]} signals per step exist: unsatisfiable")


def regions_overlap(a: Region, b: Region) -> bool:
    """False only when some dimension of static ranges proves the regions disjoint
    (a runtime-indexed dimension may overlap anything)."""
    for x, y in zip(a.dims, b.dims):
        if x.index is None and y.index is None and (x.hi <= y.lo or y.hi <= x.lo):
            return False
    return True


class WriterIndex:
    """Writers of one buffer, searchable by their first-dimension range."""

    def __init__(self, writes: list[tuple[Region, Task]]):
        self.dynamic = [(r, t) for r, t in writes if r.dims and r.dims[0].index is not None]
        static = sorted(((r, t) for r, t in writes if not r.dims or r.dims[0].index is None),
                        key=lambda rt: rt[0].dims[0].lo if rt[0].dims else 0)
        self.static = static
        self.los = [r.dims[0].lo if r.dims else 0 for r, _ in static]
        self.max_extent = max((r.dims[0].extent for r, _ in static if r.dims), default=1)

    def candidates(self, region: Region) -> list:
        """Writers that may overlap `region` (exact for the first dimension only)."""
        if not region.dims or region.dims[0].index is not None:
            return self.dynamic + self.static
        d0 = region.dims[0]
        i = bisect.bisect_left(self.los, d0.lo - self.max_extent + 1)
        j = bisect.bisect_left(self.los, d0.hi)
        return self.dynamic + self.static[i:j]


def _state_writer_descendants(tp: TileProgram, graph, writers: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """(task -> bitmask of the given writers that run after it (reachable through counters),
    writer -> its bit)."""
    n, succ, order, _ = graph
    bit = {w: 1 << k for k, w in enumerate(writers)}
    desc = [0] * len(succ)
    for u in reversed(order):
        mask = 0
        for v in succ[u]:
            mask |= desc[v] | bit.get(v, 0)
        desc[u] = mask
    return {i: desc[i] for i in range(n)}, bit


def check_data_dependencies(tp: TileProgram, graph):
    """A task reading data another task writes in this step waits on one of its counters.

    A read of persistent state (kv_cache, state) without such a wait reads the previous
    step's value: then the writer must come after the reader (write-after-read order).
    Tasks that arrive at one counter (`arrive`, passes/fold_reduce.py) may read each other's
    writes: only the last to arrive does, after every other arrival. The expert parts of one
    queue (`sync`, LowerOptions.expert_queue) may too: expert_down's body waits for each unit's
    slot on the up_gate units' count in the sync buffer.
    """
    writes: dict[str, list] = defaultdict(list)
    for t in tp.tasks:
        for r in t.writes:
            writes[r.buffer].append((r, t))
    index = {b: WriterIndex(w) for b, w in writes.items()}
    persistent = sorted({t.id for b, w in writes.items() if tp.buffers[b].kind in ("state", "kv_cache")
                         for _, t in w})
    signals = {t.id: {c for c, _ in t.signals} for ws in writes.values() for _, t in ws}
    previous_step = []
    for t in tp.tasks:
        waited = {c for c, _ in t.waits}
        for r in t.reads:
            if r.buffer not in index:
                continue
            for wr, w in index[r.buffer].candidates(r):
                if w.id == t.id or w.rank != t.rank or not signals[w.id].isdisjoint(waited) or \
                        not regions_overlap(wr, r):
                    continue
                if "arrive" in t.attrs and w.attrs.get("arrive") == t.attrs["arrive"]:
                    continue
                if "sync" in t.attrs and w.attrs.get("sync") == t.attrs["sync"] and t.kind != "moe_route" \
                        and w.kind != "moe_route":
                    continue        # the expert queue: the bodies order them per slot (sync buffer)
                if tp.buffers[r.buffer].kind in ("state", "kv_cache"):
                    previous_step.append((t, r, w, wr))    # checked below, after every direct read
                else:
                    _missing(t, r, w, wr)
    if previous_step:
        desc, bit = _state_writer_descendants(tp, graph, persistent)
        for t, r, w, wr in previous_step:
            if not desc[t.id] & bit[w.id]:
                _missing(t, r, w, wr)


def _missing(t: Task, r: Region, w: Task, wr: Region):
    producer = ", ".join(c for c, _ in w.signals) or "none"
    raise ScheduleError(
        f"missing dependency: task {t.name} ({t.kind}) reads {format_region(r)} which task "
        f"{w.name} ({w.kind}) writes ({format_region(wr)}) but waits on none of its counters "
        f"({producer}), and the writer is not ordered after it")


def _find_cycle(n_tasks: int, succ: list[list[int]], remaining: set[int], label) -> str:
    pred: dict[int, int] = {}
    for u in remaining:
        for v in succ[u]:
            if v in remaining:
                pred.setdefault(v, u)
    node = next(iter(remaining))
    path, pos = [], {}
    while node not in pos:
        pos[node] = len(path)
        path.append(node)
        node = pred[node]
    cycle = path[pos[node]:][::-1]
    cycle.append(cycle[0])
    return " -> ".join(label(u) for u in cycle)


def _topo(succ: list[list[int]]) -> tuple[list[int], set[int]]:
    """Kahn's algorithm: (topological order, nodes left on or behind a cycle)."""
    indeg = [0] * len(succ)
    for vs in succ:
        for v in vs:
            indeg[v] += 1
    todo = deque(i for i, d in enumerate(indeg) if d == 0)
    order = []
    while todo:
        u = todo.popleft()
        order.append(u)
        for v in succ[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                todo.append(v)
    return order, {i for i, d in enumerate(indeg) if d > 0}


def check_acyclic(tp: TileProgram):
    """The dependency graph is acyclic. Returns (task count, successors over task + counter
    nodes, a topological order, node labeller)."""
    n = len(tp.tasks)
    cidx = {c: n + i for i, c in enumerate(tp.counters)}
    names = list(tp.counters)
    succ: list[list[int]] = [[] for _ in range(n + len(cidx))]
    for t in tp.tasks:
        for c, _ in t.signals:
            succ[t.id].append(cidx[c])
        for c, _ in t.waits:
            succ[cidx[c]].append(t.id)

    def label(u: int) -> str:
        return f"{tp.tasks[u].name} ({tp.tasks[u].kind})" if u < n else f"counter {names[u - n]}"

    order, left = _topo(succ)
    if left:
        raise ScheduleError(f"dependency cycle: {_find_cycle(n, succ, left, label)}")
    return n, succ, order, label


def check_queue_order(tp: TileProgram, graph):
    """The dependency graph plus "next in the same queue" edges stays acyclic."""
    n, succ, _, label = graph
    succ = [list(x) for x in succ]
    for queue in tp.programs:
        for a, b in zip(queue, queue[1:]):
            succ[a].append(b)
    _, left = _topo(succ)
    if left:
        raise ScheduleError("queues are not in one global topological order (a program would wait on a "
                            f"task queued after it): {_find_cycle(n, succ, left, label)}")


def check_queues(tp: TileProgram) -> dict[int, tuple[int, int]]:
    """Every task is queued exactly once, on a program of its own rank; returns positions."""
    pos: dict[int, tuple[int, int]] = {}
    prog_rank: dict[int, int] = {}
    for p, queue in enumerate(tp.programs):
        for k, i in enumerate(queue):
            if i in pos:
                raise ScheduleError(f"task t{i} is queued twice (program {pos[i][0]} and program {p})")
            pos[i] = (p, k)
            rank = tp.tasks[i].rank
            if prog_rank.setdefault(p, rank) != rank:
                raise ScheduleError(f"program {p} mixes ranks {prog_rank[p]} and {rank} (task t{i})")
    missing = [t.name for t in tp.tasks if t.id not in pos]
    if missing:
        raise ScheduleError(f"{len(missing)} tasks are in no program queue, e.g. {', '.join(missing[:5])}")
    return pos


def check_interpreter_order(tp: TileProgram, pos: dict[int, tuple[int, int]]):
    """Every dependency is in an earlier program or earlier in the same queue."""
    last: dict[str, tuple[tuple[int, int], int]] = {}
    for t in tp.tasks:
        for c, _ in t.signals:
            if c not in last or pos[t.id] > last[c][0]:
                last[c] = (pos[t.id], t.id)
    for t in tp.tasks:
        for c, _ in t.waits:
            if c in last and last[c][0] >= pos[t.id]:
                (p, k), w = last[c][0], tp.tasks[last[c][1]]
                raise ScheduleError(
                    f"interpreter order: task {t.name} ({t.kind}, program {pos[t.id][0]} #{pos[t.id][1]}) "
                    f"waits on counter {c}, signalled by {w.name} ({w.kind}, program {p} #{k}) which the "
                    f"CPU interpreter runs later")


def verify_schedule(tp: TileProgram, interpreter_order: bool = False) -> TileProgram:
    """Prove the scheduled program deadlock-free (see the module docstring); returns it."""
    verify_tile(tp)
    if tp.programs is None:
        raise ScheduleError("tile program has no schedule (no program queues); run the schedule pass")
    check_counters(tp)
    pos = check_queues(tp)
    graph = check_acyclic(tp)
    check_data_dependencies(tp, graph)
    check_queue_order(tp, graph)
    if interpreter_order:
        check_interpreter_order(tp, pos)
    return tp
