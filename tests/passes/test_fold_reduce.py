"""fold_reduce: each attention's attn_reduce becomes the merge of the last attn_partial of its
head to arrive; the verifiers accept the result and reject it with an arrival removed."""
import copy
from collections import defaultdict

import pytest

from tilecomp.errors import IRError, ScheduleError
from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule
from tilecomp.passes.fold_reduce import fold_reduce, fold_reduce_pass
from tilecomp.passes.lower import LowerOptions
from tilecomp.passes.pipeline import CompileOptions
from tilecomp.passes.schedule import ScheduleOptions, schedule


@pytest.fixture(scope="module")
def folded(tiny_tile):
    return fold_reduce(tiny_tile)


def test_every_reduce_folds_into_its_heads_partials(tiny_tile, folded):
    reduces = [t for t in tiny_tile.tasks if t.kind == "attn_reduce"]
    partials = [t for t in tiny_tile.tasks if t.kind == "attn_partial"]
    assert reduces and all(t.kind != "attn_reduce" for t in folded.tasks)
    assert len(folded.tasks) == len(tiny_tile.tasks) - len(reduces)
    assert folded.annotations["folded_reduces"] == len(reduces)
    assert [t.id for t in folded.tasks] == list(range(len(folded.tasks)))
    by_arrive = defaultdict(list)
    for t in folded.tasks:
        if t.kind == "attn_partial":
            by_arrive[t.attrs["arrive"]].append(t)
    assert sum(map(len, by_arrive.values())) == len(partials)
    multi = 0
    for r in reduces:
        counter = r.waits[0][0]
        group = by_arrive[counter]
        n = r.attrs["n_chunks"]
        multi += n > 1
        assert len(group) == n == folded.counters[counter].expected
        for p in group:
            assert p.signals == r.signals and p.attrs["out"] == r.attrs["out"]
            assert p.attrs.get("sink") == r.attrs.get("sink") and p.attrs["n_chunks"] == n
            assert all(x in p.reads for x in r.reads) and all(x in p.writes for x in r.writes)
            assert not any(c == counter for c, _ in p.waits)          # nobody waits on arrivals
    assert multi, "the tiny step has a head of several chunks"
    # the reduces' counter now gets one signal per partial, and its consumers wait for all
    for name in {r.signals[0][0] for r in reduces}:
        signallers = [t for t in folded.tasks if (name, 1) in t.signals]
        assert folded.counters[name].expected == len(signallers)
        for t in folded.tasks:
            assert all(n == len(signallers) for c, n in t.waits if c == name)
    # other tasks are untouched (ids shift past each dropped reduce)
    before = [t for t in tiny_tile.tasks if t.kind not in ("attn_reduce", "attn_partial")]
    after = [t for t in folded.tasks if t.kind != "attn_partial"]
    assert [(t.kind, t.coords, t.attrs, t.reads, t.writes) for t in before] == \
        [(t.kind, t.coords, t.attrs, t.reads, t.writes) for t in after]


def test_folded_program_schedules_verifies_and_round_trips(folded):
    for opts in (ScheduleOptions(interpreter_order=True), ScheduleOptions(programs=7)):
        s = schedule(folded, opts)
        verify_schedule(s, interpreter_order=opts.interpreter_order)
        assert parse_tile(print_tile(s)) == s


def test_removed_arrival_is_caught(folded):
    broken = copy.deepcopy(folded)
    p = next(t for t in broken.tasks if t.kind == "attn_partial" and t.attrs["n_chunks"] > 1)
    counter = p.attrs.pop("arrive")
    n = broken.counters[counter].expected
    with pytest.raises(ScheduleError, match=rf"counter {counter} expects {n} signals per step but its "
                                            rf"tasks signal it {n - 1} times"):
        verify_schedule(schedule(broken, ScheduleOptions(programs=3)))


def test_reading_a_sibling_without_the_arrival_is_a_missing_dependency(folded):
    broken = copy.deepcopy(folded)
    p = next(t for t in broken.tasks if t.kind == "attn_partial" and t.attrs["n_chunks"] > 1)
    counter = p.attrs["arrive"]
    p.attrs["arrive"] = "c.other"
    with pytest.raises(IRError, match=rf"task {p.name} \(attn_partial\): arrives at unknown counter 'c.other'"):
        verify_schedule(schedule(broken, ScheduleOptions(programs=3)))
    # the arrivals balanced by hand elsewhere: the merge's reads are then unordered
    p.attrs.pop("arrive")
    broken.counters[counter] = broken.counters[counter].__class__(
        counter, broken.counters[counter].expected - 1, broken.counters[counter].slot)
    with pytest.raises(ScheduleError, match=rf"missing dependency: task {p.name} \(attn_partial\) reads "):
        verify_schedule(schedule(broken, ScheduleOptions(programs=3)))


def test_the_pass_is_a_switch(tiny_tile):
    assert fold_reduce_pass(tiny_tile, CompileOptions()) is tiny_tile
    on = fold_reduce_pass(tiny_tile, CompileOptions(lower=LowerOptions(fold_reduce=1)))
    assert on == fold_reduce(tiny_tile) and on is not tiny_tile
    with pytest.raises(IRError, match="runs before the schedule pass"):
        fold_reduce(schedule(tiny_tile, ScheduleOptions(programs=2)))
