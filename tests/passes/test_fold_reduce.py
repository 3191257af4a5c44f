"""fold_reduce: each attention's attn_reduce becomes the merge of the last attn_partial of its
head to arrive, and the split router's plan task the work of its last logits task to arrive; the
verifiers accept the result and reject it with an arrival removed."""
import copy
from collections import defaultdict

import pytest

from tilecomp.errors import IRError, ScheduleError
from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule
from tilecomp.passes.fold_reduce import fold_reduce, fold_reduce_pass
from tilecomp.models.presets import preset
from tilecomp.passes.lower import LowerOptions, lower
from tilecomp.passes.pipeline import CompileOptions, compile_model
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


@pytest.fixture(scope="module")
def split_router():
    cfg, dcfg = preset("tiny")       # 16 experts: 4 router tasks of 4 experts per MoE layer
    return lower(compile_model(cfg, dcfg).fused, LowerOptions(router_block=4))


def test_the_split_routers_plan_folds_into_its_logits_tasks(split_router):
    tails = [t for t in split_router.tasks if t.kind == "moe_route" and t.attrs["split"] == 0]
    splits = [t for t in split_router.tasks if t.kind == "moe_route" and t.attrs["split"] == 1]
    assert tails and len(splits) == 4 * len(tails)
    folded = fold_reduce(split_router)
    routes = [t for t in folded.tasks if t.kind == "moe_route"]
    assert len(routes) == len(splits) and all(t.attrs["split"] == 1 for t in routes)
    for tail in tails:
        arrive = tail.waits[0][0]
        group = [t for t in routes if t.attrs["arrive"] == arrive]
        assert len(group) == 4 == folded.counters[arrive].expected
        assert all(t.signals == tail.signals and t.attrs["n_splits"] == 4 for t in group)
        assert all(w in t.writes for t in group for w in tail.writes)
        plan = tail.signals[0][0]
        # the experts wait for the four signals of the plan (which cover the normed rows), and
        # nobody waits on the arrivals
        experts = [t for t in folded.tasks if (plan, 4) in t.waits]
        assert experts and all(t.kind.startswith(("expert", "moe_combine")) for t in experts)
        assert not any(c == arrive for t in folded.tasks for c, _ in t.waits)
    verify_schedule(schedule(folded, ScheduleOptions(programs=5)))


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
