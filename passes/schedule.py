"""Scheduling: tile tasks -> per-program queues.

Critical-path list scheduling: a task's cost is the time its bytes take at one
program's share of HBM bandwidth plus a fixed per-task overhead; its priority
is its bottom level (longest cost path to the end of the step). Ready tasks
go, highest priority first, to the program that frees up first, so bytes are
balanced across programs. A task becomes ready only after every task it
waits on is placed, so the placement order is one global topological order
and every queue follows it (no deadlock with co-resident programs).
O((tasks + waits + signals) log tasks).

`interpreter_order=True` gives the CPU interpreter's schedule: one program
whose queue is a topological order (every dependency earlier in the queue).
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from dataclasses import dataclass

from tilecomp.errors import ScheduleError
from tilecomp.ir.tile import TileProgram


@dataclass(frozen=True)
class ScheduleOptions:
    programs: int = 132             # persistent programs (one per SM on an H100 SXM)
    interpreter_order: bool = False
    hbm_gbps: float = 3350.0        # bandwidth shared by all programs (H100 SXM peak)
    task_overhead_us: float = 1.0   # dispatch + wait + signal per task


@dataclass
class _Graph:
    """Tasks linked through counters: signalers and waiters of each counter."""
    signalers: dict[str, list[int]]
    waiters: dict[str, list[int]]
    order: list[int]                # a topological order of the tasks


class _Countdown:
    """Which tasks become ready as others signal: per task the distinct counters it still waits
    on (plus `extra` predecessors, e.g. the previous task of its queue), per counter the
    signals it still needs. Shared by the topological order, the list scheduler and the
    simulator."""

    def __init__(self, tp: TileProgram, waiters: dict[str, list[int]], signalers: dict[str, list[int]],
                 extra=()):
        self.tasks, self.waiters = tp.tasks, waiters
        self.unmet = [len({c for c, _ in t.waits}) for t in tp.tasks]
        for i in extra:
            self.unmet[i] += 1
        self.left = {c: len(s) for c, s in signalers.items()}

    def ready(self) -> list[int]:
        return [i for i, n in enumerate(self.unmet) if n == 0]

    def release(self, w: int) -> bool:
        """One of task w's predecessors is done; True when that was the last."""
        self.unmet[w] -= 1
        return self.unmet[w] == 0

    def signal(self, i: int) -> list[int]:
        """Task i has sent its signals: the tasks whose last unmet counter just completed."""
        woken = []
        for c, _ in self.tasks[i].signals:
            self.left[c] -= 1
            if self.left[c] == 0:
                woken += [w for w in self.waiters.get(c, ()) if self.release(w)]
        return woken


def task_graph(tp: TileProgram) -> _Graph:
    signalers: dict[str, list[int]] = defaultdict(list)
    waiters: dict[str, list[int]] = defaultdict(list)
    for t in tp.tasks:
        for c, _ in t.signals:
            signalers[c].append(t.id)
        for c in {c for c, _ in t.waits}:
            waiters[c].append(t.id)
    for t in tp.tasks:
        for c, _ in t.waits:
            if c not in signalers:
                raise ScheduleError(f"task {t.name} ({t.kind}) waits on counter {c}, which no task signals")
    countdown = _Countdown(tp, waiters, signalers)
    ready = countdown.ready()
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for w in countdown.signal(i):
            heapq.heappush(ready, w)
    if len(order) != len(tp.tasks):
        stuck = next(t for t in tp.tasks if countdown.unmet[t.id] > 0)
        raise ScheduleError(f"cannot schedule: task {stuck.name} ({stuck.kind}) is on a dependency cycle "
                            f"or waits on a counter that never completes ({', '.join(c for c, _ in stuck.waits)})")
    return _Graph(signalers, waiters, order)


def task_costs_us(tp: TileProgram, options: ScheduleOptions) -> list[float]:
    per_program = options.hbm_gbps * 1e3 / max(1, options.programs)     # bytes per microsecond
    return [tp.task_bytes(t) / per_program + options.task_overhead_us for t in tp.tasks]


def bottom_levels(tp: TileProgram, g: _Graph, cost: list[float]) -> list[float]:
    level = [0.0] * len(tp.tasks)
    counter_level: dict[str, float] = {}
    for i in reversed(g.order):
        after = 0.0
        for c, _ in tp.tasks[i].signals:
            if c not in counter_level:
                counter_level[c] = max((level[w] for w in g.waiters.get(c, ())), default=0.0)
            after = max(after, counter_level[c])
        level[i] = cost[i] + after
    return level


def _list_schedule(tp: TileProgram, g: _Graph, options: ScheduleOptions) -> tuple[list[list[int]], float]:
    cost = task_costs_us(tp, options)
    level = bottom_levels(tp, g, cost)
    countdown = _Countdown(tp, g.waiters, g.signalers)
    done_at: dict[str, float] = defaultdict(float)
    ready_at = [0.0] * len(tp.tasks)
    ready = [(-level[i], i) for i in countdown.ready()]
    heapq.heapify(ready)
    free = [(0.0, p) for p in range(options.programs)]
    queues: list[list[int]] = [[] for _ in range(options.programs)]
    makespan = 0.0
    while ready:
        _, i = heapq.heappop(ready)
        at, p = heapq.heappop(free)
        finish = max(at, ready_at[i]) + cost[i]
        makespan = max(makespan, finish)
        queues[p].append(i)
        heapq.heappush(free, (finish, p))
        for c, _ in tp.tasks[i].signals:
            done_at[c] = max(done_at[c], finish)
        for w in countdown.signal(i):
            ready_at[w] = max(done_at[c] for c, _ in tp.tasks[w].waits)
            heapq.heappush(ready, (-level[w], w))
    return queues, makespan


def schedule(tp: TileProgram, options: ScheduleOptions = ScheduleOptions()) -> TileProgram:
    """Return a copy of `tp` with program queues (and the schedule's annotations)."""
    if options.programs < 1:
        raise ScheduleError(f"schedule: programs must be >= 1, found {options.programs}")
    g = task_graph(tp)
    notes = dict(tp.annotations)
    if options.interpreter_order:
        queues = [list(g.order)]
        notes.update(schedule="interpreter_order", programs=1)
    else:
        queues, makespan = _list_schedule(tp, g, options)
        notes.update(schedule="critical_path", programs=options.programs,
                     predicted_us=round(makespan, 3), hbm_gbps=options.hbm_gbps)
    return dataclasses.replace(tp, programs=queues, annotations=notes)


def simulate(tp: TileProgram, options: ScheduleOptions) -> tuple[list[float], list[float]]:
    """(start, finish) in microseconds of every task when the queues run with the cost model."""
    cost = task_costs_us(tp, options)
    g = task_graph(tp)
    prev = {}
    for queue in tp.programs or []:
        for a, b in zip(queue, queue[1:]):
            prev[b] = a
    nxt = {a: b for b, a in prev.items()}
    countdown = _Countdown(tp, g.waiters, g.signalers, extra=prev)
    done_at: dict[str, float] = defaultdict(float)
    start, finish = [0.0] * len(tp.tasks), [0.0] * len(tp.tasks)
    ready = countdown.ready()
    while ready:
        i = ready.pop()
        t = tp.tasks[i]
        start[i] = max([finish[prev[i]] if i in prev else 0.0] + [done_at[c] for c, _ in t.waits])
        finish[i] = start[i] + cost[i]
        for c, _ in t.signals:
            done_at[c] = max(done_at[c], finish[i])
        if i in nxt and countdown.release(nxt[i]):
            ready.append(nxt[i])
        ready += countdown.signal(i)
    return start, finish


def schedule_pass(tp: TileProgram, options=None) -> TileProgram:
    """Pipeline entry: programs / interpreter_order from the compile options."""
    return schedule(tp, ScheduleOptions(programs=getattr(options, "programs", ScheduleOptions.programs),
                                        interpreter_order=getattr(options, "interpreter_order", False)))
