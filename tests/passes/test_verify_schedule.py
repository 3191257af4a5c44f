"""The schedule verifier accepts real schedules and rejects hand-broken ones by name."""
import copy

import pytest

from tilecomp.errors import IRError, ScheduleError
from tilecomp.ir.tile import parse_tile, print_tile, verify_schedule
from tilecomp.passes.schedule import ScheduleOptions, schedule


@pytest.fixture
def one_queue(tiny_tile):
    s = schedule(tiny_tile, ScheduleOptions(interpreter_order=True))
    return copy.deepcopy(s)


def first(tp, kind):
    return next(t for t in tp.tasks if t.kind == kind)


def test_real_schedules_pass(tiny_tile):
    verify_schedule(schedule(tiny_tile, ScheduleOptions(interpreter_order=True)), interpreter_order=True)
    verify_schedule(schedule(tiny_tile, ScheduleOptions(programs=7)))


def test_removed_dependency_is_a_missing_dependency(one_queue):
    t = first(one_queue, "attn_partial")
    dropped = [c for c, _ in t.waits if ".h0" in c][0]
    t.waits = [(c, n) for c, n in t.waits if c != dropped]
    with pytest.raises(ScheduleError, match=rf"missing dependency: task {t.name} \(attn_partial\) reads "
                                            rf".* which task t\d+ \(qkv_rope_kv\) writes .*\({dropped}\)"):
        verify_schedule(one_queue)


def test_removed_signal_leaves_a_counter_short(one_queue):
    t = first(one_queue, "attn_reduce")
    counter = t.signals[0][0]
    expected = one_queue.counters[counter].expected
    t.signals = []
    with pytest.raises(ScheduleError, match=rf"counter {counter} expects {expected} signals per step but "
                                            rf"its tasks signal it {expected - 1} times"):
        verify_schedule(one_queue)


def test_cycle_is_named(one_queue):
    embed = first(one_queue, "embed")
    accept = first(one_queue, "accept")
    embed.waits = embed.waits + [("c.accept", 1)]
    with pytest.raises(ScheduleError, match=rf"dependency cycle: (?=.*{embed.name} \(embed\))(?=.*counter c.accept -> )"):
        verify_schedule(one_queue)
    assert accept.signals == [("c.accept", 1)]


def test_out_of_order_queue(tiny_tile):
    s = copy.deepcopy(schedule(tiny_tile, ScheduleOptions(programs=2)))
    route = first(s, "moe_route")
    up = next(t for t in s.tasks if t.kind == "expert_up_gate" and ("c." + route.attrs["plan"], 1) in t.waits)
    # put the expert task and its router on one program, the consumer first
    for q in s.programs:
        q[:] = [i for i in q if i not in (route.id, up.id)]
    s.programs[0][:0] = [up.id, route.id]
    with pytest.raises(ScheduleError, match=rf"queues are not in one global topological order .*"
                                            rf"{route.name} \(moe_route\)"):
        verify_schedule(s)


def test_unsatisfiable_target(one_queue):
    t = first(one_queue, "attn_reduce")
    c, n = t.waits[0]
    t.waits[0] = (c, n + 1)
    with pytest.raises(ScheduleError, match=rf"task {t.name} \(attn_reduce\) waits for counter {c} >= {n + 1}, "
                                            rf"but only {n} signals per step exist"):
        verify_schedule(one_queue)


def test_queue_coverage(one_queue):
    one_queue.programs[0].append(one_queue.programs[0][0])
    with pytest.raises(ScheduleError, match=r"task t\d+ is queued twice"):
        verify_schedule(one_queue)
    one_queue.programs[0] = one_queue.programs[0][1:-1]
    with pytest.raises(ScheduleError, match=r"1 tasks are in no program queue"):
        verify_schedule(one_queue)


def test_unscheduled_program_is_rejected(tiny_tile):
    with pytest.raises(ScheduleError, match="no schedule"):
        verify_schedule(tiny_tile)


def test_broken_text_names_the_line(one_queue):
    text = print_tile(one_queue).replace("attn_reduce[", "attn_reduce[kv_head=]", 1)
    with pytest.raises(IRError, match=r"tile IR line \d+"):
        parse_tile(text)


@pytest.mark.parametrize("seed", range(10))
def test_verifier_catches_random_breakage(seed, random_dag):
    import random

    rng = random.Random(seed)
    tp = random_dag(100 + seed, 30)
    with_deps = [t for t in tp.tasks if t.waits]
    # 1. drop one wait: the task still reads its producer's buffer
    broken = copy.deepcopy(schedule(tp, ScheduleOptions(programs=3)))
    victim = broken.tasks[rng.choice(with_deps).id]
    dropped = victim.waits.pop(rng.randrange(len(victim.waits)))
    with pytest.raises(ScheduleError, match=rf"missing dependency: task {victim.name} .*\({dropped[0]}\)"):
        verify_schedule(broken)
    # 2. one queue, a consumer moved in front of its producer
    broken = copy.deepcopy(schedule(tp, ScheduleOptions(interpreter_order=True)))
    consumer = rng.choice(with_deps)
    producer = int(consumer.waits[0][0][1:])
    queue = broken.programs[0]
    queue.remove(consumer.id)
    queue.insert(queue.index(producer), consumer.id)
    with pytest.raises(ScheduleError, match="queues are not in one global topological order"):
        verify_schedule(broken)
