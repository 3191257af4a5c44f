"""Fold a reduction task into the last of its producers to arrive (one dependency link less on
the critical path, per attention and per split router).

Two tails qualify (FOLDS): attn_reduce, which waits on the attn_partial tasks of one KV head
(flash decoding, one per KV chunk), and the moe_route task that builds the routing plan from the
logits its split-router moe_route tasks wrote. On the step's critical path each is two links:
producers -> tail -> consumers. Here the tail task goes away:

  - every producer gets `arrive = <the counter the tail waited on>` and the count of arrivals
    (`n_chunks` / `n_splits`) plus the tail's own args (attn_reduce's `out`, `sink`; the router
    tasks already carry the plan's). After its own stores it adds 1 to that counter itself, with
    an acq_rel atomic, and the task that sees the last of the step's arrivals runs the tail's work
    (attn_reduce's body; the top-k and plan of moe_route) before it signals. The arrival counter
    is no longer signalled by the frame nor waited on: it counts arrivals (`expected` unchanged); a
    wait on it elsewhere (the experts' on the split router's normed rows) becomes a wait on the
    tail's counter, which its producers signal after arriving;
  - every producer signals the tail's counter instead, and declares the tail's reads and writes
    (the tail's work may run in any of them). The tail's consumers wait for all of those
    signals: the last arriver's signal comes after the tail's work, so when the counter is
    complete the output is written.

The verifiers know the protocol: an `arrive` counter gets one arrival per task that names it
(check_counters), and tasks arriving at one counter may read each other's writes
(check_data_dependencies). Off by default (`LowerOptions.fold_reduce`, `--lower fold_reduce=1`).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from tilecomp.errors import IRError
from tilecomp.ir.tile import Counter, Task, TileProgram, verify_tile


# tail kind -> (its producers' kind, the producers' attr that counts arrivals, tail attrs they
# take over). A tail qualifies when `is_tail` holds for it (attn_reduce always; the router task
# that builds the plan from the split router's logits).
FOLDS = {
    "attn_reduce": ("attn_partial", "n_chunks", ("out", "sink")),
    "moe_route": ("moe_route", "n_splits", ()),
}


def _is_tail(t: Task) -> bool:
    if t.kind == "attn_reduce":     # a merge of the whole KV group only (not LowerOptions.reduce_rows')
        a = t.attrs
        return a.get("h0", 0) == 0 and a.get("h1", 0) in (0, a["n_heads_q"] // a["n_kv_heads"])
    return t.kind == "moe_route" and t.attrs.get("split") == 0 and "gate" not in t.attrs


def _foldable(tail: Task, signalers: dict[str, list[Task]]) -> list[Task] | None:
    """The producers a tail can fold into: it waits on one counter only, every task signalling
    that counter is of the producer kind, of the same op, and signals nothing else (and, for
    attention, they are the n_chunks partials of the head)."""
    if tail.kind not in FOLDS or not _is_tail(tail) or len(tail.waits) != 1 or len(tail.signals) != 1:
        return None
    kind, count, _ = FOLDS[tail.kind]
    counter, _ = tail.waits[0]
    parts = signalers.get(counter, [])
    ok = parts and all(p.kind == kind and p.id != tail.id and p.signals == [(counter, 1)]
                       and "arrive" not in p.attrs and p.attrs.get("op") == tail.attrs.get("op") for p in parts)
    if not ok or (count in tail.attrs and len(parts) != tail.attrs[count]):
        return None
    return parts


def fold_reduce(tp: TileProgram) -> TileProgram:
    """Return a copy of `tp` (unscheduled) without the tails that could fold (see the module
    docstring); every other task is unchanged but renumbered."""
    if tp.programs is not None:
        raise IRError("fold_reduce: runs before the schedule pass (the program already has queues)")
    signalers: dict[str, list[Task]] = defaultdict(list)
    for t in tp.tasks:
        for c, _ in t.signals:
            signalers[c].append(t)
    replaced: dict[int, Task] = {}
    dropped: set[int] = set()
    then: dict[str, str] = {}          # arrival counter -> the counter its tasks signal after it
    for r in tp.tasks:
        parts = _foldable(r, signalers)
        if parts is None:
            continue
        _, count, taken = FOLDS[r.kind]
        arrive = r.waits[0][0]
        then[arrive] = r.signals[0][0]
        for p in parts:
            attrs = dict(p.attrs, arrive=arrive, **{count: len(parts)})
            attrs.update((k, r.attrs[k]) for k in taken if k in r.attrs)
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
        # lowering waits for every signal of a counter; the folded counters got more of them. A
        # wait on an arrival counter (the experts' on the split router's normed rows) becomes a
        # wait on the counter its tasks signal after arriving: nobody polls arrivals
        waits: list[tuple[str, int]] = []
        for c, n in t.waits:
            c = then.get(c, c)
            n = counters[c].expected if c in then.values() or n == tp.counters[c].expected else n
            if (c, n) not in waits:
                waits.append((c, n))
        tasks.append(dataclasses.replace(t, id=i, waits=waits))
    notes = dict(tp.annotations, folded_reduces=len(dropped))
    return verify_tile(dataclasses.replace(tp, tasks=tasks, counters=counters, annotations=notes))


def fold_reduce_pass(tp: TileProgram, options=None) -> TileProgram:
    """Pipeline entry: folds when the compile's lowering options ask for it
    (`LowerOptions.fold_reduce`); otherwise returns the program unchanged."""
    lower = getattr(options, "lower", None)
    return fold_reduce(tp) if getattr(lower, "fold_reduce", 0) else tp
