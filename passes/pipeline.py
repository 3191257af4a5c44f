"""The compiler pipeline: one straight list of named passes, then `compile_model`.

    config ──trace──> graph ──GRAPH_PASSES──> fused graph ──TILE_PASSES──> tile / schedule

Every pass is a pure function verified on the way in and out. `compile_model`
returns every stage; it reads only the configs and the options (never weights),
and the same inputs give the same stages.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from tilecomp.ir.graph import Graph, parse_graph, print_graph
from tilecomp.ir.tile import parse_tile, print_tile
from tilecomp.models.config import DFlashConfig, MiMoConfig
from tilecomp.settings import Settings, settings as read_settings
from tilecomp.trace import (TraceOptions, build_modules, trace_decode_step, trace_plain_step,
                            trace_prefill_step)

from .dce import dce
from .fold_reduce import fold_reduce_pass
from .fuse_norm_prologue import fuse_norm_prologue
from .fuse_residual import fuse_residual
from .fuse_rope_kv import fuse_rope_kv
from .fuse_router import fuse_router
from .fuse_swiglu import fuse_swiglu
from .lower import LowerOptions, lower_pass
from .pipelining import pipelining_pass
from .schedule import schedule_pass
from .verify_schedule import verify_schedule_pass
from .warp_spec import warp_spec_pass

GRAPH_PASSES: tuple[Callable[[Graph], Graph], ...] = (
    # router matmul + sigmoid + biased top-k + weight normalisation -> moe_route (+ unique-expert plan)
    fuse_router,
    # gate, up, silu, mul, down (+ expert combine) -> swiglu_mlp / moe_experts
    fuse_swiglu,
    # RMSNorm into the prologue of the matmuls that read it
    fuse_norm_prologue,
    # q/k/v projections + RoPE + KV-cache writes -> qkv_rope_kv
    fuse_rope_kv,
    # residual adds into the epilogue of the op that produces the added value
    fuse_residual,
    # drop ops and parameters nothing uses
    dce,
)

# Tile passes, in order: (stage name, function(previous stage, options) -> next stage).
# The stage named "tile" is dumped as tile.ir, the last one as schedule.ir.
TILE_PASSES: tuple = (
    # fused graph -> tile tasks: N tiles (+ split-K), KV heads x chunks, expert slots, vocab tiles
    ("tile", lower_pass),
    # attn_reduce into the last attn_partial of its head to arrive (LowerOptions.fold_reduce)
    ("fold_reduce", fold_reduce_pass),
    # critical-path list scheduling onto the programs (or the CPU interpreter's one queue)
    ("schedule", schedule_pass),
    # mark the loads that can be issued before the wait (weights always)
    ("pipelining", pipelining_pass),
    # producer / consumer warp roles and shared-memory stages
    ("warp_spec", warp_spec_pass),
    # prove the schedule deadlock-free with co-resident programs (+ interpreter order)
    ("verify_schedule", verify_schedule_pass),
)


@dataclass(frozen=True)
class CompileOptions:
    dtype: str = "bf16"             # weights, activations and KV caches (experts stay MXFP4)
    max_len: int = 4096             # KV cache positions (full-attention layers and the draft)
    programs: int = 132             # persistent programs the schedule targets (H100: 132 SMs)
    interpreter_order: bool = False     # one program, one topological queue (CPU interpreter)
    lower: LowerOptions = LowerOptions()    # tile sizes of the lowering (passes/lower.py)
    prefill_chunk: int | None = None    # tokens per prefill step (default: the block size)
    block: int | None = None        # block size of a target compiled without a draft

    def trace_options(self) -> TraceOptions:
        return TraceOptions(dtype=self.dtype, max_len=self.max_len, prefill_chunk=self.prefill_chunk,
                            block=self.block)


def engine_options(max_len: int, programs: int, interpreter: bool,
                   qkv_q_heads: int | None = -1, lower: dict | None = None) -> CompileOptions:
    """Options of the DFlash step an engine runs. On a GPU one query head per qkv_rope_kv task
    by default (-1): a whole 16-head KV group in one task was the step's critical path on an
    H100 (docs/PERF.md); the interpreter keeps whole groups (it pays per task). `lower`
    overrides other LowerOptions fields (e.g. {"programs": 0}: fixed tile sizes)."""
    q = (None if interpreter else 1) if qkv_q_heads == -1 else qkv_q_heads
    return CompileOptions(max_len=max_len, programs=programs, interpreter_order=interpreter,
                          lower=engine_lower(interpreter, lower, qkv_q_heads=q))


# LowerOptions an engine on a GPU compiles with unless told otherwise (docs/PERF.md: each was
# measured as a single-switch A/B); the interpreter keeps LowerOptions' own defaults
# reduce_rows 32 (v30, session 22, H100, interleaved A/B of 60 pairs, flash 8L block 8):
# reduce_heads 4 = reduce_rows 32 at block 8: 7.851 -> 7.597 ms, -0.256 ms [-0.271, -0.246]
# xn_split 1 (v31, the same call's kind of A/B): 7.852 -> 7.727 ms, -0.117 ms [-0.133, -0.112];
# small block 8 -0.031 ms [-0.041, -0.019]
# expert_queue 1 (v33, session 24, H100, the same kind of A/B): 7.716 -> 7.375 ms, -0.348 ms
# [-0.360, -0.332]; small block 8 -0.066 ms [-0.076, -0.060]; tokens: tiny, small and the shipped
# model, 0 unexplained divergences
GPU_LOWER = {"expert_operands": 1, "kv_chunk": 0, "reduce_rows": 32, "xn_split": 1, "expert_queue": 1}


def lower_overrides(interpreter: bool, lower: dict | None = None) -> dict:
    """The LowerOptions fields an engine sets: GPU_LOWER on a GPU, under the caller's `lower`."""
    return {**({} if interpreter else GPU_LOWER), **(lower or {})}


def engine_lower(interpreter: bool, lower: dict | None = None, **fixed) -> LowerOptions:
    """An engine's LowerOptions: `lower_overrides`, then `fixed`."""
    return LowerOptions(**{**lower_overrides(interpreter, lower), **fixed})


@dataclass
class Compiled:
    """Every stage of one compile: `tile` right after lowering, `schedule` after the last tile pass
    (`prefill_*`: the same for the prefill chunk, `plain_*` for the plain, no-draft, decode step)."""

    config: MiMoConfig
    draft_config: DFlashConfig | None   # None: a target compiled without a draft
    options: CompileOptions
    graph: Graph | None             # traced DFlash decode step (None without a draft)
    fused: Graph | None             # decode step after GRAPH_PASSES
    prefill: Graph                  # traced prefill chunk
    prefill_fused: Graph
    plain: Graph | None = None      # traced plain decode step (block 1, no draft)
    plain_fused: Graph | None = None
    tile: object | None = None
    schedule: object | None = None
    prefill_tile: object | None = None
    prefill_schedule: object | None = None
    plain_tile: object | None = None
    plain_schedule: object | None = None
    seconds: dict[str, float] = field(default_factory=dict, compare=False)


Progress = Callable[[str], None]


def stderr_progress(line: str):
    print(f"[tilecomp] {line}", file=sys.stderr, flush=True)


def _size(stage) -> str:
    if isinstance(stage, Graph):
        return f" ({len(stage.ops)} ops)"
    tasks = getattr(stage, "tasks", None)
    return "" if tasks is None else f" ({len(tasks)} tasks)"


class _Stages:
    """Times each stage, reports progress, and dumps pass outputs at debug >= 2."""

    def __init__(self, progress: Progress | None, cfg: Settings):
        self.progress, self.cfg = progress, cfg
        self.seconds: dict[str, float] = {}

    def run(self, label: str, fn, *args, announce: bool = False):
        """Run one stage; report it when done (and when it starts, for long stages)."""
        if self.progress and announce:
            self.progress(f"{label} ...")
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[label] = time.perf_counter() - start
        if self.progress:
            self.progress(f"{label}: {self.seconds[label]:.2f} s{_size(result)}")
        return result

    def graph_passes(self, graph: Graph) -> Graph:
        for n, graph_pass in enumerate(GRAPH_PASSES, start=1):
            graph = self.run(f"{graph.name}: {graph_pass.__name__}", graph_pass, graph)
            if self.cfg.debug >= 2:
                self.dump(graph, f"{graph.name}.{n:02d}.{graph_pass.__name__}.ir")
        return graph

    def tile_passes(self, step: str, graph: Graph, options) -> tuple:
        """(tile program right after lowering, program after the last tile pass)."""
        stage, lowered = graph, None
        for n, (name, tile_pass) in enumerate(TILE_PASSES, start=len(GRAPH_PASSES) + 1):
            stage = self.run(f"{step}: {name}", tile_pass, stage, options, announce=True)
            lowered = stage if name == "tile" else lowered
            if self.cfg.debug >= 2:
                self.dump(stage, f"{step}.{n:02d}.{name}.ir")
        return lowered, stage

    def dump(self, stage, filename: str):
        """Write a stage's text to the dump directory, checking that it parses back equal."""
        if isinstance(stage, Graph):
            text = print_graph(stage)
            again = parse_graph(text, filename)
        else:
            text = print_tile(stage)
            again = parse_tile(text)
        if again != stage:
            raise AssertionError(f"{filename}: text does not round-trip")
        if self.cfg.dump_dir:
            os.makedirs(self.cfg.dump_dir, exist_ok=True)
            with open(os.path.join(self.cfg.dump_dir, filename), "w") as f:
                f.write(text)


def compile_model(model_config: MiMoConfig, draft_config: DFlashConfig | None,
                  options: CompileOptions = CompileOptions(), progress: Progress | None = None,
                  settings: Settings | None = None) -> Compiled:
    """Trace, fuse, lower and schedule one DFlash decode step, one plain decode step and one
    prefill chunk (without a draft config: the plain step and the prefill chunk only, of
    `options.block` rows)."""
    cfg = settings or read_settings()
    if progress is None and cfg.debug >= 1:
        progress = stderr_progress
    stages = _Stages(progress, cfg)
    target, draft = stages.run("build modules (meta)", build_modules, model_config, draft_config, options.dtype)
    trace_opts = options.trace_options()
    graph = None if draft is None else stages.run("trace decode step", trace_decode_step, target, draft,
                                                  trace_opts)
    prefill = stages.run("trace prefill step", trace_prefill_step, target, draft, trace_opts)
    plain = stages.run("trace plain step", trace_plain_step, target, draft, trace_opts)
    compiled = Compiled(model_config, draft_config, options, graph,
                        None if graph is None else stages.graph_passes(graph),
                        prefill, stages.graph_passes(prefill), plain, stages.graph_passes(plain))
    if graph is not None:
        compiled.tile, compiled.schedule = stages.tile_passes(graph.name, compiled.fused, options)
    compiled.prefill_tile, compiled.prefill_schedule = stages.tile_passes(prefill.name, compiled.prefill_fused,
                                                                          options)
    compiled.plain_tile, compiled.plain_schedule = stages.tile_passes(plain.name, compiled.plain_fused, options)
    if cfg.dump_dir:
        step, chunk, one = "decode_step" if graph is None else graph.name, prefill.name, plain.name
        dumps = {f"{step}.graph.ir": graph, f"{step}.graph.fused.ir": compiled.fused,
                 f"{chunk}.graph.ir": prefill, f"{chunk}.graph.fused.ir": compiled.prefill_fused,
                 f"{step}.tile.ir": compiled.tile, f"{step}.schedule.ir": compiled.schedule,
                 f"{chunk}.tile.ir": compiled.prefill_tile, f"{chunk}.schedule.ir": compiled.prefill_schedule,
                 f"{one}.graph.ir": plain, f"{one}.graph.fused.ir": compiled.plain_fused,
                 f"{one}.tile.ir": compiled.plain_tile, f"{one}.schedule.ir": compiled.plain_schedule}
        for filename, stage in dumps.items():
            if stage is not None:
                stages.dump(stage, filename)
    return dataclasses.replace(compiled, seconds=stages.seconds)
