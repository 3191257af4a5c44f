"""Eager PyTorch engine: prefill, then the DFlash decode loop (or plain decoding).

It is the numerical reference the megakernel engine is checked against, so it
follows docs/INTERFACES.md literally. One DFlash step, with p the position of
the last committed token (which the target has not processed yet):

    block        = [last, MASK x (S-1)]              at positions p..p+S-1
    block[1:]    = sample(draft logits[1:], p+1..p+S-1)
    posterior[j] = sample(target logits of block[j], position p+j+1)
    acc          = longest prefix with block[1+j] == posterior[j]
    commit block[1:acc+1] and posterior[acc]        (acc + 1 new tokens)
    crop the target cache to p+acc+1; the draft cache holds context < p'

With temperature 0 the output equals the target's own token-by-token greedy
decoding; with sampling it equals plain sampled decoding with the same seed
(up to floating-point differences between the block and one-token forwards),
because every token comes from `sample(target logits, its position)`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tilecomp.errors import TilecompError
from tilecomp.models.sampling import sample


@dataclass
class GenerationResult:
    tokens: list[int]                                   # new tokens only
    acceptance: list[int] = field(default_factory=list)  # accepted draft tokens per DFlash step
    elapsed_s: float = 0.0

    @property
    def mean_acceptance(self) -> float:
        """Mean tokens committed per decode step (acceptance + 1); plain decoding: 1.0."""
        if not self.acceptance:
            return 1.0
        return sum(a + 1 for a in self.acceptance) / len(self.acceptance)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "acceptance": self.acceptance,
                "mean_acceptance": self.mean_acceptance, "tokens_per_s": self.tokens_per_s,
                "elapsed_s": self.elapsed_s}


class _Output:
    """Collects new tokens up to the budget and streams each committed batch."""

    def __init__(self, budget: int, on_tokens: Callable[[list[int]], None] | None):
        self.tokens: list[int] = []
        self.budget = budget
        self.on_tokens = on_tokens

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.budget

    def emit(self, new: list[int]):
        new = new[: self.budget - len(self.tokens)]
        if new:
            self.tokens.extend(new)
            if self.on_tokens is not None:
                self.on_tokens(list(new))


class ReferenceEngine:
    def __init__(self, target, draft=None, max_len: int = 4096):
        self.target = target
        self.draft = draft
        self.max_len = max_len
        self.config = target.config

    @property
    def device(self):
        return self.target.lm_head.weight.device

    def check_request(self, prompt_ids, max_new_tokens: int, use_draft: bool):
        vocab = self.config.vocab_size
        if not prompt_ids:
            raise TilecompError("prompt: expected at least one token, found an empty prompt")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise TilecompError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if max_new_tokens < 0:
            raise TilecompError(f"max_new_tokens: expected >= 0, found {max_new_tokens}")
        if use_draft and self.draft is None:
            raise TilecompError("the checkpoint has no DFlash draft (dflash/): decode without it "
                                "(use_draft=False, CLI --no-draft)")
        limit = min(self.max_len, self.config.max_position_embeddings)
        block = self.draft.config.block_size if use_draft else 1
        need = len(prompt_ids) + max_new_tokens + block
        if need > limit:                                   # need > len(prompt_ids): block >= 1
            raise TilecompError(
                f"prompt: {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} + block {block} "
                f"= {need} positions, more than the max positions {limit} "
                f"(engine max_len={self.max_len}, config max_position_embeddings="
                f"{self.config.max_position_embeddings})")

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_draft: bool = True,
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_request(prompt_ids, max_new_tokens, use_draft)
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise TilecompError(f"sampling: expected temperature >= 0 and 0 < top_p <= 1, "
                                f"found temperature={temperature}, top_p={top_p}")
        pick = lambda logits, pos: sample(logits, pos, temperature, top_p, seed)  # noqa: E731
        out = _Output(max_new_tokens, on_tokens)
        result = GenerationResult(tokens=out.tokens)
        start = time.perf_counter()
        if max_new_tokens > 0:
            if use_draft:
                self._decode_dflash(prompt_ids, out, pick, result.acceptance)
            else:
                self._decode_plain(prompt_ids, out, pick)
        result.elapsed_s = time.perf_counter() - start
        return result

    def _prompt_tensor(self, prompt_ids):
        return torch.tensor([prompt_ids], dtype=torch.long, device=self.device)

    def _decode_plain(self, prompt_ids, out: _Output, pick):
        """Token by token: each step feeds the last token and samples the next."""
        cache = self.target.new_cache(1, self.max_len)
        logits = self.target(self._prompt_tensor(prompt_ids), cache=cache, start_pos=0)
        p = len(prompt_ids)                                # position of the token being chosen
        last = int(pick(logits[0, -1], p))
        out.emit([last])
        while not out.done:
            logits = self.target(torch.tensor([[last]], device=self.device), cache=cache, start_pos=p)
            p += 1
            last = int(pick(logits[0, -1], p))
            out.emit([last])

    def _decode_dflash(self, prompt_ids, out: _Output, pick, acceptance: list[int]):
        dcfg = self.draft.config
        S, taps_ids = dcfg.block_size, list(dcfg.target_layer_ids)
        cache = self.target.new_cache(1, self.max_len, block=S)
        draft_cache = self.draft.new_cache(1, self.max_len)
        logits, taps = self.target(self._prompt_tensor(prompt_ids), cache=cache, start_pos=0,
                                   tap_layers=taps_ids)
        p = len(prompt_ids)
        last = int(pick(logits[0, -1], p))
        out.emit([last])
        mask_id = dcfg.mask_token_id
        while not out.done:
            block = torch.full((1, S), mask_id, dtype=torch.long, device=self.device)
            block[0, 0] = last
            positions = torch.arange(p, p + S, device=self.device)
            draft_logits = self.draft(block, taps, draft_cache, p, self.target)      # [1, S, V]
            block[0, 1:] = pick(draft_logits[0, 1:], positions[1:])
            logits, block_taps = self.target(block, cache=cache, start_pos=p, tap_layers=taps_ids)
            posterior = pick(logits[0], positions + 1)                                # [S]
            acc = accepted_length(block[0, 1:], posterior[:-1])
            committed = block[0, 1:acc + 1].tolist() + [int(posterior[acc])]
            out.emit(committed)
            acceptance.append(acc)
            cache.crop(p + acc + 1)
            taps = block_taps[:, :acc + 1]                 # context for positions p..p+acc
            p += acc + 1
            last = committed[-1]


def accepted_length(drafted: torch.Tensor, posterior: torch.Tensor) -> int:
    """Length of the longest prefix where drafted[j] == posterior[j]."""
    agree = (drafted == posterior).long().cumprod(dim=0)
    return int(agree.sum())
