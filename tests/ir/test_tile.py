"""Tile IR: printer/parser round trip, parse errors, structural verifier."""
import pytest
from hypothesis import given, settings, strategies as st

from tilecomp.errors import IRError
from tilecomp.ir.tile import (BUFFER_KINDS, COUNTER_LINE_SLOTS, DTYPE_BYTES, TASK_KINDS, Buffer,
                              Counter, Dim, Region, Task, TileProgram, parse_tile, print_tile,
                              verify_tile)

NAME = st.builds(lambda a, b: a + b, st.sampled_from(["a", "w.", "c.q", "h_", "x.0."]),
                 st.text("abz09_.", max_size=4)).filter(lambda s: not s.endswith("."))
SCALAR = st.one_of(st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
VALUE = st.one_of(SCALAR, st.lists(st.one_of(st.integers(-99, 99), st.text(max_size=5)), max_size=4))


@st.composite
def regions(draw, buffers):
    b = draw(st.sampled_from(buffers))
    dims = []
    for size in b.shape:
        lo = draw(st.integers(0, size - 1))
        hi = draw(st.integers(lo + 1, size))
        index = draw(st.one_of(st.none(), NAME))
        dims.append(Dim(lo, hi, index))
    return Region(b.name, tuple(dims))


@st.composite
def tile_programs(draw):
    bnames = draw(st.lists(NAME, min_size=1, max_size=4, unique=True))
    buffers = [Buffer(n, draw(st.sampled_from(sorted(DTYPE_BYTES))),
                      tuple(draw(st.lists(st.integers(1, 64), max_size=3))),
                      kind := draw(st.sampled_from(BUFFER_KINDS)),
                      draw(NAME) if kind == "weight" else draw(st.one_of(st.none(), NAME)))
               for n in bnames]
    cnames = draw(st.lists(NAME, max_size=4, unique=True))
    counters = [Counter(n, draw(st.integers(1, 50)), i * COUNTER_LINE_SLOTS) for i, n in enumerate(cnames)]
    tasks = []
    for i in range(draw(st.integers(0, 5))):
        pairs = st.lists(st.tuples(st.sampled_from(cnames), st.integers(1, 9)), max_size=3) if cnames \
            else st.just([])
        tasks.append(Task(i, draw(st.sampled_from(TASK_KINDS)), draw(st.integers(0, 3)),
                          draw(st.dictionaries(NAME, st.integers(-5, 500), max_size=3)),
                          draw(st.lists(regions(buffers), max_size=3)),
                          draw(st.lists(regions(buffers), max_size=2)),
                          draw(pairs), draw(pairs), draw(st.dictionaries(NAME, VALUE, max_size=3))))
    ids = list(range(len(tasks)))
    queue = st.lists(st.sampled_from(ids), max_size=4) if ids else st.just([])
    programs = draw(st.one_of(st.none(), st.lists(queue, max_size=3)))
    return TileProgram({b.name: b for b in buffers}, {c.name: c for c in counters}, tasks, programs,
                       draw(st.dictionaries(NAME, VALUE, max_size=3)))


@settings(max_examples=100, deadline=None)
@given(tile_programs())
def test_print_parse_round_trip(tp):
    text = print_tile(tp)
    back = parse_tile(text)
    assert back == tp
    assert print_tile(back) == text


def small_program() -> TileProgram:
    bufs = [Buffer("x", "bf16", (8, 64), "activation"),
            Buffer("w", "bf16", (128, 64), "weight", "model.layers.0.mlp.up_proj.weight"),
            Buffer("y", "fp32", (8, 128), "activation")]
    tasks = [Task(0, "embed", writes=[Region("x", (Dim(0, 8), Dim(0, 64)))], signals=[("c.x", 1)]),
             Task(1, "linear", coords={"n": 0},
                  reads=[Region("x", (Dim(0, 8), Dim(0, 64))), Region("w", (Dim(0, 128), Dim(0, 64)))],
                  writes=[Region("y", (Dim(0, 8), Dim(0, 128)))], waits=[("c.x", 1)])]
    return TileProgram({b.name: b for b in bufs}, {"c.x": Counter("c.x", 1, 0)}, tasks)


def test_bytes_from_regions():
    tp = small_program()
    assert tp.task_bytes(tp.tasks[1]) == 8 * 64 * 2 + 128 * 64 * 2 + 8 * 128 * 4
    assert tp.region_bytes(Region("w", (Dim(0, 1, "e"), Dim(0, 64)))) == 64 * 2


def test_verify_accepts_and_names_faults():
    verify_tile(small_program())
    tp = small_program()
    tp.tasks[1].reads[1] = Region("w", (Dim(0, 129), Dim(0, 64)))
    with pytest.raises(IRError, match=r"t1 \(linear\) reads w\[0:129, 0:64\].*outside w \[128, 64\]"):
        verify_tile(tp)
    tp = small_program()
    tp.tasks[1].waits = [("c.nope", 1)]
    with pytest.raises(IRError, match="t1 .*unknown counter 'c.nope'"):
        verify_tile(tp)
    tp = small_program()
    tp.tasks[0].writes.append(Region("w", (Dim(0, 1), Dim(0, 1))))
    with pytest.raises(IRError, match="t0 .*writes weight buffer w"):
        verify_tile(tp)
    tp = small_program()
    tp.counters["c.y"] = Counter("c.y", 1, COUNTER_LINE_SLOTS - 1)
    with pytest.raises(IRError, match="c.y: slot 31 shares a cache line with counter c.x"):
        verify_tile(tp)
    tp = small_program()
    tp.tasks[1].kind = "matmul"
    with pytest.raises(IRError, match="t1: kind 'matmul' not one of"):
        verify_tile(tp)


@pytest.mark.parametrize("text, where", [
    ("tile v2\n", "line 1"),
    ("tile v1\nbuffer x : bf16[8, 4] activation\nbuffer x : bf16[8] activation\n", "line 3.*defined twice"),
    ("tile v1\ntask t0 = linear[n=0] rank=0\n  reeds x[0:1]\n", "line 3.*reads/writes"),
    ("tile v1\ntask t0 = linear[n=0 rank=0\n", "line 2"),
    ("tile v1\ncounter c expected=1\n", "line 2.*expected= and slot="),
    ("tile v1\nschedule programs=2\nprogram 1: t0\n", "line 3.*expected program 0"),
    ("tile v1\nprogram 0: t0\n", "line 2.*before the 'schedule"),
    ("tile v1\n  reads x[0:1]\n", "line 2.*outside a task"),
    ("tile v1\ntask t0 = linear[] rank=0 {a=?}\n", "line 2.*unexpected character"),
])
def test_parse_errors_name_the_line(text, where):
    with pytest.raises(IRError, match=where):
        parse_tile(text)


def test_communication_tasks_on_ranks_are_representable():
    from tilecomp.errors import ScheduleError
    from tilecomp.ir.tile import verify_schedule
    part = Buffer("part", "fp32", (8, 64), "activation")
    tasks = [Task(0, "embed", rank=0, writes=[part.full()], signals=[("c.a", 1)]),
             Task(1, "send", rank=0, coords={"peer": 1}, reads=[part.full()], waits=[("c.a", 1)],
                  signals=[("c.sent", 1)], attrs={"peer": 1, "numel": 512}),
             Task(2, "recv", rank=1, coords={"peer": 0}, writes=[part.full()], waits=[("c.sent", 1)],
                  signals=[("c.recv", 1)], attrs={"peer": 0, "numel": 512}),
             Task(3, "allreduce", rank=1, reads=[part.full()], writes=[part.full()], waits=[("c.recv", 1)],
                  signals=[("c.done", 1)])]
    counters = {c: Counter(c, 1, i * COUNTER_LINE_SLOTS) for i, c in enumerate(["c.a", "c.sent", "c.recv", "c.done"])}
    tp = TileProgram({"part": part}, counters, tasks, [[0, 1], [2, 3]], {"ranks": 2})
    assert parse_tile(print_tile(verify_schedule(tp))) == tp
    tp.programs = [[0, 1, 2], [3]]
    with pytest.raises(ScheduleError, match="program 0 mixes ranks 0 and 1"):
        verify_schedule(tp)
    tp.annotations["ranks"] = 1
    with pytest.raises(IRError, match=r"t2 \(recv\): rank 1 outside 0..0"):
        verify_tile(tp)
