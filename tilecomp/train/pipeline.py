"""End-to-end steps behind `tilecomp train ...`: each step reads and writes folders.

    data    stdlib -> DATA/ (tokenizer.json, train/heldout/prose ids)
    target  DATA -> TRUN/ (state.pt, loss curve); when done, TRUN/checkpoint/
            (MXFP4 target + tokenizer) and TRUN/quantization.json (bf16 vs MXFP4 loss)
    draft   DATA + target checkpoint -> DRUN/ (sequences.pt, state.pt, loss curve);
            when done, OUT/ (target + draft + tokenizer) and DRUN/acceptance.json
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from tilecomp.errors import TilecompError
from tilecomp.models.checkpoint import load_pretrained, save_pretrained
from tilecomp.models.dflash import DFlashDraft

from . import configs, evaluate, loop
from . import draft as draft_mod
from . import target as target_mod
from .data import load_data, random_windows
from .mixed import use_mixed_experts

SHARD_BYTES = 12 * 2**20          # every shipped file stays under 16 MiB


def _configs(size: str, vocab_size: int):
    if size not in configs.CONFIGS:
        raise TilecompError(f"--size: expected one of {sorted(configs.CONFIGS)}, found {size!r}")
    return configs.CONFIGS[size](vocab_size)


def run_target(data_dir, run_dir, size: str, budget: loop.Budget, settings: target_mod.TargetSettings,
               device=None, progress: bool = True, eval_windows: int = 128) -> dict:
    data = load_data(data_dir)
    tcfg, _ = _configs(size, data.vocab_size)
    device = loop.pick_device(device)
    result = target_mod.train_target(tcfg, data, run_dir, budget, settings, device, progress)
    summary = {"done": result["done"], "step": result["step"]}
    if result["done"]:
        trained = result["model"]
        packed = target_mod.to_mxfp4(trained)
        losses = evaluate.quantization_losses(trained, packed, data, device, settings.seq_len, eval_windows)
        ckpt = Path(run_dir) / "checkpoint"
        save_pretrained(packed.cpu(), None, ckpt, shard_size=SHARD_BYTES)
        shutil.copy(Path(data_dir) / "tokenizer.json", ckpt / "tokenizer.json")
        summary.update(heldout_loss=losses, checkpoint=str(ckpt))
        loop.write_json(Path(run_dir) / "quantization.json", summary)
    return summary


def _sequences(target, data, run_dir: Path, s: draft_mod.DraftSettings, gen_minutes: float,
               device, progress: bool) -> torch.Tensor:
    """Greedy continuations by the target, cached in DRUN/sequences.pt (generated once)."""
    path = run_dir / "sequences.pt"
    if path.is_file():
        return torch.load(path)
    gen = torch.Generator().manual_seed(s.seed + 1)
    deadline = time.monotonic() + 60.0 * gen_minutes
    chunks, made = [], 0
    while made < s.sequences and time.monotonic() < deadline:
        n = min(s.gen_batch, s.sequences - made)
        prompts = random_windows(data.train, n, s.prompt_len, gen)
        chunks.append(draft_mod.greedy_continue(target, prompts, s.new_tokens, device).cpu())
        made += n
        if progress:
            print(f"generated {made}/{s.sequences} sequences", flush=True)
    sequences = torch.cat(chunks).to(torch.int32 if data.vocab_size > 2**15 else torch.int16)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sequences, path)
    return sequences


def run_draft(data_dir, target_ckpt, run_dir, out_dir, size: str, budget: loop.Budget,
              s: draft_mod.DraftSettings, gen_minutes: float = 1.5, device=None, progress: bool = True,
              eval_prompts: int = 24, eval_new_tokens: int = 128) -> dict:
    data = load_data(data_dir)
    device = loop.pick_device(device)
    run_dir = Path(run_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32     # CPU: fp32 is faster
    target, _ = load_pretrained(target_ckpt, dtype=dtype, device=device)
    if target_mod.resolve_moe("auto", device) == "mixed":   # generation and taps: experts
        use_mixed_experts(target)                            # dequantized once, no host syncs
    _, dcfg = _configs(size, data.vocab_size)
    sequences = _sequences(target, data, run_dir, s, gen_minutes, device, progress).long()
    torch.manual_seed(s.seed)
    draft = DFlashDraft(dcfg, target.config)
    result = draft_mod.train_draft(draft, target, sequences, run_dir, budget, s, device, progress)
    summary = {"done": result["done"], "step": result["step"], "sequences": len(sequences)}
    val = result["history"].extra.get("val_accepted")
    if val:      # teacher-forced on held-out continuations: near the train figure = no overfitting
        summary["validation"] = {"step": val[-1][0], "accepted_drafted": val[-1][1],
                                 "loss": result["history"].heldout[-1][1]}
    if result["done"]:
        draft = draft.to(torch.bfloat16).eval()
        out_dir = Path(out_dir)
        # the shipped target is the bf16 checkpoint as trained (the CPU run computes in fp32,
        # which would double the non-expert bytes on disk)
        shipped, _ = load_pretrained(target_ckpt, dtype=torch.bfloat16, device="cpu")
        save_pretrained(shipped, draft.cpu(), out_dir, shard_size=SHARD_BYTES)
        shutil.copy(Path(data_dir) / "tokenizer.json", out_dir / "tokenizer.json")
        target, draft = load_pretrained(out_dir, dtype=dtype, device=device)
        summary["acceptance"] = evaluate.evaluate_acceptance(target, draft, data, eval_prompts,
                                                             new_tokens=eval_new_tokens)
        loop.write_json(run_dir / "acceptance.json", summary)
    return summary


def describe(summary: dict) -> str:
    return json.dumps(summary, indent=1)
