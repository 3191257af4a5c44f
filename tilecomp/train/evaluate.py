"""Measurements of the trained model.

- Held-out loss (nats/token) of the bf16 model (the trained weights, experts
  NOT quantized) and of the MXFP4 model (experts packed, as shipped).
- Mean acceptance per DFlash step (block 8, greedy, reference engine): tokens
  committed per step = accepted drafted tokens + 1, averaged over all steps
  of all prompts; prompts are windows of held-out stdlib files and of the
  prose set (docstrings and comments of those files).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from tilecomp.runtime.reference import ReferenceEngine

from . import target as target_mod
from .data import TokenData, document_starts
from .tokenizer import load_tokenizer


def bf16_model(trained):
    """The trained weights in bf16 with experts left unquantized."""
    model = copy.deepcopy(trained)
    target_mod.set_fake_quant(model, False)
    return model.to(torch.bfloat16)


def quantization_losses(trained, packed, data: TokenData, device, seq_len: int = 512,
                        windows: int = 128) -> dict:
    """{"bf16": loss, "mxfp4": loss} on the same held-out windows."""
    out = {}
    for name, model in (("bf16", bf16_model(trained)), ("mxfp4", packed)):
        model = model.to(device).eval()
        out[name] = target_mod.heldout_loss(model, data.heldout, seq_len, windows, device)
    return out


def sample_prompts(stream: np.ndarray, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """n prompts of prompt_len ids from distinct documents at random offsets (never crossing EOS)."""
    rng = np.random.default_rng(seed)
    starts = document_starts(stream)
    ends = starts[1:] + [len(stream) + 1]
    docs = [(s, e - 1) for s, e in zip(starts, ends) if e - 1 - s > prompt_len + 8]
    picks = rng.choice(len(docs), size=min(n, len(docs)), replace=False)
    prompts = []
    for i in sorted(picks.tolist()):
        s, e = docs[i]
        offset = int(rng.integers(s, e - prompt_len))
        prompts.append([int(t) for t in stream[offset:offset + prompt_len]])
    return prompts


def distinct_lines(text: str) -> float:
    """Fraction of the non-blank lines of `text` that are distinct (stripped): 1.0 for text that
    never repeats a line, near 0 for a greedy loop. A cheap repetition measure of continuations."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return len(set(lines)) / len(lines) if lines else 1.0


@torch.no_grad()
def acceptance(target, draft, prompts: list[list[int]], new_tokens: int, max_len: int = 1024,
               tokenizer=None) -> dict:
    """Mean tokens per DFlash step over all prompts, with the reference engine; with a tokenizer,
    also the mean `distinct_lines` of the greedy continuations (how much the target repeats itself)."""
    return acceptance_of(ReferenceEngine(target, draft, max_len=max_len), prompts, new_tokens,
                         draft.config.block_size, tokenizer)


@torch.no_grad()
def acceptance_of(engine, prompts: list[list[int]], new_tokens: int, block_size: int, tokenizer=None) -> dict:
    """`acceptance` with any engine that has `generate` (the reference or the megakernel engine):
    greedy DFlash generation of `new_tokens` after each prompt."""
    steps, accepted, committed, seconds = 0, 0, 0, 0.0
    histogram = [0] * block_size
    distinct = []
    for prompt in prompts:
        result = engine.generate(prompt, new_tokens, temperature=0.0)
        if tokenizer is not None:
            distinct.append(distinct_lines(tokenizer.decode(result.tokens)))
        steps += len(result.acceptance)
        accepted += sum(result.acceptance)
        committed += len(result.acceptance) + sum(result.acceptance)
        seconds += result.elapsed_s
        for a in result.acceptance:
            histogram[a] += 1
    out = {"prompts": len(prompts), "steps": steps,
           "mean_acceptance": committed / max(1, steps),
           "mean_accepted_drafted": accepted / max(1, steps),
           "accepted_histogram": histogram, "seconds": seconds}
    if distinct:
        out["distinct_lines"] = float(np.mean(distinct))
    return out


def evaluate_acceptance(target, draft, data: TokenData, n_prompts: int = 24, prompt_len: int = 64,
                        new_tokens: int = 128, seed: int = 0) -> dict:
    out = {}
    tokenizer = None
    if data.folder is not None and (Path(data.folder) / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(Path(data.folder) / "tokenizer.json")
    for split in ("heldout", "prose"):
        start = time.perf_counter()
        prompts = sample_prompts(data.split(split), n_prompts, prompt_len, seed)
        out[split] = acceptance(target, draft, prompts, new_tokens, tokenizer=tokenizer)
        out[split]["wall_s"] = time.perf_counter() - start
    return out
