"""Tile IR: the decode step as tile tasks with explicit data regions and counters.

A `TileProgram` holds
  buffers   every tensor a task touches (weights name their checkpoint tensor),
  counters  the scoreboard: each counter expects a static number of signals
            per step (the sum of the `+=` of the tasks that signal it),
  tasks     `Task(kind, coords, reads, writes, waits, signals, attrs)`,
  programs  after scheduling: one queue of task ids per persistent program.

Counter targets are per-step counts. Lowering always waits for ALL of a
counter's signals (target == expected), so the codegen's epoch target is
`epoch * target`; the general form is `(epoch - 1) * expected + target`.
Counters live in one int32 array; `Counter.slot` is padded so that no two
counters share a 128-byte cache line (`COUNTER_LINE_SLOTS` int32 per line).

Text form (one statement per line, `#` starts a comment):

    tile v1
    annotation programs = 4
    buffer h.0 : bf16[8, 4096] activation
    buffer w.q.0 : bf16[12288, 4096] weight param="model.layers.0.self_attn.q_proj.weight"
    counter c.qkv.0 expected=18 slot=0
    task t3 = linear[layer=0, n=2] rank=0 {op="o_proj", residual=true}
      reads attn.0[0:8, 0:8192], w.o.0[256:384, 0:8192]
      writes h.1[0:8, 256:384]
      waits c.attn.0 >= 4
      signals c.o.0 += 1
    schedule programs=1
    program 0: t0 t3

A region dimension is `lo:hi` (static, half open) or `$idx:hi` / `$idx+lo:hi`
(rows idx+lo .. idx+hi where idx is a runtime index such as the block's start
position or the expert a slot holds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Union


TILE_VERSION = "tile v1"
COUNTER_LINE_SLOTS = 32          # int32 counters per 128-byte cache line

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int32": 4, "int64": 8, "uint8": 1}

# weight: read-only parameters (param = checkpoint tensor name)
# activation: written and read inside one step
# scratch: partial results inside one step (split-K partials, flash-decoding (m, l, acc), MoE plan)
# kv_cache: persistent K/V caches (positions written this step are read this step)
# state: persistent across steps (block tokens, positions, taps, accepted count)
# operand: written and read inside one step like an activation, but stored in the weights'
#   dtype (the engine's weight arena) because a tensor-core dot reads it as an operand
#   (LowerOptions.expert_operands: the experts' inputs)
BUFFER_KINDS = ("weight", "activation", "scratch", "kv_cache", "state", "operand")

TASK_KINDS = (
    "embed",                                            # token rows (+ mask embedding)
    "linear", "linear_reduce",                          # projections (+ split-K reduce)
    "qkv_rope_kv", "attn_partial", "attn_reduce",       # attention
    "moe_route", "expert_up_gate", "expert_down", "moe_combine",  # mixture of experts
    "lm_head", "sample_reduce", "accept",               # output head, DFlash acceptance
    "allreduce", "send", "recv",                        # communication (multi-GPU)
)

AttrValue = Union[bool, int, float, str, list]


class Dim(NamedTuple):
    """One dimension of a region: rows [lo, hi), offset by runtime index `index` if set."""
    lo: int
    hi: int
    index: str | None = None

    @property
    def extent(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Region:
    buffer: str
    dims: tuple[Dim, ...]

    def elements(self) -> int:
        return math.prod(d.extent for d in self.dims)


@dataclass(frozen=True)
class Buffer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    param: str | None = None

    def full(self) -> Region:
        return Region(self.name, tuple(Dim(0, s) for s in self.shape))


@dataclass(frozen=True)
class Counter:
    name: str
    expected: int          # signals per step (sum of the increments)
    slot: int              # index in the int32 counter array (padded to a cache line)


@dataclass
class Task:
    id: int
    kind: str
    rank: int = 0
    coords: dict[str, int] = field(default_factory=dict)
    reads: list[Region] = field(default_factory=list)
    writes: list[Region] = field(default_factory=list)
    waits: list[tuple[str, int]] = field(default_factory=list)
    signals: list[tuple[str, int]] = field(default_factory=list)
    attrs: dict[str, AttrValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"t{self.id}"


@dataclass
class TileProgram:
    buffers: dict[str, Buffer] = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    programs: list[list[int]] | None = None
    annotations: dict[str, AttrValue] = field(default_factory=dict)

    def region_bytes(self, region: Region) -> int:
        return region.elements() * DTYPE_BYTES[self.buffers[region.buffer].dtype]

    def task_bytes(self, task: Task) -> int:
        """Bytes a task moves through memory: every region it reads and writes."""
        return sum(self.region_bytes(r) for r in task.reads) + sum(self.region_bytes(r) for r in task.writes)


# The text form and the verifiers live in their own files; re-exported here.
from .tile_text import format_region, parse_tile, print_tile  # noqa: E402
from .tile_verify import verify_schedule, verify_tile  # noqa: E402  (verifiers use the classes above)

__all__ = [
    "TILE_VERSION", "COUNTER_LINE_SLOTS", "DTYPE_BYTES", "BUFFER_KINDS", "TASK_KINDS",
    "Dim", "Region", "Buffer", "Counter", "Task", "TileProgram",
    "format_region", "print_tile", "parse_tile", "verify_tile", "verify_schedule",
]
