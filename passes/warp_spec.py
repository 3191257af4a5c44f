"""Warp-specialization annotations: producer / consumer roles per task.

Tasks that stream a large operand through shared memory (weights, or K/V
chunks for attention) are split into a producer warp group that issues the
loads into a ring of `stages` shared-memory buffers, and consumer warps that
run the dot products and the epilogue. Small tasks (reductions, routing,
sampling, acceptance) run on all warps alike ("uniform").

Attributes set per task: `warp_role` ("producer_consumer" | "uniform"),
`producer_warps`, `consumer_warps`, `stages`, `smem_bytes`. The program
annotation `smem_bytes` is the largest task's need: the persistent kernel must
fit it next to one program per SM (`smem_limit`), else all programs are not
co-resident and the schedule could deadlock (ScheduleError).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tilecomp.errors import ScheduleError
from tilecomp.ir.tile import TileProgram, verify_tile

STREAMING_KINDS = ("linear", "qkv_rope_kv", "expert_up_gate", "expert_down", "lm_head", "attn_partial")


@dataclass(frozen=True)
class WarpSpecOptions:
    stage_bytes: int = 32 * 1024        # one shared-memory ring slot (e.g. 128 x 128 bf16)
    max_stages: int = 4
    min_stream_bytes: int = 64 * 1024   # below this a task is not worth splitting
    consumer_warps: int = 2
    smem_limit: int = 227 * 1024        # H100: usable shared memory per SM


def _streamed_bytes(tp: TileProgram, task) -> int:
    """Bytes of the big operands: the prefetchable weights, or K/V for attention."""
    if task.kind == "attn_partial":
        return sum(tp.region_bytes(r) for r in task.reads if tp.buffers[r.buffer].kind == "kv_cache")
    return sum(tp.region_bytes(r) for r in task.reads if tp.buffers[r.buffer].kind == "weight")


def specialize_warps(tp: TileProgram, options: WarpSpecOptions = WarpSpecOptions()) -> TileProgram:
    tasks, smem = [], 0
    for t in tp.tasks:
        stream = _streamed_bytes(tp, t)
        attrs = dict(t.attrs)
        if t.kind in STREAMING_KINDS and stream >= options.min_stream_bytes:
            stages = max(2, min(options.max_stages, -(-stream // options.stage_bytes)))
            attrs.update(warp_role="producer_consumer", producer_warps=1,
                         consumer_warps=options.consumer_warps, stages=stages,
                         smem_bytes=stages * options.stage_bytes)
        else:
            attrs.update(warp_role="uniform", producer_warps=0, consumer_warps=options.consumer_warps + 1,
                         stages=1, smem_bytes=0)
        smem = max(smem, attrs["smem_bytes"])
        tasks.append(dataclasses.replace(t, attrs=attrs))
    if smem > options.smem_limit:
        raise ScheduleError(f"warp specialization needs {smem} bytes of shared memory per program, "
                            f"more than the {options.smem_limit} an SM has: programs would not be co-resident")
    notes = dict(tp.annotations, smem_bytes=smem)
    return verify_tile(dataclasses.replace(tp, tasks=tasks, annotations=notes))


def warp_spec_pass(tp: TileProgram, options=None) -> TileProgram:
    """Pipeline entry: WarpSpecOptions from `options.warp_spec` when present."""
    return specialize_warps(tp, getattr(options, "warp_spec", None) or WarpSpecOptions())
