"""Lowering: fused graph IR -> tile IR (tasks with tile coords, regions, waits, signals).

Every graph value becomes a tile buffer (weights keep their checkpoint names;
an mxfp4 parameter `X` becomes `X_blocks` + `X_scales`; cache outputs and
`next_<x>` outputs alias the buffer of their input, so persistent state is
updated in place). Each op family has a lowering function (lower_linear.py,
lower_attn.py, lower_moe.py) that emits tasks through `Lowering.task`, which
derives a task's waits from its reads: it waits on every counter whose
producer wrote an overlapping region earlier in the step (an op registers its
written regions with `Lowering.produce` after creating its tasks, so tasks of
one op never wait on each other). A read of persistent state nobody wrote yet
in this step reads the previous step's value.

Tile sizes are the pass options (`LowerOptions`), with Hopper defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tilecomp.errors import IRError
from tilecomp.ir.graph import DType, Graph, Op, OpKind, TensorType, verify_graph
from tilecomp.ir.tile import (COUNTER_LINE_SLOTS, Buffer, Counter, Dim, Region, Task, TileProgram,
                              verify_tile)
from tilecomp.ir.tile_verify import regions_overlap

DTYPES = {DType.BF16: "bf16", DType.F16: "fp16", DType.F32: "fp32", DType.I32: "int32",
          DType.I64: "int64", DType.U8: "uint8"}


@dataclass(frozen=True)
class LowerOptions:
    block_n: int = 128            # output columns per linear / combine tile
    expert_block_n: int = 512     # expert intermediate columns per expert_up_gate tile (gate + up)
    expert_down_block_n: int = 1024  # hidden columns per expert_down tile
    expert_parts: int = -1        # > 0: each expert kind as this many tasks that split the
    #                               routed (slot, tile) units evenly AT RUN TIME (balanced for any
    #                               routing); 0: one task per (slot, tile); -1: the programs the
    #                               phases are balanced over when the block has > 1 row (0 at
    #                               one row, where every slot is used, and with fixed tile sizes)
    vocab_block: int = 1024       # vocabulary rows per lm_head tile (phases not balanced)
    vocab_quantum: int = 64       # balanced phases: lm_head tiles are a multiple of this many rows
    #                               (64 cuts a 152576-row head into 126 tasks on 132 programs, 16
    #                               into 131: every program but one streams a share of the head)
    kv_chunk: int = 256           # cache positions per attn_partial (flash-decoding chunk); 0: as
    #                               many (KV head, chunk) tasks as fill the programs, the keys in
    #                               view split over them at run time (the GPU default, GPU_LOWER)
    qkv_q_heads: int | None = None  # query heads per qkv_rope_kv task (None: the whole KV group)
    qkv_split_kv: int = 1         # with qkv_q_heads (and for the draft's context K/V): k and v of
    #                               a KV head as two tasks (1) or one (0)
    qkv_split_rope: int = 0       # with qkv_q_heads == 1: each q head's and k head's rotary rows
    #                               (the first rope_dim) and its other rows as two tasks
    qkv_rows: int = 0             # with qkv_q_heads == 1 and qkv_split_kv: the rotary rows of each
    #                               q / k head as one task, its other rows and each v head's rows in
    #                               tasks of at most this many rows (tasks of about one size)
    qkv_span: int = 0             # > 0: each q, k and v matrix of a KV group as tasks of at most
    #                               this many rows, its heads' rows end to end (a task may end in
    #                               one head and go on in the next), never cutting a head's rotary
    #                               rows: a flash layer's 192-row q heads as 128-row tasks, one
    #                               K-loop pass each (0: the head-by-head tasks above). Measured
    #                               inside the noise at 128 (session 24, H100, flash 8L block 8)
    router_block: int = -1       # experts per split-router moe_route task (0: one router task;
    #                              -1: balanced over the programs, 32 with fixed tile sizes)
    min_n_tiles: int = 32         # split K when a linear has fewer N tiles than this ...
    split_k_min: int = 1024       # ... and at least this many K columns per split
    max_split_k: int = 8
    programs: int | None = None   # balance each phase's tasks over this many programs (`balance`);
    #                               None: the compile's programs (off in interpreter order); 0: off
    ranks: int = 1                # every task runs on rank 0 until the partition pass exists
    fold_reduce: int = 0          # 1: the fold_reduce pass merges each attention's partials in
    #                               the last partial to arrive (no attn_reduce tasks)
    xn_split: int = 0             # 1: every split-router task writes its share of the experts'
    #                               normed rows (columns in proportion to its experts), instead
    #                               of the task holding expert 0 writing them all after its logits
    reduce_rows: int = 0          # > 0: each attention's merge (attn_reduce) as one task per
    #                               max(1, reduce_rows // block rows) query heads of a KV group, i.e.
    #                               about this many query rows (0: one task per KV group). 32, the
    #                               GPU default, is one attention row tile (BLOCK_TA) per task
    embed_cols: int = 0           # > 0: the embedding as one task per this many columns of the
    #                               rows (0: one task, its program's loop over the whole row)
    expert_operands: int = 0      # 1: the experts' inputs (moe_route's normed rows, up_gate's act)
    #                               are "operand" buffers, stored in the weights' dtype, so the
    #                               expert K loops load them as the dots' operand (kernel XACT)
    expert_queue: int = 0         # 1 (with expert parts): the parts take their (slot, tile) units
    #                               from a run-time queue (an atomic grab each) instead of fixed
    #                               ranges, and expert_down's parts start a slot when that slot's
    #                               up_gate units are done (a per-slot count in the body), not when
    #                               every up_gate part is: the phase boundary and the up_gate
    #                               units' quantization over the programs go (kernel XQUEUE).
    #                               A GPU default (GPU_LOWER): -0.348 ms at flash 8L block 8


# LowerOptions fields that are sizes (at least 1)
POSITIVE_OPTIONS = ("block_n", "expert_block_n", "expert_down_block_n", "vocab_block", "vocab_quantum",
                    "split_k_min", "max_split_k")


# A task's fixed cost (queue read, waits, signal) in weight bytes streamed by one program:
# about 3 us at the ~22 GB/s per program that 132 programs need to fill an H100's HBM.
TASK_OVERHEAD_BYTES = 64 * 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def balance(n: int, programs: int, row_bytes: float, *, units: float = 1, quantum: int = 64,
            k: int = 0, max_split: int = 1, split_k_min: int = 1024) -> tuple[int, int]:
    """(tile width, K splits) of one phase: `units` independent copies (e.g. routed experts) of
    an [n rows x k] weight, `row_bytes` per row, cut into width-row tiles (a multiple of
    `quantum`) and `splits` K ranges, run by `programs` programs. The cost model is the phase's
    time in streamed bytes per program: waves x (bytes per task + TASK_OVERHEAD_BYTES), plus two
    overheads for the reduce phase a split adds. Ties go to fewer tasks."""
    best = None
    for splits in range(1, max(1, max_split) + 1):
        if splits > 1 and k // splits < split_k_min:
            break
        for width in range(quantum, _cdiv(n, quantum) * quantum + 1, quantum):
            tasks = units * _cdiv(n, width) * splits
            waves = max(1, math.ceil(tasks / programs - 1e-9))
            cost = waves * (width * row_bytes / splits + TASK_OVERHEAD_BYTES)
            cost += 2 * TASK_OVERHEAD_BYTES if splits > 1 else 0
            key = (cost, tasks)
            if best is None or key < best[0]:
                best = (key, width, splits)
    return best[1], best[2]


def expected_unique(experts: int, top_k: int, rows: int) -> float:
    """Distinct experts `rows` tokens route to, for uniform top-k routing."""
    return experts * (1.0 - (1.0 - min(top_k, experts) / experts) ** rows)


@dataclass
class Lowering:
    graph: Graph
    options: LowerOptions
    tp: TileProgram = field(default_factory=TileProgram)
    types: dict[str, TensorType] = field(default_factory=dict)
    buf: dict[str, str] = field(default_factory=dict)          # graph value -> tile buffer
    scalar: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # derived scalar -> (expr, sources)
    producers: dict[str, list[tuple[Region, str]]] = field(default_factory=dict)
    consumers: dict[str, list[Op]] = field(default_factory=dict)
    defs: dict[str, Op] = field(default_factory=dict)           # value -> op that defines it
    done: set[int] = field(default_factory=set)                 # ids of ops already lowered
    redirect: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # value -> (buffer, r0, r1)
    pending_kv: dict[tuple, list] = field(default_factory=dict)  # kv_writes waiting for their partner
    folded_norm: dict[str, Op] = field(default_factory=dict)    # rmsnorm output -> op (in moe_route)
    _waits_memo: dict[Region, tuple[int, list[str]]] = field(default_factory=dict)
    _full: dict[str, Region] = field(default_factory=dict)

    # -- buffers --------------------------------------------------------------------------
    @property
    def programs(self) -> int:
        """Programs the phases are balanced over (0: the fixed tile sizes of the options)."""
        p = self.options.programs or 0
        return p if p > 1 else 0

    def add_buffer(self, name: str, dtype: str, shape, kind: str, param: str | None = None) -> str:
        if name not in self.tp.buffers:
            self.tp.buffers[name] = Buffer(name, dtype, tuple(shape), kind, param)
        return name

    def value_buffer(self, value: str, kind: str = "activation", shape=None, dtype=None) -> str:
        """The buffer holding graph value `value` (created on first use)."""
        if value in self.buf:
            return self.buf[value]
        t = self.types[value]
        name = self.add_buffer(value.lstrip("%@"), dtype or DTYPES[t.dtype],
                               shape if shape is not None else t.shape, kind)
        self.buf[value] = name
        return name

    def shape(self, value: str) -> tuple[int, ...]:
        return self.types[value].shape

    def region(self, value_or_buffer: str, *ranges) -> Region:
        """Region of a value's buffer; each range is (lo, hi), (lo, hi, index) or None (whole dim)."""
        name = self.buf.get(value_or_buffer, value_or_buffer)
        if not ranges:
            full = self._full.get(name)
            if full is None:
                full = self._full[name] = self.tp.buffers[name].full()
            return full
        shape = self.tp.buffers[name].shape
        dims = []
        for i, size in enumerate(shape):
            r = ranges[i] if i < len(ranges) else None
            dims.append(Dim(0, size) if r is None else Dim(*r))
        return Region(name, tuple(dims))

    def waits_for(self, region: Region) -> list[str]:
        """Counters of the producers whose writes overlap `region` so far (memoised)."""
        entries = self.producers.get(region.buffer, ())
        memo = self._waits_memo.get(region)
        if memo is not None and memo[0] == len(entries):
            return memo[1]
        found = []
        for preg, counter in entries:
            if counter not in found and regions_overlap(preg, region):
                found.append(counter)
        self._waits_memo[region] = (len(entries), found)
        return found

    def scalar_reads(self, value: str) -> tuple[str, list[Region]]:
        """A runtime scalar: its expression for the codegen and the regions it reads."""
        if value in self.scalar:
            expr, sources = self.scalar[value]
            return expr, [self.region(s) for s in sources]
        name = self.value_buffer(value)
        return name, [self.region(name)]

    # -- counters and tasks -----------------------------------------------------------------
    def produce(self, region: Region, counter: str):
        self.producers.setdefault(region.buffer, []).append((region, counter))

    def task(self, kind: str, coords: dict, reads: list[Region], writes: list[Region], signal: str,
             attrs: dict) -> Task:
        waits: list[str] = []
        for r in reads:
            for counter in self.waits_for(r):
                if counter not in waits and counter != signal:
                    waits.append(counter)
        for counter in waits:
            if counter not in self.tp.counters:
                raise IRError(f"lowering: task {kind}{coords} waits on counter {counter} nobody signals")
        prev = self.tp.counters.get(signal)
        self.tp.counters[signal] = Counter(signal, (prev.expected if prev else 0) + 1, 0)
        t = Task(len(self.tp.tasks), kind, 0, dict(coords), reads, writes,
                 [(c, self.tp.counters[c].expected) for c in waits], [(signal, 1)],
                 {k: v for k, v in attrs.items() if v is not None})
        self.tp.tasks.append(t)
        return t

    def weight(self, value: str) -> str:
        return self.buf[value]

    def mxfp4(self, value: str) -> tuple[str, str]:
        return self.buf[value + "_blocks"], self.buf[value + "_scales"]


def _declare_values(lw: Lowering):
    g = lw.graph
    names = {v.name for v in g.inputs}
    for v in g.inputs:
        kind = "kv_cache" if v.name.startswith(("%cache.", "%draft_cache.")) else "state"
        lw.value_buffer(v.name, kind)
    for p in g.params:
        ckpt = p.name[1:]
        if p.type.dtype is DType.MXFP4:
            e, n, k = p.type.shape
            lw.buf[p.name + "_blocks"] = lw.add_buffer(ckpt + "_blocks", "uint8", (e, n, k // 32, 16),
                                                       "weight", ckpt + "_blocks")
            lw.buf[p.name + "_scales"] = lw.add_buffer(ckpt + "_scales", "uint8", (e, n, k // 32),
                                                       "weight", ckpt + "_scales")
        else:
            lw.buf[p.name] = lw.add_buffer(ckpt, DTYPES[p.type.dtype], p.type.shape, "weight", ckpt)
    for op in g.ops:       # cache outputs and next_<x> outputs update their input in place
        for out in op.outputs:
            base = "%" + out.name[len("%next_"):] if out.name.startswith("%next_") else None
            if base in names and lw.types[base] == out.type:
                lw.buf[out.name] = lw.buf[base]
        if op.kind is OpKind.KV_WRITE:
            lw.buf[op.outputs[0].name] = lw.buf[op.args[0]]
        if op.kind is OpKind.QKV_ROPE_KV:
            lw.buf[op.outputs[1].name] = lw.buf[op.args[4]]
            lw.buf[op.outputs[2].name] = lw.buf[op.args[5]]


def _lower_scalar(lw: Lowering, op: Op):
    """add / sub of runtime scalars: an expression the consuming tasks evaluate."""
    exprs, sources = [], []
    for a in op.args:
        expr, regions = lw.scalar_reads(a)
        exprs.append(expr if " " not in expr else f"({expr})")
        sources += [r.buffer for r in regions]
    sign = {OpKind.ADD: " + ", OpKind.SUB: " - "}[op.kind]
    lw.scalar[op.out.name] = (sign.join(exprs), sources)


def _lowerers():
    from . import lower_attn, lower_linear, lower_moe
    return {
        OpKind.EMBED: lower_linear.lower_embed,
        OpKind.LINEAR: lower_linear.lower_linear,
        OpKind.SWIGLU_MLP: lower_linear.lower_swiglu,
        OpKind.CONCAT: lower_linear.lower_concat,
        OpKind.LM_HEAD: lower_linear.lower_lm_head,
        OpKind.SAMPLE: lower_linear.lower_sample,
        OpKind.ACCEPT: lower_linear.lower_accept,
        OpKind.QKV_ROPE_KV: lower_attn.lower_qkv,
        OpKind.KV_WRITE: lower_attn.lower_kv_write,
        OpKind.ROPE: lower_attn.defer_to_kv_write,
        OpKind.ATTENTION: lower_attn.lower_attention,
        OpKind.RMSNORM: lower_moe.lower_rmsnorm,
        OpKind.MOE_ROUTE: lower_moe.lower_route,
        OpKind.MOE_EXPERTS: lower_moe.lower_experts,
        OpKind.SLICE: lower_linear.lower_slice,
        OpKind.KV_COMMIT: lower_linear.folded_into_accept,
    }


def _assign_counter_slots(tp: TileProgram):
    """One 128-byte line per counter, so programs polling one never slow another's release."""
    tp.counters = {c.name: Counter(c.name, c.expected, i * COUNTER_LINE_SLOTS)
                   for i, c in enumerate(tp.counters.values())}


def lower(graph: Graph, options: LowerOptions = LowerOptions()) -> TileProgram:
    """Lower a fused graph (one step) to a verified, unscheduled tile program."""
    for name in POSITIVE_OPTIONS:
        if getattr(options, name) < 1:
            raise IRError(f"lowering: LowerOptions.{name} = {getattr(options, name)}, expected at least 1")
    verify_graph(graph)
    lw = Lowering(graph, options)
    lw.types = graph.types()
    for op in graph.ops:
        for name in op.operands():
            lw.consumers.setdefault(name, []).append(op)
        for v in op.outputs:
            lw.defs[v.name] = op
    lw.tp.annotations = {"step": graph.name, "ranks": options.ranks}
    _declare_values(lw)
    from .lower_linear import plan_block_assembly
    plan_block_assembly(lw)
    table = _lowerers()
    for i, op in enumerate(graph.ops):
        if id(op) in lw.done:
            continue
        if op.kind in (OpKind.ADD, OpKind.SUB) and lw.types[op.out.name].shape == ():
            _lower_scalar(lw, op)
        elif op.kind in table:
            table[op.kind](lw, op)
        else:
            raise IRError(f"lowering: op {op.out.name} = {op.kind.value}(...) at graph line "
                          f"{graph.op_line(i)} has no tile lowering")
        lw.done.add(id(op))
    unpaired = [op.out.name for queue in lw.pending_kv.values() for op, *_ in queue]
    if unpaired:
        raise IRError(f"lowering: kv_write {', '.join(unpaired)} has no K/V partner of the same input")
    _assign_counter_slots(lw.tp)
    return verify_tile(lw.tp)


def lower_pass(graph: Graph, options=None) -> TileProgram:
    """Pipeline entry: `lower` with the tile options found on the compile options (or defaults).
    Phases are balanced over the compile's programs unless the options fix it (or the
    interpreter order runs one program)."""
    lo = getattr(options, "lower", None) or LowerOptions()
    if lo.programs is None:
        interp = getattr(options, "interpreter_order", True)
        lo = replace(lo, programs=0 if interp else getattr(options, "programs", 0))
    return lower(graph, lo)
