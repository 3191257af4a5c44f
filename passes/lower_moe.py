"""Lowering of the mixture of experts with unique-expert dispatch.

moe_route (one task per layer) writes the plan: the distinct experts the
block's tokens chose (count, then up to S = min(E, T * k) expert ids) and the
per-slot token weights [S, T]. expert_up_gate / expert_down read each
routed expert's MXFP4 weights once for all the block's tokens that chose it.
Two forms (LowerOptions.expert_parts): one task per (slot, N tile), where a
slot past the plan's count exits early but still signals; or (the default when
the phases are balanced over the programs) `parts` tasks per kind that split
the (slot, tile) units of the plan's count evenly at run time. moe_combine sums the slots in fixed order (+ residual).

Shape legend: T rows, D hidden, E experts, k experts per token, I expert
intermediate, S plan slots.
"""
from __future__ import annotations

import dataclasses

from tilecomp.errors import IRError
from tilecomp.ir.graph import Op, OpKind

from .lower import Lowering, _cdiv, balance, expected_unique


def expert_parts(lw: Lowering, rows: int) -> int:
    """Tasks per expert kind in the parts form (0: the per-slot form). Auto (-1): split at run
    time when the plan can have empty slots (rows > 1; at one row the count is always k = S,
    and the per-slot form lets a slot's down tiles start when its own up_gate tiles end: H200,
    flash 8L block 1 6.00 ms against 6.10 ms with parts; block 8 17.07 ms against 15.92 ms with
    parts)."""
    parts = lw.options.expert_parts
    return ((lw.programs or 0) if rows > 1 else 0) if parts < 0 else parts


def expert_sync(plan: str) -> str:
    """The expert queue's int32 buffer of a layer's plan (LowerOptions.expert_queue): [0] the
    up_gate units taken, [1] the expert_down units taken, [2 + s] slot s's up_gate units done.
    moe_route's plan task zeroes it each step; only the expert parts' atomics touch it after."""
    return f"{plan}.sync"


def lower_rmsnorm(lw: Lowering, op: Op):
    """A standalone RMSNorm is only lowered as the prologue of the moe_route that reads it."""
    users = lw.consumers.get(op.out.name, [])
    if not users or any(u.kind not in (OpKind.MOE_ROUTE, OpKind.MOE_EXPERTS) or u.args[0] != op.out.name
                        for u in users):
        raise IRError(f"lowering: rmsnorm {op.out.name} must feed only moe_route / moe_experts "
                      f"(other norms are fused into matmul prologues by the graph passes)")
    lw.folded_norm[op.out.name] = op


def lower_route(lw: Lowering, op: Op):
    x, gate, bias = op.args
    a = op.attrs
    xn = None
    if x in lw.folded_norm:
        rms = lw.folded_norm[x]
        x_src, norm, eps, xn = rms.args[0], lw.weight(rms.args[1]), rms.attrs.get("eps"), x
    else:
        x_src, norm, eps = x, op.kwarg("norm") and lw.weight(op.kwarg("norm")), a.get("eps")
        xn = op.outputs[3].name if len(op.outputs) > 3 else None
    T = lw.shape(x_src)[0]
    E = lw.types[gate].shape[0]
    S = op.outputs[2].type.shape[0]
    plan = lw.value_buffer(op.outputs[2].name, "scratch", shape=(1 + S,))
    slot_w = lw.add_buffer(f"{plan}.slot_weights", "fp32", (S, T), "scratch")
    common = dict(op=plan, norm=norm, eps=eps, bias=lw.weight(bias), plan=plan, weights=slot_w, n_experts=E,
                  top_k=a["k"], n_slots=S, scale=float(a.get("scale", 1.0)),
                  norm_topk=bool(a.get("renorm", True)), dim=lw.shape(x_src)[1], n_rows=T)
    sync_region = []
    if lw.options.expert_queue and expert_parts(lw, T) > 0:
        # the expert queue's counts, zeroed by whichever task writes the plan
        sync = lw.add_buffer(expert_sync(plan), "int32", (2 + S,), "scratch")
        common.update(sync=sync, n_sync=2 + S)
        sync_region = [lw.region(sync)]
    eb = lw.options.router_block
    if eb < 0:      # the router is on every MoE layer's critical path: spread it
        eb = balance(E, lw.programs, lw.shape(x_src)[1] * 4, quantum=1)[0] if lw.programs else 32
    if lw.options.expert_operands:
        if xn is None:
            raise IRError(f"lowering: expert_operands=1 stores the experts' input as an operand buffer, "
                          f"but moe_route {op.out.name} writes no normed rows for them (xn)")
        _operand_buffer(lw, xn)
    xn_region = [lw.region(lw.value_buffer(xn))] if xn is not None else []
    final_reads = [lw.region(x_src), lw.region(lw.weight(gate)), lw.region(lw.weight(bias))]
    final_reads += [lw.region(norm)] if norm else []
    final_attrs = dict(common, x=lw.buf[x_src], gate=lw.weight(gate), xn=xn and lw.buf[xn])
    if eb and E > eb:
        # split router: logits of experts [e0, e1) per task (task 0 also writes the normed rows)
        logits = lw.add_buffer(f"{plan}.logits", "fp32", (T, E), "scratch")
        D = lw.shape(x_src)[1]

        def col(e):     # xn_split: the xn columns of experts below e (16-byte multiples)
            return D if e >= E else e * D // E // 8 * 8
        for j, e0 in enumerate(range(0, E, eb)):
            e1 = min(E, e0 + eb)
            reads = [lw.region(x_src), lw.region(lw.weight(gate), (e0, e1))] + ([lw.region(norm)] if norm else [])
            if xn is not None and lw.options.xn_split:
                c0, c1 = col(e0), col(e1)
                xn_part = dict(xn=lw.buf[xn], xn0=c0, xn1=c1) if c1 > c0 else {}
                xn_writes = [lw.region(lw.value_buffer(xn), None, (c0, c1))] if c1 > c0 else []
            else:
                xn_part = dict(xn=lw.buf[xn]) if xn and j == 0 else {}
                xn_writes = xn_region if j == 0 else []
            writes = [lw.region(logits, None, (e0, e1))] + xn_writes
            attrs = dict(common, x=lw.buf[x_src], gate=lw.weight(gate), xn=None, logits=logits, split=1,
                         e0=e0, e1=e1)
            attrs.update(xn_part)
            lw.task("moe_route", {"layer": 0, "split": j}, reads, writes, f"c.{logits}", attrs)
        for r in [lw.region(logits)] + xn_region:
            lw.produce(r, f"c.{logits}")
        final_reads = [lw.region(logits), lw.region(lw.weight(bias))]
        final_attrs = dict(common, x=logits, gate=None, norm=None, xn=None, split=0)
        xn_region = []
    writes = [lw.region(plan), lw.region(slot_w)] + xn_region + sync_region
    signal = f"c.{plan}"
    lw.task("moe_route", {"layer": 0}, final_reads, writes, signal, final_attrs)
    for r in writes:
        lw.produce(r, signal)


def _operand_buffer(lw: Lowering, value: str):
    """Make graph value `value`'s buffer an "operand" (stored in the weights' dtype): only
    moe_experts may read it (as its x), the kernels of every other kind read fp32 activations."""
    def allowed(u: Op) -> bool:     # the router (reads x before the norm) or an expert input
        return u.kind is OpKind.MOE_ROUTE or (u.kind is OpKind.MOE_EXPERTS and u.args[0] == value)
    others = [u for u in lw.consumers.get(value, []) if not allowed(u)]
    if others:
        raise IRError(f"lowering: expert_operands=1: {value} is read by {others[0].kind.value} "
                      f"{others[0].out.name}, not only by the experts")
    name = lw.value_buffer(value, "operand")
    if lw.tp.buffers[name].kind != "operand":
        lw.tp.buffers[name] = dataclasses.replace(lw.tp.buffers[name], kind="operand")


def lower_experts(lw: Lowering, op: Op):
    x, _ids, _weights, wg, wu, wd = op.args
    plan_v = op.kwarg("plan")
    if plan_v is None:
        raise IRError(f"lowering: moe_experts {op.out.name} needs plan= (the unique-expert plan of moe_route)")
    plan = lw.buf[plan_v]
    slot_w = f"{plan}.slot_weights"
    E, I, D = lw.types[wg].shape
    T = lw.shape(x)[0]
    S = lw.tp.buffers[plan].shape[0] - 1
    out = lw.value_buffer(op.out.name)
    operands = lw.tp.buffers[lw.buf[x]].kind == "operand"
    if lw.options.expert_operands and not operands:
        raise IRError(f"lowering: expert_operands=1, but the input {x} of moe_experts {op.out.name} "
                      f"is not moe_route's operand buffer")
    act = (lw.add_buffer(f"{out}.act", lw.tp.buffers[lw.buf[x]].dtype, (S, T, I), "operand") if operands
           else lw.add_buffer(f"{out}.act", "fp32", (S, T, I), "scratch"))
    eout = lw.add_buffer(f"{out}.slot_out", "fp32", (S, T, D), "scratch")
    (gb, gs), (ub, us), (db, ds) = lw.mxfp4(wg), lw.mxfp4(wu), lw.mxfp4(wd)
    res = op.kwarg("residual")
    bn_up, bn_down, bn = lw.options.expert_block_n, lw.options.expert_down_block_n, lw.options.block_n
    routed = min(S, expected_unique(E, max(1, S // T), T)) if S < E else S   # uniform routing
    parts = expert_parts(lw, T)
    common = dict(op=out, plan=plan, n_slots=S, inter=I, dim=D, n_rows=T)
    mats = (gb, gs, ub, us, db, ds)
    if parts > 0:
        _lower_expert_parts(lw, parts, common, x, plan, slot_w, act, eout, mats, routed)
    else:
        if lw.programs:     # expert tiles balanced over the programs for the experts a step routes to
            bn_up = balance(I, lw.programs, 2 * (D // 2 + D // 32), units=routed)[0]
            bn_down = balance(D, lw.programs, I // 2 + I // 32, units=routed)[0]
        _lower_expert_slots(lw, bn_up, bn_down, common, x, plan, slot_w, act, eout, mats)
    for n in range(_cdiv(D, bn)):
        n0, n1 = n * bn, min(D, (n + 1) * bn)
        reads = [lw.region(eout, None, None, (n0, n1)), lw.region(plan), lw.region(slot_w)]
        reads += [lw.region(res, None, (n0, n1))] if res else []
        lw.task("moe_combine", {"n": n}, reads, [lw.region(out, None, (n0, n1))], f"c.{out}",
                dict(common, part=eout, res=res and lw.buf[res], y=out, n0=n0, n1=n1, weights=slot_w,
                     top_k=lw.shape(_ids)[1]))
    lw.produce(lw.region(out), f"c.{out}")


def _lower_expert_slots(lw: Lowering, bn_up: int, bn_down: int, common: dict, x: str, plan: str, slot_w: str,
                        act: str, eout: str, mats: tuple):
    """One task per (slot, N tile): a slot's tiles wait for its own up_gate tiles only, but a
    step routed to fewer experts than the plan has slots leaves the tasks of the empty slots
    (and the programs that hold them) idle."""
    gb, gs, ub, us, db, ds = mats
    S, I, D = common["n_slots"], common["inter"], common["dim"]
    expert = (0, 1, "expert")
    for s in range(S):
        for n in range(_cdiv(I, bn_up)):
            n0, n1 = n * bn_up, min(I, (n + 1) * bn_up)
            reads = [lw.region(plan), lw.region(x), lw.region(slot_w, (s, s + 1))]
            reads += [lw.region(w, expert, (n0, n1)) for w in (gb, gs, ub, us)]
            lw.task("expert_up_gate", {"slot": s, "n": n}, reads, [lw.region(act, (s, s + 1), None, (n0, n1))],
                    f"c.{act}.s{s}", dict(common, x=lw.buf[x], gate_blocks=gb, gate_scales=gs,
                                          up_blocks=ub, up_scales=us, act=act, weights=slot_w, slot=s,
                                          n0=n0, n1=n1))
        lw.produce(lw.region(act, (s, s + 1)), f"c.{act}.s{s}")
    for s in range(S):
        for n in range(_cdiv(D, bn_down)):
            n0, n1 = n * bn_down, min(D, (n + 1) * bn_down)
            reads = [lw.region(act, (s, s + 1)), lw.region(plan), lw.region(slot_w, (s, s + 1))]
            reads += [lw.region(w, expert, (n0, n1)) for w in (db, ds)]
            lw.task("expert_down", {"slot": s, "n": n}, reads, [lw.region(eout, (s, s + 1), None, (n0, n1))],
                    f"c.{eout}", dict(common, act=act, weights=slot_w, blocks=db, scales=ds, out=eout,
                                      slot=s, n0=n0, n1=n1))
    lw.produce(lw.region(eout), f"c.{eout}")


def _lower_expert_parts(lw: Lowering, parts: int, common: dict, x: str, plan: str, slot_w: str, act: str,
                        eout: str, mats: tuple, routed: float):
    """`parts` tasks per expert kind; part j takes units [j*U/parts, (j+1)*U/parts) of the
    U = count x tiles routed (slot, BLOCK_N tile) units, count read from the plan at run time.
    Every part streams the same bytes whatever the routing (the per-slot form idles the
    programs of empty slots). The price: expert_down waits for ALL of up_gate (one counter),
    not for its own slot's. Regions are runtime-indexed (slot / rows of a part); their row
    extents are the expected share at `routed` distinct experts, for the scheduler's costs."""
    gb, gs, ub, us, db, ds = mats
    S, I, D = common["n_slots"], common["inter"], common["dim"]
    expert = (0, 1, "expert")
    slots = (0, 1, "slot")
    up_rows = max(1, min(I, _cdiv(int(routed * I), parts)))
    down_rows = max(1, min(D, _cdiv(int(routed * D), parts)))
    up_signal, down_signal = f"c.{act}", f"c.{eout}"
    sync = expert_sync(plan)
    queue = sync in lw.tp.buffers      # LowerOptions.expert_queue: moe_route made the queue's counts
    sync_attrs = dict(sync=sync) if queue else {}
    sync_regions = [lw.region(sync)] if queue else []
    for j in range(parts):
        reads = [lw.region(plan), lw.region(x), lw.region(slot_w, slots)] + sync_regions
        reads += [lw.region(w, expert, (0, up_rows, "part")) for w in (gb, gs, ub, us)]
        lw.task("expert_up_gate", {"part": j}, reads,
                [lw.region(act, slots, None, (0, up_rows, "part"))] + sync_regions,
                up_signal, dict(common, x=lw.buf[x], gate_blocks=gb, gate_scales=gs, up_blocks=ub,
                                up_scales=us, act=act, weights=slot_w, slot=0, part=j, parts=parts,
                                **sync_attrs))
    lw.produce(lw.region(act), up_signal)
    for j in range(parts):
        reads = [lw.region(act, slots, None, None), lw.region(plan), lw.region(slot_w, slots)] + sync_regions
        reads += [lw.region(w, expert, (0, down_rows, "part")) for w in (db, ds)]
        t = lw.task("expert_down", {"part": j}, reads,
                    [lw.region(eout, slots, None, (0, down_rows, "part"))] + sync_regions,
                    down_signal, dict(common, act=act, weights=slot_w, blocks=db, scales=ds, out=eout,
                                      slot=0, part=j, parts=parts, **sync_attrs))
        if queue:
            # the queue's protocol: a part waits for ONE up_gate part (every up_gate part ends
            # when the queue has handed out all its units, so each unit is taken and running),
            # then per unit for its slot's count in the sync buffer (the body's bounded wait).
            # The scheduler still orders the down parts after every up_gate part
            t.waits = [(c, 1) if c == up_signal else (c, n) for c, n in t.waits]
    lw.produce(lw.region(eout), down_signal)
