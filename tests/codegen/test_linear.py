"""The linear body against torch: RMSNorm prologue, split-K, residual epilogue, dynamic rows."""
import pytest
import torch

from tilecomp.codegen.harness import run_tasks
from tilecomp.codegen.layout import TaskRecord, float_bits, norm_arena
from tilecomp.runtime.buffers import ArenaBuilder

CONST = dict(BLOCK_T=16, BLOCK_N=32, BLOCK_K=32)


def linear_record(task, b, n0, k0, k1, *, T, N, K, norm, res, y="y", y_stride=None, rows=-1):
    return TaskRecord("linear", task, dict(
        x=b.offset("x"), x_stride=K, w=b.offset("w"), w_up=-1, k_dim=K, n_dim=N, n0=n0, k0=k0, k1=k1,
        norm=b.offset("g") if norm else -1, eps_bits=float_bits(1e-5), bias=-1,
        res=b.offset("res") if res else -1, res_stride=N, y=b.offset(y),
        y_stride=y_stride or N, n_rows=T, rows=rows), signals=[0])


@pytest.mark.parametrize("norm,res,stages,norm_f32,noinline,uploop", [
    (False, False, 3, 1, 0, 0), (True, True, 3, 1, 0, 0), (True, True, 1, 1, 0, 0), (True, True, 3, 0, 0, 0),
    (True, False, 1, 0, 1, 0), (True, True, 3, 1, 0, 1), (False, True, 3, 0, 0, 2), (True, True, 3, 0, 0, 2)])
def test_linear_matches_torch(norm, res, stages, norm_f32, noinline, uploop):
    """stages 3: the tl.range-pipelined K loop; 1: the manual one-tile prefetch before the wait
    (its tiles reach the compute function as arguments). norm_f32: the gain in arena_f32 (1) or
    arena_w (0), as layout.norm_arena places it (the other arena holds other data at that offset,
    so a kernel reading the wrong one fails). noinline: the compute body as a device function.
    uploop 1: tasks without a SwiGLU up matrix run the pipelined loop that has no up tile; 2: and
    the ones without a norm too the loop without the norm gains (a task with a norm keeps them)."""
    g = torch.Generator().manual_seed(1)
    T, K, N = 5, 80, 72  # neither a multiple of the tiles
    x, w, gain, resid = (torch.randn(s, generator=g) for s in [(T, K), (N, K), (K,), (T, N)])
    const = dict(CONST, STAGES=stages, NORM_F32=norm_f32, NOINLINE=noinline, UPLOOP=uploop)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", w, "w"), b.add("g", gain, norm_arena(const)), b.add("res", resid, "f32")
    b.reserve("y", (T, N), "f32")
    arenas = b.build()
    recs = [linear_record(i, b, n0, 0, K, T=T, N=N, K=K, norm=norm, res=res)
            for i, n0 in enumerate(range(0, N, 32))]
    counters = run_tasks([recs], arenas, const)
    xin = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain if norm else x
    want = xin @ w.T + (resid if res else 0)
    torch.testing.assert_close(arenas.view("y"), want, rtol=1e-5, atol=1e-4)
    assert counters[0].item() == len(recs)


def test_linear_split_k_partials_and_dynamic_rows():
    g = torch.Generator().manual_seed(2)
    T, K, N = 6, 96, 32
    x, w = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", w, "w"), b.add("g", torch.ones(K), norm_arena(CONST))
    b.add("res", torch.zeros(T, N), "f32"), b.add("rows", torch.tensor([4], dtype=torch.int32), "i32")
    b.add("part", torch.full((2, T, N), 7.0), "f32")
    arenas = b.build()
    recs = [linear_record(s, b, 0, s * 64, min(K, s * 64 + 64), T=T, N=N, K=K, norm=False,
                          res=False, y="part", rows=b.offset("rows")) for s in range(2)]
    recs[1].args["y"] += T * N
    run_tasks([recs], arenas, CONST)
    part = arenas.view("part")
    torch.testing.assert_close(part.sum(0)[:4], x[:4] @ w.T, rtol=1e-5, atol=1e-4)
    assert (part[:, 4:] == 7.0).all(), "rows past the dynamic count must stay untouched"


def test_embed_gathers_rows_and_mask_embedding():
    g = torch.Generator().manual_seed(4)
    V, D, T = 11, 40, 5
    table, mask_row = torch.randn(V, D, generator=g), torch.randn(D, generator=g)
    ids = torch.tensor([3, 10, 99, 0, 99], dtype=torch.int32)  # 99 = MASK
    b = ArenaBuilder(torch.float32)
    b.add("table", table, "w"), b.add("mask", mask_row, "w"), b.add("ids", ids, "i32")
    b.reserve("out", (T, D), "f32")
    arenas = b.build()
    rec = TaskRecord("embed", 0, dict(ids=b.offset("ids"), table=b.offset("table"),
                                      mask_row=b.offset("mask"), mask_id=99, out=b.offset("out"),
                                      n_rows=T, dim=D, row0=0))
    run_tasks([[rec]], arenas, dict(BLOCK_T=8, BLOCK_D=32))
    want = torch.stack([table[3], table[10], mask_row, table[0], mask_row])
    torch.testing.assert_close(arenas.view("out"), want)


@pytest.mark.parametrize("cols", [24, 40, 16])
def test_embed_column_tasks(cols):
    """LowerOptions.embed_cols: the rows' columns as tasks of d0 .. d1 (24: a tile of BLOCK_D 16
    cut mid-way); each writes its columns only (one task alone leaves the others as they were)."""
    g = torch.Generator().manual_seed(6)
    V, D, T = 11, 56, 5
    table, mask_row = torch.randn(V, D, generator=g), torch.randn(D, generator=g)
    ids = torch.tensor([3, 99, 7, 0, 99], dtype=torch.int32)
    want = torch.stack([table[3], mask_row, table[7], table[0], mask_row])
    spans = [(d0, min(D, d0 + cols)) for d0 in range(0, D, cols)]
    for only in (None, 1):
        b = ArenaBuilder(torch.float32)
        b.add("table", table, "w"), b.add("mask", mask_row, "w"), b.add("ids", ids, "i32")
        b.add("out", torch.full((T, D), float("nan")), "f32")
        arenas = b.build()
        recs = [TaskRecord("embed", i, dict(ids=b.offset("ids"), table=b.offset("table"),
                                            mask_row=b.offset("mask"), mask_id=99, out=b.offset("out"),
                                            n_rows=T, dim=D, row0=0, d0=d0, d1=d1))
                for i, (d0, d1) in enumerate(spans) if only is None or i == only]
        run_tasks([recs], arenas, dict(BLOCK_T=8, BLOCK_D=16))
        out = arenas.view("out")
        if only is None:
            torch.testing.assert_close(out, want)
        else:
            d0, d1 = spans[only]
            torch.testing.assert_close(out[:, d0:d1], want[:, d0:d1])
            assert out[:, :d0].isnan().all() and out[:, d1:].isnan().all()


@pytest.mark.parametrize("stages,uploop", [(3, 0), (1, 0), (3, 1), (3, 2)])
def test_linear_swiglu_epilogue(stages, uploop):
    g = torch.Generator().manual_seed(8)
    T, K, N = 4, 64, 48
    x, wg, wu = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", wg, "w"), b.add("wu", wu, "w"), b.add("g", torch.ones(K), norm_arena(CONST))
    b.add("res", torch.zeros(T, N), "f32"), b.reserve("y", (T, N), "f32")
    arenas = b.build()
    recs = [linear_record(i, b, n0, 0, K, T=T, N=N, K=K, norm=True, res=False) for i, n0 in enumerate((0, 32))]
    for r in recs:
        r.args["w_up"] = b.offset("wu")
    run_tasks([recs], arenas, dict(CONST, STAGES=stages, UPLOOP=uploop))
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = torch.nn.functional.silu(xn @ wg.T) * (xn @ wu.T)
    torch.testing.assert_close(arenas.view("y"), want, rtol=1e-5, atol=1e-4)


def test_linear_tile_stops_at_n1():
    g = torch.Generator().manual_seed(9)
    T, K, N = 3, 32, 40
    x, w = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", w, "w"), b.add("g", torch.ones(K), norm_arena(CONST))
    b.add("res", torch.zeros(T, N), "f32"), b.add("y", torch.full((T, N), 5.0), "f32")
    arenas = b.build()
    rec = linear_record(0, b, 8, 0, K, T=T, N=N, K=K, norm=False, res=False)
    rec.args["n1"] = 20                     # a 12-column tile; BLOCK_N is 32
    run_tasks([[rec]], arenas, CONST)
    y = arenas.view("y")
    torch.testing.assert_close(y[:, 8:20], x @ w[8:20].T, rtol=1e-5, atol=1e-4)
    assert (y[:, :8] == 5.0).all() and (y[:, 20:] == 5.0).all()


@pytest.mark.parametrize("stages", [3, 1])
def test_linear_task_wider_than_block_n_runs_sub_tiles(stages):
    """A task of 70 columns with BLOCK_N = 32: three sub-tiles, the last one partial; SwiGLU,
    norm and residual on every sub-tile; nothing outside [n0, n1) is written."""
    g = torch.Generator().manual_seed(11)
    T, K, N = 3, 64, 80
    x, w, wu, res = (torch.randn(s, generator=g) for s in [(T, K), (N, K), (N, K), (T, N)])
    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"), b.add("w", w, "w"), b.add("wu", wu, "w"), b.add("g", torch.ones(K), norm_arena(CONST))
    b.add("res", res, "f32"), b.add("y", torch.full((T, N), 5.0), "f32")
    arenas = b.build()
    rec = linear_record(0, b, 4, 0, K, T=T, N=N, K=K, norm=True, res=False)
    rec.args.update(n1=74, w_up=b.offset("wu"))
    run_tasks([[rec]], arenas, dict(CONST, STAGES=stages))
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = torch.nn.functional.silu(xn @ w[4:74].T) * (xn @ wu[4:74].T)
    y = arenas.view("y")
    torch.testing.assert_close(y[:, 4:74], want, rtol=1e-5, atol=1e-4)
    assert (y[:, :4] == 5.0).all() and (y[:, 74:] == 5.0).all()
