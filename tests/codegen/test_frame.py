"""The megakernel frame: one kernel, dispatch comments, epoch targets, bounded waits."""
import ast

import pytest
import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.harness import counter_values, run_tasks
from tilecomp.codegen.triton_gen import generate_kernel
from tilecomp.errors import DeadlockError, ScheduleError
from tilecomp.runtime.buffers import ArenaBuilder

CONST = dict(BLOCK_T=16, BLOCK_N=32, BLOCK_K=32)


def linear_record(task, b, *, T, N, K):
    """y = x @ w^T over the whole of x [T, K], w [N, K] (one N tile)."""
    return L.TaskRecord("linear", task, dict(
        x=b.offset("x"), x_stride=K, w=b.offset("w"), w_up=-1, k_dim=K, n_dim=N, n0=0, k0=0, k1=K,
        norm=-1, eps_bits=0, bias=-1, res=-1, res_stride=N, y=b.offset("y"), y_stride=N,
        n_rows=T, rows=-1))


def jit_functions(source):
    tree = ast.parse(source)
    return [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
            and any("jit" in ast.unparse(d) for d in f.decorator_list)]


def test_one_jit_kernel_with_a_commented_branch_per_kind():
    src = generate_kernel(["linear", "embed"], name="decode_step", constexprs=dict(
        BLOCK_T=16, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32))
    assert jit_functions(src) == ["decode_step"]
    assert f"if kind == {L.KIND_IDS['embed']}:  # embed" in src
    assert f"elif kind == {L.KIND_IDS['linear']}:  # linear" in src
    assert "lm_head" not in src  # only the kinds used get a branch
    # weight loads come before the wait in the linear branch
    branch = src.split("# linear\n", 1)[1]
    assert branch.index("ln_w = tl.load(arena_w") < branch.index("sem=\"acquire\"")


def test_unknown_kind_and_missing_constexpr_are_errors():
    with pytest.raises(ScheduleError, match="warp_drive"):
        generate_kernel(["warp_drive"])
    with pytest.raises(ScheduleError, match="BLOCK_K"):
        generate_kernel(["linear"], constexprs=dict(BLOCK_T=16, BLOCK_N=32))


def _chain(T=3, K=32, N=32):
    g = torch.Generator().manual_seed(3)
    b = ArenaBuilder(torch.float32)
    b.add("x", torch.randn(T, K, generator=g), "f32"), b.add("w", torch.randn(N, K, generator=g), "w")
    b.reserve("y", (T, N), "f32")
    first = linear_record(0, b, T=T, N=N, K=K)
    second = linear_record(1, b, T=T, N=N, K=K)
    first.signals, second.waits, second.signals = [0], [(0, 1, 1)], [1]
    return b.build(), first, second


def test_epoch_targets_need_no_reset():
    arenas, first, second = _chain()
    counters = run_tasks([[first], [second]], arenas, CONST)
    for epoch in (2, 3):
        counters = run_tasks([[first], [second]], arenas, CONST, counters=counters, epoch=epoch)
    assert counter_values(counters)[:2].tolist() == [3, 3]


def test_wait_on_a_later_program_raises_deadlock_naming_task_and_counter():
    # interpreter order: program 0 runs first, so its wait on program 1 can never be met
    arenas, first, second = _chain()
    with pytest.raises(DeadlockError, match=r"task 1 \(linear\) waited on counter 0.*value 0, target 1"):
        run_tasks([[second], [first]], arenas, CONST)


def test_stale_epoch_raises_instead_of_hanging():
    arenas, first, second = _chain()
    counters = run_tasks([[first], [second]], arenas, CONST)
    # step 2 without the producer: counter 0 stays at 1 < target 2
    with pytest.raises(DeadlockError, match="counter 0.*value 1, target 2"):
        run_tasks([[second]], arenas, CONST, counters=counters, epoch=2)


def test_bad_wait_target_is_a_schedule_error():
    with pytest.raises(ScheduleError, match="target 3"):
        L.encode_record(L.TaskRecord("linear", 5, waits=[(0, 3, 2)]))
