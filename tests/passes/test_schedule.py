"""Scheduling onto programs: complete, topologically consistent, balanced, deadlock-free."""
import pytest

from tilecomp.ir.tile import verify_schedule
from tilecomp.models.presets import preset
from tilecomp.passes.lower import lower
from tilecomp.passes.pipeline import compile_model
from tilecomp.passes.schedule import ScheduleOptions, schedule, task_costs_us


@pytest.fixture(scope="module")
def tiny_tile():
    cfg, dcfg = preset("tiny")
    return lower(compile_model(cfg, dcfg).fused)


@pytest.mark.parametrize("programs", [1, 3, 16, 132])
def test_schedule_verifies(tiny_tile, programs):
    s = schedule(tiny_tile, ScheduleOptions(programs=programs))
    verify_schedule(s)
    assert len(s.programs) == programs
    assert sorted(i for q in s.programs for i in q) == list(range(len(s.tasks)))
    assert tiny_tile.programs is None          # the pass does not mutate its input


def test_interpreter_order_is_one_topological_queue(tiny_tile):
    s = schedule(tiny_tile, ScheduleOptions(interpreter_order=True))
    assert len(s.programs) == 1
    verify_schedule(s, interpreter_order=True)


def test_critical_path_beats_round_robin_and_balances_bytes(tiny_tile):
    opts = ScheduleOptions(programs=8)
    s = schedule(tiny_tile, opts)
    cost = task_costs_us(tiny_tile, opts)
    load = [sum(cost[i] for i in q) for q in s.programs]
    total = sum(cost)
    # a list schedule never idles a program while a task is ready: every program carries work,
    # and the predicted time is at least the average load and the longest chain
    assert min(load) > 0
    assert s.annotations["predicted_us"] >= total / 8 - 1e-6
    assert s.annotations["predicted_us"] <= total             # some parallelism was found
    assert max(load) <= 2.0 * total / 8 + max(cost)


def test_multi_program_schedule_breaks_interpreter_order(tiny_tile):
    from tilecomp.errors import ScheduleError
    s = schedule(tiny_tile, ScheduleOptions(programs=4))
    with pytest.raises(ScheduleError, match="interpreter order: task t\\d+ .* waits on counter"):
        verify_schedule(s, interpreter_order=True)
