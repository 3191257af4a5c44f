"""tilecomp.stats: counts, bytes and floors computed independently from the regions."""
import pytest

from tilecomp.ir.tile import Buffer, Counter, Dim, Region, Task, TileProgram
from tilecomp.stats import format_tile_stats, tile_stats


def hand_program() -> TileProgram:
    bufs = [Buffer("x", "bf16", (8, 64), "activation"),
            Buffer("w", "uint8", (4, 128, 2, 16), "weight", "w_blocks"),
            Buffer("y", "fp32", (8, 128), "scratch")]
    x = Region("x", (Dim(0, 8), Dim(0, 64)))
    tasks = [Task(0, "embed", writes=[x], signals=[("c", 1)])]
    for n in range(2):
        tasks.append(Task(1 + n, "expert_up_gate", coords={"slot": 0, "n": n},
                          reads=[x, Region("w", (Dim(0, 1, "expert"), Dim(64 * n, 64 * n + 64), Dim(0, 2), Dim(0, 16)))],
                          writes=[Region("y", (Dim(0, 8), Dim(64 * n, 64 * n + 64)))], waits=[("c", 1)],
                          signals=[("d", 1)]))
    return TileProgram({b.name: b for b in bufs}, {"c": Counter("c", 1, 0), "d": Counter("d", 2, 32)},
                       tasks, [[0, 1], [2]])


def test_counts_bytes_and_floor():
    s = tile_stats(hand_program())
    xb, wb, yb = 8 * 64 * 2, 64 * 2 * 16, 8 * 64 * 4
    assert s.tasks_by_kind == {"embed": 1, "expert_up_gate": 2}
    assert s.bytes_by_kind == {"embed": xb, "expert_up_gate": 2 * (xb + wb + yb)}
    assert s.bytes_moved == 3 * xb + 2 * wb + 2 * yb
    assert s.unique_bytes == xb + 2 * wb + 2 * yb          # x counted once
    tp = hand_program()
    tp.tasks[2].reads[1] = tp.tasks[1].reads[1]                # two slots, same runtime-indexed region
    assert tile_stats(tp).unique_bytes == xb + 2 * wb + 2 * yb
    assert s.bytes_by_buffer_kind == {"activation": 3 * xb, "weight": 2 * wb, "scratch": 2 * yb}
    assert s.program_bytes == [xb + xb + wb + yb, xb + wb + yb]
    assert s.floor_us(1.0) == pytest.approx(s.bytes_moved / 1e3)
    text = format_tile_stats(hand_program(), 2.0)
    assert f"{s.bytes_moved:,}" in text and "expert_up_gate" in text
    assert f"{s.bytes_moved / 2e3:,.1f} us per step" in text


def test_critical_chain_follows_the_deepest_then_largest_predecessor():
    """embed -> two parallel up_gate tiles (one larger) -> a down task waiting on both, plus a
    side task off the chain: depth 3, the larger up_gate on the chain, its bytes in the bound."""
    from tilecomp.stats import critical_chain
    tp = hand_program()
    tp.tasks[2].reads.append(Region("y", (Dim(0, 8), Dim(0, 64))))        # tile 1 moves more bytes
    tp.tasks.append(Task(3, "expert_down", reads=[Region("y", (Dim(0, 8), Dim(0, 128)))],
                         waits=[("d", 2)], signals=[("e", 1)]))
    tp.tasks.append(Task(4, "moe_combine", reads=[Region("x", (Dim(0, 8), Dim(0, 64)))],
                         waits=[("c", 1)], signals=[("f", 1)]))
    tp.counters.update(e=Counter("e", 1, 64), f=Counter("f", 1, 96))
    tp.programs = [[0, 1, 3], [2, 4]]
    ch = critical_chain(tp)
    assert ch.depth == 3 and ch.tasks == [0, 2, 3]
    assert ch.kinds == {"embed": 1, "expert_up_gate": 1, "expert_down": 1}
    assert ch.link_bytes == [tp.task_bytes(tp.tasks[i]) for i in (0, 2, 3)]
    text = format_tile_stats(tp, 2.0)
    assert "longest dependency chain: 3 phases (embed 1, expert_up_gate 1, expert_down 1)" in text
    assert f"{sum(ch.link_bytes):,} bytes: {sum(ch.link_bytes) / 1e3:,.1f} us at 1.0 GB/s per program" in text
    assert critical_chain(TileProgram()).depth == 0
