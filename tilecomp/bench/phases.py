"""Each task kind of a megakernel step on its own: how fast is a phase when nothing waits?

`tilecomp bench --phases` runs the step once (so routing plans, activations and
KV rows are real), then for every task kind K launches the SAME kernel on a
queue holding only K's records, each on the program the schedule gave it, with
its waits and signals removed. The time of that launch is what the phase costs
by itself: its loads, math and per-task overhead, with none of the dependency
waits of the full step. Comparing the sum of the phases with the step tells
whether a step is slow because its phases are slow (bandwidth, per-step latency
inside a task) or because of the chain between them (waits, tails).

Bytes are counted for the weight-streaming kinds (what each record's weights
cover: linear and lm_head rows x K, qkv_rope_kv's q/k/v rows, the routed experts' MXFP4 bytes, router
rows), so those phases also report GB/s. Kinds whose bytes are not modelled
report time only.
"""
from __future__ import annotations

import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.harness import Megakernel, new_counters, new_errors

from .floor import MXFP4_BYTES_PER_ELEM
from .timing import time_steps
from .trace import KIND_NAMES


def _arg(row: list[int], kind: str, name: str) -> int:
    return row[L.kind_abi(kind).arg_word(name)]


def _span(row, kind, lo, hi, tile, limit) -> int:
    """Columns [lo, hi) of a record (hi <= lo: one tile of `tile` from lo), capped at `limit`."""
    n0, n1 = _arg(row, kind, lo), _arg(row, kind, hi)
    end = min(n1, limit) if n1 > n0 else min(n0 + tile, limit)
    return max(end - n0, 0)


def task_bytes(kind: str, row: list[int], consts: dict, wbytes: int, plan_count) -> int | None:
    """Weight bytes one task streams (None: not modelled). plan_count(offset) -> routed experts
    of the plan at that arena_i32 offset (expert tasks whose slot is past it do nothing)."""
    a = lambda name: _arg(row, kind, name)          # noqa: E731
    if kind == "lm_head":
        return _span(row, kind, "n0", "n1", consts["BLOCK_NH"], a("vocab")) * a("dim") * wbytes
    if kind == "linear":
        n = _span(row, kind, "n0", "n1", consts["BLOCK_N"], a("n_dim"))
        k1 = a("k1") if a("k1") > a("k0") else a("k_dim")
        return n * (k1 - a("k0")) * wbytes * (2 if a("w_up") >= 0 else 1)
    if kind in ("expert_up_gate", "expert_down"):
        cols, k, mats = (a("inter"), a("dim"), 2) if kind == "expert_up_gate" else (a("dim"), a("inter"), 1)
        if a("parts") > 0:      # its share of the routed (slot, BLOCK_NX tile) units
            bn = consts["BLOCK_NX"]
            tps = -(-cols // bn)
            units = plan_count(a("plan")) * tps
            q0, q1 = a("part") * units // a("parts"), (a("part") + 1) * units // a("parts")
            n = sum(min(bn, cols - (q % tps) * bn) for q in range(q0, q1))
        elif a("slot") >= plan_count(a("plan")):
            return 0
        else:
            n = _span(row, kind, "n0", "n1", consts["BLOCK_NX"], cols)
        return int(mats * n * k * MXFP4_BYTES_PER_ELEM)
    if kind == "qkv_rope_kv":
        rep = a("n_heads_q") // a("n_kv_heads")
        n_q = (a("q_heads") if a("q_heads") > 0 else rep - a("q_head0")) if a("wq") >= 0 else 0
        part = {1: a("rope_dim"), 2: a("head_dim") - a("rope_dim")}.get(a("rope_part"), a("head_dim"))
        if a("row1") > a("row0"):       # a qkv_rows chunk: those rows of its one q / k / v head
            part = a("row1") - a("row0")
            rows = (n_q + (a("wk") >= 0) + (a("wv") >= 0)) * part
        else:
            rows = (n_q + (a("wk") >= 0)) * part + (a("v_head_dim") if a("wv") >= 0 else 0)
        return rows * a("dim") * wbytes
    if kind == "moe_route" and a("split") != 0:
        return _span(row, kind, "e0", "e1", consts["BLOCK_RN"], a("n_experts")) * a("dim") * 4
    return None


def byte_imbalance(bounds: list[int], sizes: dict[int, int]) -> float:
    """The busiest program's bytes over the mean of all programs, for the tasks in `sizes`
    (record index -> bytes; program p holds records bounds[p] .. bounds[p + 1] - 1). 1: the
    phase's bytes are spread evenly; an expert phase whose empty slots idle 56 of 132 programs
    reads ~1.7."""
    per_program = [sum(sizes.get(i, 0) for i in range(bounds[p], bounds[p + 1])) for p in range(len(bounds) - 1)]
    total = sum(per_program)
    return max(per_program) * len(per_program) / total if total else 1.0


def replay_phases(step, arenas, iters: int = 20, kinds=None, alone: bool = False, graph: bool = False) -> dict:
    """step: a StepProgram that has run at least once on `arenas`. Before every launch
    (untimed) the fp32 and int32 arenas are restored to what the step left, so each phase
    sees the step's own inputs (a replayed `accept` would move the position on, an in-place
    residual would add up, a router would re-plan on those sums). Per-kind
    {tasks, ms (median launch), bytes, gbps, byte_imbalance (the busiest program's weight bytes over
    the mean)} plus the empty launch's time (`launch_ms`).
    kinds: the kind names to replay (default: all in the step). alone: also time each kind
    in a kernel of its own (same tile sizes and warps): the difference to the step kernel is
    what the other kinds' code costs it (registers, spills, shared memory of the union).
    graph (GPU): time each phase as the replay of a CUDA graph of its launch, so the times hold
    no host launch work (Triton's argument binding, tens of us, which a plain launch's time
    includes: compare `launch_ms` with and without).
    The arenas are left as the last replayed launch made them."""
    records = step.records
    rows = records.cpu().tolist()
    bounds = step.queue.cpu().tolist()
    programs = len(bounds) - 1
    device = records.device
    plans = arenas.data["i32"]
    wbytes = arenas.data["w"].element_size() if "w" in arenas.data else 2
    counts = {}
    saved = {a: arenas.data[a].clone() for a in ("f32", "i32")}

    def reset():
        for a, t in saved.items():
            arenas.data[a].copy_(t)

    def plan_count(offset: int) -> int:
        if offset not in counts:
            counts[offset] = int(plans[offset].item())
        return counts[offset]

    def run(sel_rows: list[int], per_program: list[int], kernel=None, label="empty"):
        kernel = kernel or step.kernel
        if sel_rows:
            recs = records[torch.tensor(sel_rows, device=device)].clone()
            recs[:, L.F_NWAIT] = 0
            recs[:, L.F_NSIGNAL] = 0
        else:
            recs = records[:1].clone()
        queue = torch.tensor([0] + per_program, dtype=torch.int32, device=device).cumsum(0).to(torch.int32)
        counters, errors = new_counters(1, device), new_errors(programs, device)

        def direct():
            kernel.launch(recs, queue, counters, errors, 1, arenas)

        run_once = direct

        def launch():
            if torch.cuda.is_available():       # ncu --nvtx --nvtx-include "phase_<label>/"
                torch.cuda.nvtx.range_push(f"phase_{label}")
            run_once()
            if torch.cuda.is_available():
                torch.cuda.nvtx.range_pop()
        reset()
        launch()                                # builds the kernel (a graph capture cannot)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if errors[:, 0].any():
            raise RuntimeError("phase replay: a task reported a timed-out wait with no waits left")
        if graph and torch.cuda.is_available():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                direct()
            run_once = g.replay
        return time_steps(launch, iters, warmup=0, before=reset)["median_ms"]

    out = {"launch_ms": run([], [0] * programs), "graph": bool(graph and torch.cuda.is_available()),
           "kinds": {}}
    by_kind: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_kind.setdefault(row[L.F_KIND], []).append(i)
    for kind_id, idx in sorted(by_kind.items()):
        name = KIND_NAMES.get(kind_id, str(kind_id))
        if kinds is not None and name not in kinds:
            continue
        chosen = set(idx)
        sel, per_program = [], []
        for p in range(programs):
            mine = [i for i in range(bounds[p], bounds[p + 1]) if i in chosen]
            sel += mine
            per_program.append(len(mine))
        ms = run(sel, per_program, label=name)
        alone_ms = None
        if alone:
            own = Megakernel.build([name], step.kernel.constexprs, name=f"phase_{name}",
                                   spin_limit=step.kernel.spin_limit, num_warps=step.kernel.num_warps)
            alone_ms = run(sel, per_program, kernel=own, label=f"{name}_alone")
        sizes = {i: task_bytes(name, rows[i], step.kernel.constexprs, wbytes, plan_count) for i in idx}
        nbytes = None if any(s is None for s in sizes.values()) else sum(sizes.values())
        out["kinds"][name] = {"tasks": len(idx), "ms": ms, "alone_ms": alone_ms, "bytes": nbytes,
                              "gbps": nbytes / ms / 1e6 if nbytes else None,
                              "max_tasks_per_program": max(per_program),
                              "byte_imbalance": byte_imbalance(bounds, sizes) if nbytes else None}
    out["sum_ms"] = sum(k["ms"] for k in out["kinds"].values())
    return out


def format_phases(p: dict) -> str:
    how = "CUDA-graph replays" if p.get("graph") else "launches, host launch work included"
    lines = [f"phases alone (waits removed; {how}; empty launch {p['launch_ms'] * 1e3:.1f} us; 'own us': the "
             "kind in a kernel of its own):",
             f"{'kind':<22}{'tasks':>7}{'max/prog':>9}{'us':>10}{'own us':>10}{'MB':>9}{'GB/s':>8}{'max/mean B':>11}"]
    for name, k in sorted(p["kinds"].items(), key=lambda kv: -kv[1]["ms"]):
        mb = f"{k['bytes'] / 1e6:9.1f}" if k["bytes"] is not None else f"{'-':>9}"
        gb = f"{k['gbps']:8.0f}" if k["gbps"] else f"{'-':>8}"
        own = f"{k['alone_ms'] * 1e3:10.1f}" if k.get("alone_ms") is not None else f"{'-':>10}"
        imb = f"{k['byte_imbalance']:11.2f}" if k.get("byte_imbalance") else f"{'-':>11}"
        lines.append(f"{name:<22}{k['tasks']:>7}{k['max_tasks_per_program']:>9}{k['ms'] * 1e3:>10.1f}{own}{mb}{gb}{imb}")
    lines.append(f"sum of phases {p['sum_ms']:.3f} ms")
    return "\n".join(lines)
