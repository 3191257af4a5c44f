"""MegakernelEngine: generation with ONE persistent-kernel launch per decode step.

The engine owns the typed arenas (weights, KV caches, activations, step state),
the scoreboard counters of each step program and its task queues. A DFlash step
(draft context + draft forward + target verify + acceptance + next-step state)
is one launch of the `decode_step` kernel; the host then reads the step's
committed tokens (its only synchronisation). The prompt runs through the
`prefill_chunk` kernel, one launch per chunk of at most `block` tokens.
Counters are never reset: each program's launches use epoch targets 1, 2, ...

Given the compiler's output (`compile_model`: `schedule`, `prefill_schedule`,
`plain_schedule`), the DFlash step, the prompt's chunks and the plain (no-draft)
step run the compiled tile programs. A
compiled chunk has a static T rows: the last chunk is the prompt's last T tokens
(it recomputes rows the previous chunk wrote, rewriting their K/V with the same
values), so no K/V lands past the prompt; a prompt shorter than T is padded, and
its extra rows write K/V only at positions the first decode step rewrites before
reading them (as it does for rejected draft positions).

Same interface as ReferenceEngine (docs/INTERFACES.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from tilecomp.codegen import layout as L
from tilecomp.codegen.kernels import ENGINE_KINDS, constexprs_for, kernel_files, step_rows
from tilecomp.codegen.harness import (Megakernel, interpreting, new_counters, new_errors,
                                      raise_on_timeout)
from tilecomp.errors import TilecompError

from .buffers import ArenaBuilder
from .compiled import RecordBuilder, reserve_buffers, tile_constexprs
from .plan import StepPlanner, reserve_activations
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
    epoch: int = 0

    def launch(self, arenas, trace=None):
        self.epoch += 1
        self.kernel.launch(self.records, self.queue, self.counters, self.errors, self.epoch, arenas,
                           trace=trace)

    def new_trace(self) -> torch.Tensor:
        """A buffer for `launch(trace=...)`: int64 [n_tasks, 3] globaltimer stamps."""
        return torch.zeros(self.records.shape[0], 3, dtype=torch.int64, device=self.records.device)

    def check(self):
        raise_on_timeout(self.errors, self.epoch, self.task_names, self.counter_names)


class MegakernelEngine:
    def __init__(self, target, draft=None, max_len: int = 4096, programs: int | None = None,
                 artifacts=None, cache_dir=None, chunk_len: int | None = None, schedule=None,
                 num_warps: int = 4, tiles: dict | None = None, qkv_q_heads: int | None = -1,
                 prefill_schedule=None, plain_schedule=None):
        """artifacts: a `tilecomp compile --out` directory whose kernels/ to use; otherwise the
        kernels are generated once and cached (cache_dir, default ~/.cache/tilecomp).
        schedule: a scheduled TileProgram (or the path of a schedule.ir) from `tilecomp compile`
        (same max_len) to run as the DFlash step instead of the engine's own stage plan, or the
        whole `Compiled` of `compile_model`, whose prefill_schedule then runs the prompt and whose
        plain_schedule runs plain decoding (use_draft=False).
        prefill_schedule / plain_schedule: a scheduled prefill chunk / plain step (TileProgram or
        path) to run the prompt / plain decoding.
        Tuning switches (tilecomp bench measures each): num_warps per program; tiles overrides
        tile sizes (e.g. {"BLOCK_K": 256}); qkv_q_heads query heads per qkv task in the engine's
        own plans (None: a whole KV group per task; -1: 1 on a GPU, None in the interpreter)."""
        self.target, self.draft, self.config = target, draft, target.config
        self.max_len = max_len
        self.dcfg = draft.config if draft is not None else None
        self.rows = self.block = step_rows(self.dcfg)     # prefill chunk = block rows
        self.device = target.lm_head.weight.device
        self.programs = programs or (1 if interpreting() else
                                     torch.cuda.get_device_properties(self.device).multi_processor_count)
        wdtype = torch.float32 if interpreting() else target.lm_head.weight.dtype
        builder = ArenaBuilder(wdtype)
        add_weights(builder, target, draft)
        # KV positions per flash-decoding partial: the interpreter runs one chunk per head
        # (fewer tasks); a GPU splits the context so the partials fill the SMs
        self.chunk_len = chunk_len or (None if interpreting() else 256)
        reserve_activations(builder, self.config, self.dcfg, self.rows, max_len, self.block,
                            self.chunk_len)
        if hasattr(schedule, "prefill_schedule"):           # a Compiled: all of its programs
            plain_schedule = plain_schedule or getattr(schedule, "plain_schedule", None)
            schedule, prefill_schedule = schedule.schedule, prefill_schedule or schedule.prefill_schedule
        self.schedule = _load_schedule(schedule)
        self.prefill_schedule = _load_schedule(prefill_schedule)
        self.plain_schedule = _load_schedule(plain_schedule)
        compiled = [tp for tp in (self.schedule, self.prefill_schedule, self.plain_schedule)
                    if tp is not None]
        if compiled:
            reserve_buffers(builder, *compiled)
        self.builder = builder
        self.arenas = builder.build(self.device)
        self.consts = constexprs_for(self.config, self.dcfg, self.rows)
        unknown = set(tiles or {}) - set(self.consts)
        if unknown:
            raise TilecompError(f"tiles: unknown tile size(s) {sorted(unknown)}; expected some of "
                                f"{sorted(self.consts)}")
        self.tiles = dict(tiles or {})
        self.consts.update(self.tiles)
        self.num_warps = num_warps
        self.qkv_q_heads = (None if interpreting() else 1) if qkv_q_heads == -1 else qkv_q_heads
        self.kernel_paths = kernel_files(self.config, self.dcfg, artifacts, cache_dir)
        self._kernels: dict[str, Megakernel] = {}
        self._steps: dict[tuple, StepProgram] = {}

    # -- step programs -------------------------------------------------------------------------
    def kernel(self, name: str) -> Megakernel:
        if name not in self._kernels:
            if self.tiles:                   # tile overrides: not the cached default build
                self._kernels[name] = Megakernel.build(ENGINE_KINDS, self.consts, name=name,
                                                       num_warps=self.num_warps)
            else:
                self._kernels[name] = Megakernel.from_file(self.kernel_paths[name],
                                                           num_warps=self.num_warps)
        return self._kernels[name]

    def _planner(self, rows: int) -> StepPlanner:
        return StepPlanner(self.builder, self.config, self.dcfg, rows, self.rows, self.max_len,
                           self.consts, self.chunk_len, self.qkv_q_heads)

    def _pack(self, kernel_name: str, planner: StepPlanner) -> StepProgram:
        queues, counter_names, task_names = planner.stages.queues(self.programs)
        records, queue = L.pack_records(queues, self.device)
        return StepProgram(self.kernel(kernel_name), records, queue,
                           new_counters(len(counter_names), self.device),
                           new_errors(self.programs, self.device), counter_names, task_names)

    def step_program(self, kind: str, rows: int = 0) -> StepProgram:
        key = (kind, rows)
        if key not in self._steps:
            build = {"dflash": self._plan_dflash, "plain": self._plan_plain,
                     "prefill": self._plan_prefill}[kind]
            self._steps[key] = build(rows)
        return self._steps[key]

    def _plan_dflash(self, _rows) -> StepProgram:
        if self.schedule is not None:
            return self._compiled_dflash()
        p = self._planner(self.block)
        p.draft_context(rows=p.st + L.STATE["n_ctx"])
        p.draft_block()
        h = p.target_forward(p.o("block"), taps=True)
        self._verify_and_accept(p, h, self.block)
        return self._pack("decode_step", p)

    def _compiled_dflash(self) -> StepProgram:
        """The compiler's scheduled DFlash step."""
        return self._compiled(self.schedule, "decode_step")

    def _compiled(self, tp, kernel_name: str) -> StepProgram:
        """A compiler-scheduled tile program (its queues, counters and tile sizes)."""
        queues = RecordBuilder(self.builder, tp).queues()
        kernel = Megakernel.build(ENGINE_KINDS, tile_constexprs(tp, self.consts), name=kernel_name,
                                  num_warps=self.num_warps)
        records, queue = L.pack_records(queues, self.device)
        return StepProgram(kernel, records, queue, new_counters(len(tp.counters), self.device),
                           new_errors(len(queues), self.device), list(tp.counters),
                           {t.id: f"{t.kind} {t.name}" for t in tp.tasks})

    def _plan_plain(self, _rows) -> StepProgram:
        if self.plain_schedule is not None:
            return self._compiled(self.plain_schedule, "decode_step")
        p = self._planner(1)
        h = p.target_forward(p.o("block"), taps=False)
        self._verify_and_accept(p, h, 1)
        return self._pack("decode_step", p)

    def _verify_and_accept(self, p: StepPlanner, h: str, n_block: int):
        p.head("lm_head", p.o(h), p.o("model.norm.weight"), p.o("post_tok"), pos_shift=1,
               rows_n=n_block, eps=p.eps)
        p.stages.add("accept", [L.TaskRecord("accept", 0, dict(
            state=p.st, draft_tok=p.o("block") + 1, post_tok=p.o("post_tok"), n_block=n_block,
            out_tokens=p.o("out_tokens"), block=p.o("block"),
            draft_block=p.o("draft_block") if self.draft is not None else -1, mask_id=-1))])

    def _plan_prefill(self, rows: int) -> StepProgram:
        if self.prefill_schedule is not None:
            return self._compiled(self.prefill_schedule, "prefill_chunk")
        p = self._planner(rows)
        h = p.target_forward(p.o("prompt"), taps=self.draft is not None)
        if self.draft is not None:
            p.draft_context(rows_n=rows, pos_field="pos")
        p.head("lm_head", p.o(h) + (rows - 1) * self.config.hidden_size, p.o("model.norm.weight"),
               p.o("post_tok"), pos_shift=rows, rows_n=1, eps=p.eps)
        return self._pack("prefill_chunk", p)

    @torch.no_grad()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """fp32 logits [V] the target gives after the prompt (the prefill kernel's last row)."""
        self._set_state(temp_bits=0, top_p_bits=L.float_bits(1.0), seed=0)
        if self.prefill_schedule is not None:
            last = self._compiled_prefill([int(t) for t in prompt_ids])
            return self.arenas.view("tile.logits")[last].clone()
        self._prefill([int(t) for t in prompt_ids])
        return self.arenas.view("logits")[0].clone()

    # -- generation ----------------------------------------------------------------------------
    def _set_state(self, **fields):
        state = self.arenas.view("state")
        for name, value in fields.items():
            state[L.STATE[name]] = value

    def _prefill(self, prompt_ids: list[int]) -> int:
        """Run the prompt in chunks; return the first new token (position len(prompt))."""
        if self.prefill_schedule is not None:
            last = self._compiled_prefill(prompt_ids)
            return int(self.arenas.view("tile.next_tokens")[last].item())
        for start in range(0, len(prompt_ids), self.rows):
            chunk = prompt_ids[start:start + self.rows]
            self.arenas.view("prompt")[:len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
            self._set_state(pos=start)
            step = self.step_program("prefill", len(chunk))
            step.launch(self.arenas)
            step.check()
        return int(self.arenas.view("post_tok")[0].item())

    def _compiled_prefill(self, prompt_ids: list[int]) -> int:
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
        start = time.perf_counter()
        if max_new_tokens > 0:
            seed32 = int(seed) & 0xFFFFFFFF                 # the low 32 bits, as int32 bits
            self._set_state(temp_bits=L.float_bits(temperature), top_p_bits=L.float_bits(top_p),
                            seed=seed32 - 2 ** 32 if seed32 >= 2 ** 31 else seed32)
            self._decode(prompt_ids, out, use_draft, result.acceptance)
        result.elapsed_s = time.perf_counter() - start
        return result

    def _decode(self, prompt_ids, out: _Output, use_draft: bool, acceptance: list[int]):
        first = self._prefill(prompt_ids)
        out.emit([first])
        n = len(prompt_ids)
        self._set_state(pos=n, last=first, n_ctx=0, ctx_pos=n)
        for name in ("block", "draft_block") if use_draft else ("block",):
            block = self.arenas.view(name)          # [last, MASK x (S-1)]
            block.fill_(self.dcfg.mask_token_id if use_draft else 0)
            block[0] = first
        step = self.step_program("dflash" if use_draft else "plain")
        state, tokens = self.arenas.view("state"), self.arenas.view("out_tokens")
        while not out.done:
            step.launch(self.arenas)
            committed = torch.cat([state[L.STATE["n_out"]:L.STATE["n_out"] + 1], tokens]).tolist()
            step.check()
            out.emit(committed[1:1 + committed[0]])
            if use_draft:
                acceptance.append(committed[0] - 1)


def _load_schedule(schedule):
    if schedule is None or not isinstance(schedule, (str, bytes)) and not hasattr(schedule, "__fspath__"):
        return schedule
    from tilecomp.ir.tile import parse_tile
    with open(schedule) as f:
        return parse_tile(f.read())
