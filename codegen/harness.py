"""Render and run a megakernel holding a chosen set of task kinds on given buffers.

Used by the runtime and by the per-kind tests: build TaskRecords by hand,
put the tensors in an ArenaBuilder, call `run_tasks`. Example:

    b = ArenaBuilder(torch.float32)
    b.add("x", x, "f32"); b.add("w", w, "w"); b.reserve("y", (T, N), "f32")
    arenas = b.build()
    rec = TaskRecord("linear", task=0, args=dict(x=b.offset("x"), ...), signals=[0])
    run_tasks([[rec]], arenas, constexprs=dict(BLOCK_T=8, BLOCK_N=32, BLOCK_K=32))
    y = arenas.view("y")
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tilecomp.errors import DeadlockError
from tilecomp.runtime.buffers import Arenas

from . import layout as L
from .build import GPU_SPINS, mma_v2_build
from .triton_gen import generate_kernel, kernel_of, load_kernel_file, load_kernel_module

# Under the interpreter programs run one after another, so a wait that is not
# met at once never will be; on a GPU a wait spins up to ~seconds.
INTERPRETER_SPINS = 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Megakernel:
    """One generated, loaded kernel plus what a launch needs."""
    source: str
    module: object
    constexprs: dict
    spin_limit: int
    num_warps: int = 4           # warps per persistent program (one program per SM)

    @classmethod
    def build(cls, kinds, constexprs: dict, name: str = "decode_step", spin_limit=None,
              cache_dir=None, num_warps: int = 4) -> "Megakernel":
        source = generate_kernel(kinds, name=name, constexprs=constexprs)
        module = load_kernel_module(source, cache_dir)
        spins = spin_limit or (INTERPRETER_SPINS if interpreting() else GPU_SPINS)
        return cls(source, module, dict(module.CONSTEXPRS), spins, num_warps)

    @classmethod
    def from_file(cls, path, spin_limit=None, num_warps: int = 4, constexprs: dict | None = None) -> "Megakernel":
        """A generated kernel written earlier (tilecomp compile --out, or the cache), launched
        with its recorded CONSTEXPRS updated by `constexprs` (tile sizes are launch arguments)."""
        source = Path(path).read_text()
        module = load_kernel_file(path)
        unknown = set(constexprs or {}) - set(module.CONSTEXPRS)
        if unknown:
            raise ValueError(f"{path}: the kernel has no tile size(s) {sorted(unknown)}")
        spins = spin_limit or (INTERPRETER_SPINS if interpreting() else GPU_SPINS)
        return cls(source, module, dict(module.CONSTEXPRS, **(constexprs or {})), spins, num_warps)

    @property
    def kernel(self):
        return kernel_of(self.module)

    def _arguments(self, records, queue, counters, errors, epoch: int, arenas: Arenas, trace=None,
                   epoch_buf=None):
        """(positional, keyword) arguments of one launch: the ABI of the generated kernel. epoch 0
        has the kernel read the step number from `epoch_buf` (int32 [1]) instead."""
        if epoch == 0 and epoch_buf is None:
            raise ValueError("epoch 0 reads the step number from epoch_buf: pass one")
        args = (records, queue, counters, errors, trace if trace is not None else errors, epoch,
                epoch_buf if epoch_buf is not None else counters, *arenas.pointers())
        kwargs = dict(SPIN_LIMIT=self.spin_limit, TRACE=trace is not None, num_warps=self.num_warps,
                      **self.constexprs)
        return args, kwargs

    def launch(self, records, queue, counters, errors, epoch: int, arenas: Arenas, trace=None,
               epoch_buf=None):
        """trace: int64 [n_tasks + programs, layout.TRACE_WORDS] to receive each task's (start,
        wait done, work done, signalled) globaltimer stamps, then each program's (entry, 0, 0,
        exit) (GPU only); None builds the kernel without timers. epoch 0: the step number is
        epoch_buf[0] on the device (what a launch recorded in a CUDA graph passes)."""
        if trace is not None and interpreting():
            raise ValueError("task tracing needs a GPU (the interpreter has no %globaltimer)")
        args, kwargs = self._arguments(records, queue, counters, errors, epoch, arenas, trace, epoch_buf)
        with mma_v2_build(self.constexprs):      # a first launch (e.g. a traced one) builds
            self.kernel[(queue.numel() - 1,)](*args, **kwargs)

    def warmup(self, records, queue, counters, errors, arenas: Arenas, epoch_buf=None):
        """Build (JIT-compile) the kernel for these arguments without running it (GPU; the
        interpreter compiles nothing), so a timed generation does not pay the build."""
        if interpreting():
            return
        args, kwargs = self._arguments(records, queue, counters, errors, 1, arenas, epoch_buf=epoch_buf)
        with mma_v2_build(self.constexprs):
            compiled = self.kernel.warmup(*args, grid=(queue.numel() - 1,), **kwargs)
        load = getattr(compiled, "_init_handles", None)    # load the module now, not at step 1
        if callable(load):
            load()


def new_counters(n_counters: int, device="cpu") -> torch.Tensor:
    return torch.zeros(max(n_counters, 1) * L.COUNTER_STRIDE, dtype=torch.int32, device=device)


def new_errors(programs: int, device="cpu") -> torch.Tensor:
    return torch.zeros(programs, L.ERROR_WORDS, dtype=torch.int64, device=device)


def counter_values(counters: torch.Tensor) -> torch.Tensor:
    return counters.view(-1, L.COUNTER_STRIDE)[:, 0]


def raise_on_timeout(errors: torch.Tensor, epoch: int, task_names=None, counter_names=None):
    """Raise DeadlockError naming (task, counter, value, target) of every timed-out program."""
    rows = errors.cpu().tolist()
    failed = [(p, r) for p, r in enumerate(rows) if r[0]]
    if not failed:
        return
    lines = []
    for program, (_, task, counter, value, need) in failed:
        tname = task_names[task] if task_names else f"t{task}"
        if counter <= -2:       # a body's own wait (expert_down under XQUEUE: a slot's count)
            lines.append(f"program {program}: task {task} ({tname}) waited in its body on slot "
                         f"{-2 - counter}'s up_gate units done (the expert queue's sync buffer): "
                         f"value {value}, target {need}")
            continue
        cname = counter_names[counter] if counter_names else f"c{counter}"
        lines.append(f"program {program}: task {task} ({tname}) waited on counter {counter} "
                     f"({cname}): value {value}, target {need}")
    shown = 8
    more = f" | ... and {len(lines) - shown} more" if len(lines) > shown else ""
    hint = ""
    if len(failed) > len(rows) // 2:
        hint = (f"; {len(failed)} of {len(rows)} programs timed out: if the tasks they wait on were "
                "never started, the programs may not all fit on the GPU at once (fewer programs or "
                "warps, or a smaller tile)")
    raise DeadlockError(f"megakernel step {epoch}: {len(failed)} bounded wait(s) timed out; "
                        "first: " + lines[0] + ("; all: " + " | ".join(lines[:shown]) + more
                                                if len(lines) > 1 else "") + hint)


def run_tasks(queues: list[list[L.TaskRecord]], arenas: Arenas, constexprs: dict,
              n_counters: int | None = None, counters: torch.Tensor | None = None,
              epoch: int = 1, kinds=None, spin_limit=None) -> torch.Tensor:
    """Run the given per-program queues once; return the counters (pass them back for epoch + 1).

    Raises DeadlockError when a wait times out.
    """
    device = arenas.data["f32"].device
    all_records = [r for q in queues for r in q]
    kinds = sorted(set(kinds or [r.kind for r in all_records]))
    constexprs = L.fit_act_alignment(constexprs, queues)
    kernel = Megakernel.build(kinds, constexprs, spin_limit=spin_limit)
    records, queue = L.pack_records(queues, device)
    if counters is None:
        used = [c for r in all_records for c in r.signals + [w[0] for w in r.waits]]
        counters = new_counters(n_counters or (max(used) + 1 if used else 1), device)
    errors = new_errors(len(queues), device)
    kernel.launch(records, queue, counters, errors, epoch, arenas)
    names = {r.task: r.kind for r in all_records}
    raise_on_timeout(errors, epoch, task_names=names)
    return counters
