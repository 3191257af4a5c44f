"""MegakernelEngine: generation with ONE persistent-kernel launch per decode step.

The engine owns the typed arenas (weights, KV caches, activations, step state),
the scoreboard counters of each step program and its task queues. A DFlash step
(draft context + draft forward + target verify + acceptance + next-step state)
is one launch of the `decode_step` kernel; the host then reads the step's
committed tokens (its only synchronisation). The prompt runs through the
`prefill_chunk` kernel, one launch per chunk. Counters are never reset: each
program's launches use epoch targets 1, 2, ...

Every step program is the compiler's (`compile_model`: `schedule` for the DFlash
step, `prefill_schedule` for the prompt's chunks, `plain_schedule` for plain,
no-draft, decoding): given as a `Compiled` (or one by one), or compiled by the
engine itself from the model's config and its tuning switches. A
compiled chunk has a static T rows: the last chunk is the prompt's last T tokens
(it recomputes rows the previous chunk wrote, rewriting their K/V with the same
values), so no K/V lands past the prompt; a prompt shorter than T is padded, and
its extra rows write K/V only at positions the first decode step rewrites before
reading them (as it does for rejected draft positions).

Same interface as ReferenceEngine (docs/INTERFACES.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen import mxfp4_ptx
from tilecomp.codegen.kernels import check_tile_names, constexprs_for, kernel_files, step_rows
from tilecomp.codegen.harness import (Megakernel, interpreting, new_counters, new_errors,
                                      raise_on_timeout)
from tilecomp.errors import TilecompError

from .buffers import ArenaBuilder
from .compiled import RecordBuilder, reserve_buffers, reserve_engine_slots, tile_constexprs
from .reference import GenerationResult, ReferenceEngine, _Output
from .weights import add_weights


@dataclass
class StepProgram:
    """One step's packed queues plus its own scoreboard and epoch."""
    kernel: Megakernel
    records: torch.Tensor
    queue: torch.Tensor
    counters: torch.Tensor
    errors: torch.Tensor
    counter_names: list[str]
    task_names: dict[int, str]
    # the graph op each task computes a part of (task id -> op, e.g. "L3.attn"; the task's name
    # where it has none): what the trace's per-op timeline groups by
    task_ops: dict[int, str] = field(default_factory=dict)
    epoch: int = 0
    # cuda_graph: each step is one replay of a CUDA graph holding [epoch_buf += 1, the kernel
    # launched with epoch 0], so a step pays no per-launch host work (Triton's argument binding
    # of ~60 arguments); the kernel reads the step number from epoch_buf. The interpreter has no
    # graphs: it runs the same two operations directly (the device-epoch path, tested on a CPU).
    cuda_graph: bool = False
    epoch_buf: torch.Tensor | None = None
    graph: object = None
    graph_arenas: object = None

    def launch(self, arenas, trace=None):
        self.epoch += 1
        if not self.cuda_graph or trace is not None:
            if self.epoch_buf is not None:
                self.epoch_buf.fill_(self.epoch)       # later replays continue from this step
            self.kernel.launch(self.records, self.queue, self.counters, self.errors, self.epoch, arenas,
                               trace=trace, epoch_buf=self.epoch_buf)
            return
        if self.epoch_buf is None:
            self.epoch_buf = torch.full([1], self.epoch - 1, dtype=torch.int32, device=self.records.device)
        if interpreting():
            self._device_epoch_launch(arenas)
            return
        if self.graph is None:
            self._capture(arenas)
        elif arenas is not self.graph_arenas:
            raise TilecompError("cuda_graph: a step program's graph was recorded with other arenas")
        self.graph.replay()

    def _device_epoch_launch(self, arenas):
        self.epoch_buf.add_(1)
        self.kernel.launch(self.records, self.queue, self.counters, self.errors, 0, arenas,
                           epoch_buf=self.epoch_buf)

    def _capture(self, arenas):
        """Record [epoch_buf += 1, launch] once (the kernel is built first: a graph capture
        cannot compile). Recording runs nothing: the caller's replay runs this step."""
        self.warmup(arenas)
        self.epoch_buf.add_(0)          # the add's kernel loaded outside the capture, as the launch's
        torch.cuda.synchronize(self.records.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._device_epoch_launch(arenas)
        self.graph, self.graph_arenas = graph, arenas

    def warmup(self, arenas):
        self.kernel.warmup(self.records, self.queue, self.counters, self.errors, arenas,
                           epoch_buf=self.epoch_buf)

    def new_trace(self) -> torch.Tensor:
        """A buffer for `launch(trace=...)`: int64 [n_tasks + programs, layout.TRACE_WORDS]
        globaltimer stamps (per task: start, wait done, work done, signalled; then per program:
        entry, 0, 0, exit)."""
        rows = self.records.shape[0] + self.queue.numel() - 1
        return torch.zeros(rows, L.TRACE_WORDS, dtype=torch.int64, device=self.records.device)

    def check(self):
        raise_on_timeout(self.errors, self.epoch, self.task_names, self.counter_names)

    def read_back(self, *values: torch.Tensor) -> list[int]:
        """The int32 `values` (concatenated) read to the host in ONE copy with every program's
        timeout flag, so a generation step pays one device-to-host round trip, not two; raises
        DeadlockError (check) when a flag is set."""
        flags = self.errors[:, 0] != 0
        out = torch.cat([*values, flags.to(values[0].dtype)]).tolist()
        if any(out[len(out) - flags.numel():]):
            self.check()
        return out[:len(out) - flags.numel()]


# MXFP4 dequantizations that are exact only for some E8M0 scale codes: MX_DOT -> (lo, hi)
EXACT_SCALES = {6: (65, 191), 8: mxfp4_ptx.SCALE_RANGE, 9: mxfp4_ptx.WORD_SCALE_RANGE}


def _exact_mx_dot(target, draft, tiles: dict, mode: int) -> int:
    """`mode` when every non-zero MXFP4 group of the checkpoint has a scale code it is exact for
    (EXACT_SCALES; all-zero groups are exact at any scale, the quantizer gives those code 0), else
    the exact-everywhere MX_DOT 3; an explicit --tile MX_DOT=mode is refused instead.
    MX_DOT 6: one multiply per element, 2^-62 .. 2^64 (what trained weights use). MX_DOT 8: bf16
    table lookups, no bf16 subnormal or overflow in a product. MX_DOT 9: the same for the bf16
    products scaled by 2^-32 (codegen/mxfp4_ptx.py WORD_SCALE_RANGE)."""
    lo, hi = EXACT_SCALES[mode]
    for model in (target, draft):
        buffers = dict(model.named_buffers()) if model is not None else {}
        for name, scales in buffers.items():
            blocks = buffers.get(name[:-len("_scales")] + "_blocks") if name.endswith("_scales") else None
            if blocks is None or scales.dtype != torch.uint8:
                continue
            out = (scales < lo) | (scales > hi)                         # [..., N, K/32]
            if bool(out.any()) and bool(((blocks[out] & 0x77) != 0).any()):
                found = int(scales[out].min()), int(scales[out].max())
                if tiles.get("MX_DOT") == mode:
                    raise TilecompError(f"tiles: MX_DOT={mode} is exact for MXFP4 scale codes {lo}..{hi}; "
                                        f"{name} has non-zero groups with codes in {found[0]}..{found[1]} "
                                        f"(use MX_DOT=3)")
                return 3
    return mode


def _rows_not_whole_words(target, draft):
    """(name, K/32) of the first MXFP4 scale tensor whose rows are not whole 32-bit words of 4
    groups (K not a multiple of 128), or None."""
    for prefix, model in (("", target), ("draft.", draft)):
        for name, scales in (model.named_buffers() if model is not None else ()):
            if name.endswith("_scales") and scales.dim() >= 2 and scales.shape[-1] % 4:
                return prefix + name, scales.shape[-1]
    return None


def _applies(tiles: dict, switch: str, needs: str, why: str | None) -> int:
    """1 when a layout switch applies (`why` is None), else 0; an explicit --tile SWITCH=1 that
    cannot apply is refused with what it needs and why not."""
    if why is None:
        return 1
    if tiles.get(switch):
        raise TilecompError(f"tiles: {switch}=1 {needs}; {why} (use {switch}=0)")
    return 0


def _not_words(target, draft) -> str | None:
    bad = _rows_not_whole_words(target, draft)
    return bad and f"{bad[0]} has {bad[1]} groups per row (K/32), not a multiple of 4"


def _scale_tiles(target, draft, tiles: dict) -> int:
    """STILE: every MXFP4 scale tensor's rows must be whole 32-bit words (K/32 a multiple of 4)."""
    return _applies(tiles, "STILE", "stores the MXFP4 scales as 32-bit words of 4 groups",
                    _not_words(target, draft))


def _afrag(target, draft, consts: dict, tiles: dict) -> int:
    """AFRAG: MX_DOT 9, BLOCK_KX and every expert K multiples of 128."""
    why = (f"MX_DOT is {consts.get('MX_DOT')}" if consts.get("MX_DOT") != 9 else
           f"BLOCK_KX is {consts.get('BLOCK_KX')}" if consts.get("BLOCK_KX", 0) % 128 else
           _not_words(target, draft))
    return _applies(tiles, "AFRAG", "reorders MX_DOT 9's words in 128-element blocks (MX_DOT 9, "
                    "BLOCK_KX and every expert K multiples of 128)", why)


def _codes_not_whole_tiles(target, draft, nx: int, kx: int) -> str | None:
    """Why the first MXFP4 code tensor is not whole nx x kx tiles, or None."""
    for prefix, model in (("", target), ("draft.", draft)):
        for name, blocks in (model.named_buffers() if model is not None else ()):
            if name.endswith("_blocks") and blocks.dim() >= 3 and (
                    not nx or not kx or blocks.shape[-3] % nx or (32 * blocks.shape[-2]) % kx):
                return (f"{prefix}{name} is {blocks.shape[-3]} rows x K {32 * blocks.shape[-2]}, not whole "
                        f"{nx} x {kx} tiles (BLOCK_NX x BLOCK_KX)")
    return None


def _code_tiles(target, draft, consts: dict, tiles: dict) -> int:
    """XTILE: every MXFP4 code tensor's rows and K multiples of BLOCK_NX and BLOCK_KX."""
    why = _codes_not_whole_tiles(target, draft, consts.get("BLOCK_NX", 0), consts.get("BLOCK_KX", 0))
    return _applies(tiles, "XTILE", "stores the expert codes in whole BLOCK_NX x BLOCK_KX tiles", why)


class MegakernelEngine:
    def __init__(self, target, draft=None, max_len: int = 4096, programs: int | None = None,
                 artifacts=None, cache_dir=None, chunk_len: int | None = None, schedule=None,
                 num_warps: int | None = None, tiles: dict | None = None, qkv_q_heads: int | None = -1,
                 prefill_schedule=None, plain_schedule=None, lower: dict | None = None,
                 cuda_graph: bool | None = None, share_experts: "MegakernelEngine | None" = None):
        """artifacts: a `tilecomp compile --out` directory (checked against the model: its kernels
        are refused when compiled for other tile sizes); cache_dir: where kernel files are cached.
        schedule: a scheduled TileProgram (or the path of a schedule.ir) from `tilecomp compile`
        (same max_len) to run as the DFlash step, or the whole `Compiled` of `compile_model`
        (its prefill_schedule then runs the prompt and its plain_schedule plain decoding).
        prefill_schedule / plain_schedule: a scheduled prefill chunk / plain step (TileProgram or
        path). A program not given is compiled here (`compile_model` with the options below).
        Tuning switches (tilecomp bench measures each): num_warps per program (default
        layout.GPU_NUM_WARPS); tiles overrides tile sizes (e.g. {"BLOCK_K": 128}; a GPU starts from
        layout.GPU_TUNING); qkv_q_heads query heads per qkv task of the programs
        compiled here (LowerOptions.qkv_q_heads; None: a whole KV group per task; -1: 1 on a GPU,
        None in the interpreter); chunk_len KV positions per flash-decoding partial
        (LowerOptions.kv_chunk; default: on a GPU passes/pipeline.GPU_LOWER's 0, the keys in view
        split over chunks that fill the programs at run time; the whole span in the
        interpreter); lower:
        other LowerOptions fields of the programs compiled here (e.g. {"programs": 0}: fixed tile
        sizes instead of phases balanced over the engine's programs). cuda_graph: each step is
        the replay of a CUDA graph recorded at its first launch (no per-step host launch work;
        StepProgram.cuda_graph); None: on a GPU (measured faster, docs/PERF.md version 18), off in
        the interpreter. share_experts: an engine of the same model and weights whose MXFP4 arena
        (the experts, most of a flash-sized model) this one reuses instead of a copy of its own,
        e.g. the bench's A/B of two lowerings; it must write them the same way (the same
        layout.ARENA_TILES values)."""
        self.target, self.draft, self.config = target, draft, target.config
        self.cuda_graph = (not interpreting()) if cuda_graph is None else bool(cuda_graph)
        self.max_len = max_len
        self.dcfg = draft.config if draft is not None else None
        self.rows = self.block = step_rows(self.dcfg)     # prefill chunk = block rows
        self.device = target.lm_head.weight.device
        self.programs = programs or (1 if interpreting() else
                                     torch.cuda.get_device_properties(self.device).multi_processor_count)
        self.consts = constexprs_for(self.config, self.dcfg, self.rows)
        check_tile_names(tiles or {}, self.consts)
        self.tiles = dict(tiles or {})
        if not interpreting():
            self.consts.update(L.GPU_TUNING)
            if torch.cuda.get_device_capability(self.device)[0] < 9:
                self.consts["L2PF"] = 0     # the bulk L2 prefetch is sm_90+ PTX
        self.consts.update(self.tiles)
        wdtype = torch.float32 if interpreting() else target.lm_head.weight.dtype
        builder = ArenaBuilder(wdtype)
        add_weights(builder, target, draft, norm_arena=L.norm_arena(self.consts))
        # KV positions per flash-decoding partial: the interpreter runs one chunk per head
        # (fewer tasks); a GPU splits the keys in view so the partials fill the SMs
        self.chunk_len = chunk_len
        self.qkv_q_heads = (None if interpreting() else 1) if qkv_q_heads == -1 else qkv_q_heads
        self.lower = dict(lower or {})
        reserve_engine_slots(builder, self.config, self.dcfg, max_len, self.block)
        if hasattr(schedule, "prefill_schedule"):           # a Compiled: all of its programs
            plain_schedule = plain_schedule or getattr(schedule, "plain_schedule", None)
            schedule, prefill_schedule = schedule.schedule, prefill_schedule or schedule.prefill_schedule
        self.schedule = _load_schedule(schedule)
        self.prefill_schedule = _load_schedule(prefill_schedule)
        self.plain_schedule = _load_schedule(plain_schedule)
        ptx = self.consts.get("MX_DOT") == 8 or (self.consts.get("MX_DOT") == 9 and self.consts.get("PTX_ASM"))
        if ptx and interpreting():
            how = "" if self.consts["MX_DOT"] == 8 else " with PTX_ASM=1"
            raise TilecompError(f"tiles: MX_DOT={self.consts['MX_DOT']}{how} dequantizes with inline PTX, "
                                "which the Triton interpreter cannot run (use MX_DOT=3, or MX_DOT=9 "
                                "with PTX_ASM=0, on CPU)")
        wpf = self.consts.get("WPF", 0)
        if wpf and interpreting():
            raise TilecompError(f"tiles: WPF={wpf} prefetches weights into L2 with inline PTX, which the "
                                "Triton interpreter cannot run (WPF=0 on CPU)")
        if wpf < 0 or wpf % L.WPF_CHUNK_KB:
            raise TilecompError(f"tiles: WPF={wpf}: expected KB per weight range, a multiple of "
                                f"{L.WPF_CHUNK_KB} (one bulk prefetch each), or 0 (off)")
        if self.consts.get("MX_DOT") in EXACT_SCALES:
            self.consts["MX_DOT"] = _exact_mx_dot(target, draft, self.tiles, self.consts["MX_DOT"])
        if self.consts.get("AFRAG"):
            self.consts["AFRAG"] = _afrag(target, draft, self.consts, self.tiles)
        if self.consts.get("MX_DOT") == 9:
            # MX_DOT 9 reads the expert codes repacked word by word (codegen/mxfp4_ptx.py), AFRAG
            # in its element order first: the arena holds that copy; the model's buffers are left
            order = mxfp4_ptx.afrag_order if self.consts.get("AFRAG") else (lambda t: t)
            builder.transform(lambda name, t: mxfp4_ptx.repack_words(order(t)) if name.endswith("_blocks") else t)
        if self.consts.get("STILE"):
            self.consts["STILE"] = _scale_tiles(target, draft, self.tiles)
            if self.consts["STILE"]:
                # STILE reads the expert scales tiled by K words (codegen/layout.py tile_scales)
                builder.transform(lambda name, t: L.tile_scales(t) if name.endswith("_scales") else t)
        if self.consts.get("XTILE"):
            self.consts["XTILE"] = _code_tiles(target, draft, self.consts, self.tiles)
            if self.consts["XTILE"]:
                # XTILE reads the expert codes tile by tile (codegen/layout.py tile_blocks), after
                # MX_DOT 9's word repacking (which stays inside a row's 128-element blocks)
                nx, kx = self.consts["BLOCK_NX"], self.consts["BLOCK_KX"]
                builder.transform(lambda name, t: L.tile_blocks(t, nx, kx) if name.endswith("_blocks") else t)
        if (self.schedule is None and draft is not None or self.prefill_schedule is None
                or self.plain_schedule is None):
            self._compile_missing()
        reserve_buffers(builder, *(tp for tp in (self.schedule, self.prefill_schedule, self.plain_schedule)
                                   if tp is not None))
        self.builder = builder
        if share_experts is not None:
            differ = [t for t in L.ARENA_TILES + self._layout_tiles()
                      if share_experts.consts.get(t) != self.consts.get(t)]
            if differ:
                raise TilecompError(f"share_experts: the engines write the weights differently "
                                    f"({', '.join(differ)} differ)")
        self.arenas = builder.build(self.device, share=share_experts and share_experts.arenas,
                                    share_names=("u8",) if share_experts is not None else ())
        self.num_warps = num_warps or L.GPU_NUM_WARPS
        # the step kernels' sources (each step program launches them with its own tile sizes)
        self.kernel_paths = kernel_files(self.config, self.dcfg, artifacts, cache_dir)
        self._steps: dict[str, StepProgram] = {}

    def compile_options(self):
        """The options this engine compiles its own step programs with (its tuning switches)."""
        from tilecomp.passes.pipeline import CompileOptions, engine_lower
        fixed = {"qkv_q_heads": self.qkv_q_heads}
        if "kv_chunk" not in self.lower and (self.chunk_len or interpreting()):
            fixed["kv_chunk"] = self.chunk_len or self.max_len
        lower = engine_lower(interpreting(), self.lower, **fixed)
        return CompileOptions(max_len=self.max_len, programs=self.programs,
                              interpreter_order=interpreting() and self.programs == 1, lower=lower,
                              block=None if self.dcfg is not None else self.block)

    def _compile_missing(self):
        """Compile the model's step programs; keep the ones given, fill in the others."""
        from tilecomp.passes.pipeline import compile_model
        own = compile_model(self.config, self.dcfg, self.compile_options())
        self.schedule = self.schedule or own.schedule
        self.prefill_schedule = self.prefill_schedule or own.prefill_schedule
        self.plain_schedule = self.plain_schedule or own.plain_schedule

    # -- step programs -------------------------------------------------------------------------
    def step_program(self, kind: str) -> StepProgram:
        """The step program of `kind` ("dflash", "plain" or "prefill"), built on first use."""
        if kind not in self._steps:
            self._steps[kind] = self._compiled(*self._program_of(kind))
        return self._steps[kind]

    def _layout_tiles(self) -> tuple:
        """Tile sizes the arena's weight layout depends on besides L.ARENA_TILES: XTILE stores the
        expert codes in BLOCK_NX x BLOCK_KX tiles."""
        return ("BLOCK_NX", "BLOCK_KX") if self.consts.get("XTILE") else ()

    def variant_program(self, kind: str, tiles: dict) -> StepProgram:
        """A second step program of `kind` on this engine's arenas and weights, its kernel launched
        with `tiles` on top of the engine's tile sizes (its own scoreboard, epoch and graph). What
        `tilecomp bench --ab-tile` times against the engine's own program: one copy of the
        weights instead of two (two flash 8L engines do not fit in 80 GB beside the bench's
        weights). Switches that change the arena's weight layout (layout.ARENA_TILES) need an
        engine of their own and are refused."""
        check_tile_names(tiles, self.consts)
        bad = sorted(set(tiles) & set(L.ARENA_TILES))
        bad += [t for t in self._layout_tiles() if t in tiles and tiles[t] != self.consts.get(t)]
        if bad:
            raise TilecompError(f"tiles: {', '.join(bad)} change(s) how the weights sit in the arena; "
                                f"a variant program shares this engine's arena (build another engine)")
        tp, kernel_name = self._program_of(kind)
        return self._compiled(tp, kernel_name, dict(self.consts, **tiles))

    def _program_of(self, kind: str):
        programs = {"dflash": (self.schedule, "decode_step"), "plain": (self.plain_schedule, "decode_step"),
                    "prefill": (self.prefill_schedule, "prefill_chunk")}
        if kind not in programs:
            raise TilecompError(f"step program: expected one of {', '.join(programs)}, found {kind!r}")
        return programs[kind]

    def _compiled(self, tp, kernel_name: str, engine_consts: dict | None = None) -> StepProgram:
        """A compiler-scheduled tile program (its queues, counters and tile sizes); engine_consts:
        the engine's tile sizes with a variant's on top (default: the engine's)."""
        queues = RecordBuilder(self.builder, tp, norm_arena=L.norm_arena(self.consts)).queues()
        consts = tile_constexprs(tp, engine_consts or self.consts, widen=interpreting())
        names = {t.id: f"{t.kind} [{t.name} {t.attrs.get('op', '')}]" for t in tp.tasks}
        ops = {t.id: str(t.attrs.get("op") or t.name) for t in tp.tasks}
        L.check_alignment(queues, consts.get("WALIGN", 1), names)
        consts = L.fit_act_alignment(consts, queues)   # the activation hint as far as the records allow
        # the artifacts' / cached kernel, launched with this program's tile sizes (on a GPU the
        # recorded CONSTEXPRS + layout.GPU_TUNING + tiles; the file's own values are the CPU ones)
        kernel = Megakernel.from_file(self.kernel_paths[kernel_name], num_warps=self.num_warps,
                                      constexprs=consts)
        records, queue = L.pack_records(queues, self.device)
        return StepProgram(kernel, records, queue, new_counters(len(tp.counters), self.device),
                           new_errors(len(queues), self.device), list(tp.counters), names,
                           task_ops=ops, cuda_graph=self.cuda_graph)

    @torch.no_grad()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """fp32 logits [V] the target gives after the prompt (the prefill kernel's last row)."""
        self._set_state(temp_bits=0, top_p_bits=L.float_bits(1.0), seed=0)
        last = self._prefill_rows([int(t) for t in prompt_ids])
        return self.arenas.view("tile.logits")[last].clone()

    # -- generation ----------------------------------------------------------------------------
    def _set_state(self, **fields):
        state = self.arenas.view("state")
        for name, value in fields.items():
            state[L.STATE[name]] = value

    def _prefill(self, prompt_ids: list[int]) -> int:
        """Run the prompt in chunks; return the first new token (position len(prompt))."""
        last = self._prefill_rows(prompt_ids)
        return int(self.arenas.view("tile.next_tokens")[last].item())

    def _prefill_rows(self, prompt_ids: list[int]) -> int:
        """Run the prompt through the compiled prefill chunk (T rows per launch, the last chunk
        ending at the prompt's end: see the module docstring); return the prompt's last row."""
        ids = self.arenas.view("tile.ids")
        n, rows = len(prompt_ids), ids.shape[0]
        step = self.step_program("prefill")
        for start in range(0, n, rows):
            start = max(0, min(start, n - rows))
            chunk = prompt_ids[start:start + rows]
            ids.zero_()
            ids[:len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
            self._set_state(pos=start)
            step.launch(self.arenas)
            step.check()
        return n - 1 - start

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_draft: bool = True,
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        prompt_ids = [int(t) for t in prompt_ids]
        ReferenceEngine.check_request(self, prompt_ids, max_new_tokens, use_draft)
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise TilecompError(f"sampling: expected temperature >= 0 and 0 < top_p <= 1, "
                                f"found temperature={temperature}, top_p={top_p}")
        out = _Output(max_new_tokens, on_tokens)
        result = GenerationResult(tokens=out.tokens)
        self.warmup(use_draft)                  # kernel builds are not generation time
        start = time.perf_counter()
        if max_new_tokens > 0:
            seed32 = int(seed) & 0xFFFFFFFF                 # the low 32 bits, as int32 bits
            self._set_state(temp_bits=L.float_bits(temperature), top_p_bits=L.float_bits(top_p),
                            seed=seed32 - 2 ** 32 if seed32 >= 2 ** 31 else seed32)
            self._decode(prompt_ids, out, use_draft, result.acceptance)
        result.elapsed_s = time.perf_counter() - start
        return result

    def warmup(self, use_draft: bool = True):
        """Build the step kernels a generation runs (prefill + DFlash or plain step) on a GPU."""
        for kind in ("prefill", "dflash" if use_draft and self.dcfg is not None else "plain"):
            self.step_program(kind).warmup(self.arenas)

    def _decode(self, prompt_ids, out: _Output, use_draft: bool, acceptance: list[int]):
        first = self._prefill(prompt_ids)
        out.emit([first])
        n = len(prompt_ids)
        self._set_state(pos=n, last=first, n_ctx=0, ctx_pos=n)
        block = self.arenas.view("block")           # [last, MASK x (S-1)] (plain: [last])
        block.fill_(self.dcfg.mask_token_id if use_draft else 0)
        block[0] = first
        step = self.step_program("dflash" if use_draft else "plain")
        state, tokens = self.arenas.view("state"), self.arenas.view("out_tokens")
        while not out.done:
            step.launch(self.arenas)
            committed = step.read_back(state[L.STATE["n_out"]:L.STATE["n_out"] + 1], tokens)
            out.emit(committed[1:1 + committed[0]])
            if use_draft:
                acceptance.append(committed[0] - 1)


def _load_schedule(schedule):
    if schedule is None or not isinstance(schedule, (str, bytes)) and not hasattr(schedule, "__fspath__"):
        return schedule
    from tilecomp.ir.tile import parse_tile
    with open(schedule) as f:
        return parse_tile(f.read())
