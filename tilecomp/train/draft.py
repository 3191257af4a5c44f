"""Train the DFlash draft by self-distillation from the (MXFP4) target.

1. Data: prompts are random train windows; the target continues each one
   greedily (batched, with its KV cache). The draft learns the TARGET's
   tokens, which is exactly what verification accepts.
2. Taps: one full target forward per sequence gives the hidden states of
   `target_layer_ids` at every position (the draft's context).
3. Blocks: K random anchors a per batch; block = [x_a, MASK x (S-1)] at
   positions a..a+S-1 over the context a-W..a-1; slot j is trained to be
   x_{a+j}, with weight exp(-(j-1)/gamma) (the DFlash recipe's decay: early
   slots matter most, since one miss ends the accepted prefix). All K
   blocks of a sequence go through the draft in ONE forward with a mask
   that keeps each block to its own keys and its own context window.
4. Muon for the draft's matrices, AdamW for norms and the mask embedding;
   the target (embedding and LM head included) stays frozen.

Shape legend: B batch, T sequence, K anchors, S block, D hidden, V vocab.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tilecomp.models.dflash import DFlashDraft, rope_cos_sin

from . import loop
from .data import random_windows
from .muon import make_muon


@dataclass
class DraftSettings:
    prompt_len: int = 64
    new_tokens: int = 192
    gen_batch: int = 1024
    sequences: int = 4096
    batch: int = 32
    anchors: int = 24
    lr: float = 2e-3
    weight_decay: float = 0.01
    decay_gamma: float = 4.0          # DFlash: gamma = 4 for block size 8
    grad_clip: float = 1.0
    val_fraction: float = 0.05      # sequences held out of training: the overfitting check
    eval_every: int = 200
    seed: int = 0


@torch.no_grad()
def greedy_continue(target, prompts: torch.Tensor, new_tokens: int, device) -> torch.Tensor:
    """prompts [B, P] -> [B, P + new_tokens]: the target's own greedy continuation."""
    prompts = prompts.to(device)
    B, P = prompts.shape
    cache = target.new_cache(B, P + new_tokens, device=device)
    with loop.autocast(device):
        logits = target(prompts, cache=cache, start_pos=0)
        out = [prompts, logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(new_tokens - 1):
            logits = target(out[-1], cache=cache, start_pos=P + i)
            out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)


@torch.no_grad()
def target_taps(target, ids: torch.Tensor, tap_layers: list[int], device) -> torch.Tensor:
    """ids [B, T] -> taps [B, T, n_taps*D] (bf16 on GPU)."""
    with loop.autocast(device):
        _, taps = target(ids.to(device), tap_layers=tap_layers)
    return taps


def position_weights(block: int, gamma: float, device=None) -> torch.Tensor:
    """[S-1] weights of slots 1..S-1: exp(-(j-1)/gamma)."""
    j = torch.arange(1, block, dtype=torch.float32, device=device)
    return torch.exp(-(j - 1) / gamma)


def block_mask(anchors: torch.Tensor, T: int, S: int, window: int) -> torch.Tensor:
    """[K*S, T + K*S] bool: slot j of block k sees context a_k + j - W <= c < a_k and its own block."""
    K = anchors.numel()
    qpos = (anchors[:, None] + torch.arange(S, device=anchors.device)).flatten()       # [K*S]
    ctx = torch.arange(T, device=anchors.device)
    anchor_of_q = anchors.repeat_interleave(S)                                          # [K*S]
    ctx_ok = (ctx[None, :] < anchor_of_q[:, None]) & (ctx[None, :] >= qpos[:, None] - window)
    block_of = torch.arange(K, device=anchors.device).repeat_interleave(S)
    own = block_of[:, None] == block_of[None, :]
    return torch.cat([ctx_ok, own], dim=1)


def multi_block_logits(draft: DFlashDraft, target, ids: torch.Tensor, taps: torch.Tensor,
                       anchors: torch.Tensor) -> torch.Tensor:
    """Draft logits [B, K, S, V] for K blocks anchored at `anchors` [K] (shared by the batch).

    Equal, block by block, to draft.forward(block, taps[:, :a], None, a, target)."""
    dcfg = draft.config
    B, T = ids.shape
    S, K = dcfg.block_size, anchors.numel()
    block_ids = torch.full((B, K, S), dcfg.mask_token_id, dtype=torch.long, device=ids.device)
    block_ids[:, :, 0] = ids[:, anchors]
    x = draft.embed_block(block_ids.view(B, K * S), target).to(draft.fc.weight.dtype)  # [B, K*S, D]
    ctx = draft.hidden_norm(draft.fc(taps.to(draft.fc.weight.dtype)))                   # [B, T, D]
    qpos = (anchors[:, None] + torch.arange(S, device=ids.device)).flatten()
    ctx_rope = rope_cos_sin(torch.arange(T, device=ids.device), dcfg.head_dim, dcfg.rope_theta)
    block_rope = rope_cos_sin(qpos, dcfg.head_dim, dcfg.rope_theta)
    mask = block_mask(anchors, T, S, dcfg.sliding_window)
    for layer in draft.layers:
        k_ctx, v_ctx = layer.self_attn.context_kv(ctx, *ctx_rope)                        # [B, Hk, T, Dh]
        x = layer(x, block_rope, k_ctx, v_ctx, mask)
    h = draft.norm(x).to(target.lm_head.weight.dtype)
    return target.lm_head(h).float().view(B, K, S, -1)


def block_loss(logits: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor):
    """Weighted CE of slots 1..S-1 against x_{a+j}; also per-slot accuracy [S-1]."""
    S = logits.shape[2]
    labels = ids[:, anchors[:, None] + torch.arange(1, S, device=ids.device)]           # [B, K, S-1]
    ce = F.cross_entropy(logits[:, :, 1:].flatten(0, 2), labels.flatten(), reduction="none")
    ce = ce.view(labels.shape)                                                          # [B, K, S-1]
    loss = (ce * weights).sum(-1).mean() / weights.sum()
    correct = (logits[:, :, 1:].argmax(-1) == labels).float()
    prefix = correct.cumprod(-1).sum(-1).mean()          # expected accepted tokens per block
    return loss, prefix


def blocks_loss(draft: DFlashDraft, target, ids: torch.Tensor, anchors: torch.Tensor,
                weights: torch.Tensor, device):
    """block_loss of the draft's blocks at `anchors` of ids [B, T], taps from the frozen target."""
    taps = target_taps(target, ids, draft.config.target_layer_ids, device)
    with loop.autocast(device):
        logits = multi_block_logits(draft, target, ids, taps, anchors)
    return block_loss(logits, ids, anchors, weights)


def make_optimizers(draft: DFlashDraft, s: DraftSettings):
    matrices = [p for p in draft.parameters() if p.ndim == 2]
    others = [p for p in draft.parameters() if p.ndim != 2]
    muon = make_muon(matrices, lr=s.lr, weight_decay=s.weight_decay)
    adamw = torch.optim.AdamW(others, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for opt in (muon, adamw):
        for group in opt.param_groups:
            group["base_lr"] = s.lr
    return [muon, adamw]


def sample_anchors(T: int, s: DraftSettings, S: int, gen: torch.Generator) -> torch.Tensor:
    """K distinct anchors in the generated part (block tokens 1.. are the target's own)."""
    lo, hi = s.prompt_len - 1, T - S
    k = min(s.anchors, hi - lo + 1)
    return torch.randperm(hi - lo + 1, generator=gen)[:k].sort().values + lo


def split_validation(sequences: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) rows: the last `fraction` of the sequences (at least 1 row, none when
    fraction is 0). Their prompts are other train windows, so validation measures how the draft
    does on continuations it never saw, which the reference-engine acceptance then confirms."""
    n_val = 0 if fraction <= 0 or len(sequences) < 2 else max(1, round(fraction * len(sequences)))
    return sequences[:len(sequences) - n_val], sequences[len(sequences) - n_val:]


@torch.no_grad()
def validation(draft: DFlashDraft, target, val: torch.Tensor, s: DraftSettings, weights: torch.Tensor,
               device, batch: int = 64) -> tuple[float, float]:
    """(weighted block loss, expected accepted drafted tokens per block) on held-out sequences,
    at fixed anchors (every 8th generated position)."""
    S = draft.config.block_size
    anchors = torch.arange(s.prompt_len - 1, val.shape[1] - S + 1, S, device=device)
    was_training = draft.training
    draft.eval()
    loss_sum, acc_sum, n = 0.0, 0.0, 0
    for i in range(0, len(val), batch):
        ids = val[i:i + batch].to(device)
        loss, accepted = blocks_loss(draft, target, ids, anchors, weights, device)
        loss_sum += float(loss) * len(ids)
        acc_sum += float(accepted) * len(ids)
        n += len(ids)
    draft.train(was_training)
    return loss_sum / max(1, n), acc_sum / max(1, n)


def train_draft(draft: DFlashDraft, target, sequences: torch.Tensor, run_dir: Path,
                budget: loop.Budget, s: DraftSettings = DraftSettings(), device=None,
                progress: bool = True) -> dict:
    """Train (or resume) the draft on prompt+continuation `sequences` [N, T] (CPU int64); the
    last `s.val_fraction` of them are held out and scored every `s.eval_every` steps."""
    device = loop.pick_device(device)
    run_dir = Path(run_dir)
    target.requires_grad_(False)
    draft.to(device).train()
    opts = make_optimizers(draft, s)
    gen = torch.Generator().manual_seed(s.seed)
    state = loop.load_state(run_dir)
    step, seconds, history = 0, 0.0, loop.History()
    if state is not None:
        draft.load_state_dict(state["draft"])
        for opt, st in zip(opts, state["optimizers"]):
            opt.load_state_dict(st)
        gen.set_state(state["generator"])
        step, seconds, history = state["step"], state["seconds"], loop.History.from_dict(state["history"])
    S = draft.config.block_size
    weights = position_weights(S, s.decay_gamma, device)
    sequences, val = split_validation(sequences, s.val_fraction)
    val_accepted = None
    clock = loop.Clock(seconds, step, budget)
    bar = tqdm(total=budget.steps or round(60 * budget.minutes), disable=not progress, desc="draft",
               unit="step" if budget.steps else "s")
    while budget.progress(step, clock.seconds) < 1.0 and not clock.chunk_over(step):
        loop.set_lr(opts, loop.lr_factor(budget.progress(step, clock.seconds)))
        rows = torch.randint(0, len(sequences), (s.batch,), generator=gen)
        ids = sequences[rows].to(device)
        anchors = sample_anchors(ids.shape[1], s, S, gen).to(device)
        loss, accepted = blocks_loss(draft, target, ids, anchors, weights, device)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), s.grad_clip)
        for opt in opts:
            opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            history.train.append((step, float(loss.detach())))
            history.extra.setdefault("accepted", []).append((step, float(accepted)))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", accepted=f"{float(accepted):.2f}",
                            val_accepted="-" if val_accepted is None else f"{val_accepted:.2f}")
        if len(val) and (step % s.eval_every == 0 or budget.progress(step, clock.seconds) >= 1.0):
            val_loss, val_accepted = validation(draft, target, val, s, weights, device)
            history.heldout.append((step, val_loss))
            history.extra.setdefault("val_accepted", []).append((step, val_accepted))
        bar.update(1 if budget.steps else round(clock.seconds) - bar.n)
    bar.close()
    done = budget.progress(step, clock.seconds) >= 1.0
    loop.save_state(run_dir, {"draft": draft.state_dict(), "optimizers": [o.state_dict() for o in opts],
                              "generator": gen.get_state(), "step": step, "seconds": clock.seconds,
                              "history": history.to_dict(), "config": draft.config.to_dict(),
                              "settings": asdict(s)})
    loop.write_json(run_dir / "history.json", history.to_dict())
    loop.plot_history(history, run_dir / "draft_loss.png",
                      f"DFlash draft (Muon, decay gamma={s.decay_gamma:g}), {step} steps")
    return {"done": done, "step": step, "history": history}

