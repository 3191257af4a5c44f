"""Fold each attention's reduce into the last of its partials to arrive (one dependency link less
per attention).

Lowering emits flash decoding as attn_partial tasks per (KV head, chunk), which signal the head's
partial counter, and one attn_reduce per KV head that waits on it. On the step's critical path
that is two links: partials -> reduce -> the consumer. Here each attn_reduce task goes away:

  - every partial of its head gets `arrive = <the head's partial counter>` plus the reduce's
    args (`sink`, `out`, `n_chunks`); after its own stores it adds 1 to that counter itself, with
    an acq_rel atomic, and the task that sees the last of the step's n_chunks arrivals merges the
    head's partials (attn_reduce's body) before it signals. The partial counter is no longer
    signalled by the frame nor waited on: it counts arrivals (`expected` stays n_chunks);
  - every partial signals the reduce's counter instead, and declares the reduce's reads and
    writes (the merge may run in any of them). The reduce's consumers wait for all of those
    signals: the last arriver's signal comes after its merge, so when the counter is complete
    the output is written.

The verifiers know the protocol: an `arrive` counter gets one arrival per task that names it
(check_counters), and tasks arriving at one counter may read each other's writes
(check_data_dependencies). Off by default (`LowerOptions.fold_reduce`, `--lower fold_reduce=1`).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from tilecomp.errors import IRError
from tilecomp.ir.tile import Counter, Task, TileProgram, verify_tile


def _foldable(tp: TileProgram, reduce: Task, signalers: dict[str, list[Task]]) -> list[Task] | None:
    """The partials a reduce can fold into: it waits on one counter only, every task signalling
    that counter is an attn_partial of the same op that signals nothing else, and they are
    n_chunks."""
    if len(reduce.waits) != 1 or len(reduce.signals) != 1:
        return None
    counter, _ = reduce.waits[0]
    parts = signalers.get(counter, [])
    ok = parts and all(p.kind == "attn_partial" and p.signals == [(counter, 1)] and "arrive" not in p.attrs
                       and p.attrs.get("op") == reduce.attrs.get("op") for p in parts)
    if not ok or len(parts) != reduce.attrs.get("n_chunks"):
        return None
    return parts


def fold_reduce(tp: TileProgram) -> TileProgram:
    """Return a copy of `tp` (unscheduled) without attn_reduce tasks that could fold (see the
    module docstring); every other task is unchanged but renumbered."""
    if tp.programs is not None:
        raise IRError("fold_reduce: runs before the schedule pass (the program already has queues)")
    signalers: dict[str, list[Task]] = defaultdict(list)
    for t in tp.tasks:
        for c, _ in t.signals:
            signalers[c].append(t)
    replaced: dict[int, Task] = {}
    dropped: set[int] = set()
    for r in tp.tasks:
        if r.kind != "attn_reduce":
            continue
        parts = _foldable(tp, r, signalers)
        if parts is None:
            continue
        arrive = r.waits[0][0]
        for p in parts:
            attrs = dict(p.attrs, arrive=arrive, n_chunks=r.attrs["n_chunks"], out=r.attrs["out"])
            if "sink" in r.attrs:
                attrs["sink"] = r.attrs["sink"]
            reads = list(p.reads) + [x for x in r.reads if x not in p.reads]
            replaced[p.id] = dataclasses.replace(p, reads=reads, writes=list(p.writes) + list(r.writes),
                                                 signals=list(r.signals), attrs=attrs)
        dropped.add(r.id)
    if not dropped:
        return tp
    kept = [replaced.get(t.id, t) for t in tp.tasks if t.id not in dropped]
    expected: dict[str, int] = defaultdict(int)
    for t in kept:
        for c, n in t.signals:
            expected[c] += n
        if "arrive" in t.attrs:
            expected[t.attrs["arrive"]] += 1
    counters = {name: Counter(name, expected[name], c.slot) for name, c in tp.counters.items()}
    tasks = []
    for i, t in enumerate(kept):
        # lowering waits for every signal of a counter; the folded counters got more of them
        waits = [(c, counters[c].expected if n == tp.counters[c].expected else n) for c, n in t.waits]
        tasks.append(dataclasses.replace(t, id=i, waits=waits))
    notes = dict(tp.annotations, folded_reduces=len(dropped))
    return verify_tile(dataclasses.replace(tp, tasks=tasks, counters=counters, annotations=notes))


def fold_reduce_pass(tp: TileProgram, options=None) -> TileProgram:
    """Pipeline entry: folds when the compile's lowering options ask for it
    (`LowerOptions.fold_reduce`); otherwise returns the program unchanged."""
    lower = getattr(options, "lower", None)
    return fold_reduce(tp) if getattr(lower, "fold_reduce", 0) else tp
