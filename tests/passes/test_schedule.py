"""Scheduling onto programs: complete, topologically consistent, balanced, deadlock-free."""
import pytest

from tilecomp.ir.tile import verify_schedule
from tilecomp.models.presets import preset
from tilecomp.passes.lower import lower
from tilecomp.passes.pipeline import compile_model
from tilecomp.passes.schedule import ScheduleOptions, schedule, task_costs_us


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


def test_truncated_mimo_v2_flash_tiles_schedule_and_verify():
    """Real MiMo-V2-Flash shapes (3 layers: full, 2 SWA; 2 MoE) through every tile pass, with the
    fixed tile sizes of LowerOptions (programs=0: no balancing)."""
    from collections import Counter

    from tilecomp.ir.tile import parse_tile, print_tile
    from tilecomp.passes.lower import LowerOptions
    from tilecomp.passes.pipeline import CompileOptions
    from tilecomp.settings import Settings
    cfg, dcfg = preset("mimo-v2-flash", 3)
    o = LowerOptions(programs=0)
    c = compile_model(cfg, dcfg, CompileOptions(lower=o), settings=Settings())
    n = Counter(t.kind for t in c.schedule.tasks)
    slots = min(cfg.n_routed_experts, dcfg.block_size * cfg.num_experts_per_tok)     # 64 of 256
    assert n["moe_route"] == 2 * (cfg.n_routed_experts // 32 + 1)     # split router (32 experts) + plan
    assert n["expert_up_gate"] == 2 * slots * (cfg.moe_intermediate_size // o.expert_block_n)
    assert n["expert_down"] == 2 * slots * (cfg.hidden_size // o.expert_down_block_n)
    full, swa = cfg.attn(0), cfg.attn(1)
    chunks_full = c.options.max_len // o.kv_chunk
    chunks_swa = -(-(swa.window + dcfg.block_size) // o.kv_chunk)
    target_parts = full.n_kv_heads * chunks_full + 2 * swa.n_kv_heads * chunks_swa
    draft_parts = dcfg.num_hidden_layers * dcfg.num_key_value_heads * \
        -(-(dcfg.sliding_window + dcfg.block_size) // o.kv_chunk)
    assert n["attn_partial"] == target_parts + draft_parts
    assert n["lm_head"] == 2 * -(-cfg.vocab_size // o.vocab_block)
    assert parse_tile(print_tile(c.schedule)) == c.schedule
    verify_schedule(c.schedule)


@pytest.mark.parametrize("block,expert_parts", [(8, -1), (1, -1), (8, 0)])
def test_flash_phases_are_balanced_over_the_programs(block, expert_parts):
    """By default the lowering sizes each weight-streaming phase for the compile's programs:
    the LM head is one wave over nearly every program, the routed experts fill the machine
    (v0's fixed tiles gave 16 expert tasks per layer on 132 SMs): by default at block 8 one
    expert task per program and kind that takes its share of the routed units at run time,
    each on its own program; at block 1 or with expert_parts 0, (slot, tile) tasks sized for
    the expected routing; and
    no linear phase leaves most programs idle."""
    from collections import Counter, defaultdict

    from tilecomp.passes.lower import LowerOptions
    from tilecomp.passes.pipeline import CompileOptions
    from tilecomp.settings import Settings
    cfg, dcfg = preset("mimo-v2-flash", 2)
    P = 132
    c = compile_model(cfg, dcfg if block == 8 else None,
                      CompileOptions(programs=P, block=None if block == 8 else 1,
                                     lower=LowerOptions(expert_parts=expert_parts)), settings=Settings())
    tp = c.schedule if block == 8 else c.plain_schedule
    n = Counter(t.kind for t in tp.tasks)
    heads = 2 if block == 8 else 1               # the DFlash step has the draft's LM head too
    assert 0.9 * P * heads <= n["lm_head"] <= P * heads
    widths = {t.attrs["n1"] - t.attrs["n0"] for t in tp.tasks if t.kind == "lm_head"}
    assert max(widths) % 64 == 0                   # whole BLOCK_N sub-tiles but the last
    moe_layers = len({t.attrs["op"] for t in tp.tasks if t.kind == "expert_up_gate"})
    assert moe_layers >= 1
    slots = min(cfg.n_routed_experts, block * cfg.num_experts_per_tok)
    program_of = {t: p for p, queue in enumerate(tp.programs) for t in queue}
    for kind in ("expert_up_gate", "expert_down"):
        per_layer = n[kind] // moe_layers
        if expert_parts and block > 1:     # one row: every slot is used, per-slot tasks stay
            assert per_layer == P, (kind, per_layer)
            for op in {t.attrs["op"] for t in tp.tasks if t.kind == kind}:
                assert len({program_of[t.id] for t in tp.tasks if t.kind == kind and t.attrs["op"] == op}) == P
        else:
            assert per_layer % slots == 0 and per_layer >= P * 0.9, (kind, per_layer)
    # the split router (on every MoE layer's critical path) fills the machine too, + 1 top-k task
    assert 0.9 * P <= n["moe_route"] // moe_layers - 1 <= P
    linear = defaultdict(int)
    for t in tp.tasks:
        if t.kind == "linear":
            linear[t.attrs["op"]] += 1
    assert linear and all(0.45 * P <= k <= 2 * P for k in linear.values()), dict(linear)
    verify_schedule(tp)


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_always_schedule_to_a_verified_program(seed, random_dag):
    tp = random_dag(seed, 5 + 7 * seed)
    for programs in (1, 2, 5, 64):
        s = schedule(tp, ScheduleOptions(programs=programs))
        verify_schedule(s, interpreter_order=programs == 1)
    verify_schedule(schedule(tp, ScheduleOptions(interpreter_order=True)), interpreter_order=True)
