"""Train the MiMo target with MXFP4 quantization-aware experts.

The model is the reference `MiMoForCausalLM` built with `DenseExperts` whose
forward fake-quantizes each expert weight to MXFP4 (straight-through
estimator), so the packed MXFP4 model that ships computes what was trained.
Router balance uses the auxiliary-loss-free rule of DeepSeek-V3 / MiMo: after
each step, every expert's selection bias moves by `bias_rate` towards the
mean load (down when over-loaded, up when under-loaded).

Shape legend: B batch, T sequence, V vocab, E experts.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tilecomp.errors import TilecompError
from tilecomp.models.config import MiMoConfig
from tilecomp.models.mimo import DenseExperts, MiMoForCausalLM, Router

from . import loop
from .data import TokenData, random_windows, sequential_windows
from .mixed import mixed_experts


@dataclass
class TargetSettings:
    batch: int = 32
    seq_len: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_rate: float = 1e-3
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 0
    moe: str = "auto"     # expert forward: "mixed" (GPU default, see train/mixed.py) | "grouped" (CPU)
    dropout: float = 0.0  # on the attention and MLP outputs before each residual add (training only)


class GroupedExperts(DenseExperts):
    """DenseExperts with training-friendly forwards (same parameters, same function).

    grouped (CPU): tokens are sorted by expert once, so the whole layer does one
    gather and one index_add instead of one per expert (their backward passes
    dominate on CPU).
    mixed (GPU): every expert on every token as one wide masked MLP
    (`mixed.mixed_experts`): three matmuls, no host sync, no per-expert kernels."""

    mixed = False

    def forward(self, h, idx, weights):
        """h [N, D], idx / weights [N, A] -> [N, D]."""
        if self.mixed:
            return mixed_experts(h, idx, weights, *self.weights())
        N, A = idx.shape
        flat = idx.flatten()                                              # [N*A]
        order = flat.argsort(stable=True)
        tok = order // A                                                  # token of each sorted slot
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        used = [e for e, c in enumerate(counts) if c]
        gate, up, down = self.weights(torch.tensor(used, device=h.device))
        x = h[tok].to(gate.dtype)                                         # [N*A, D] grouped by expert
        pieces = x.split([counts[e] for e in used])
        # unbind, not gate[j]: each select's backward would zero-fill a full [n_used, N, K] grad
        ys = [F.linear(F.silu(F.linear(xe, g)) * F.linear(xe, u), d)
              for xe, g, u, d in zip(pieces, gate.unbind(0), up.unbind(0), down.unbind(0))]
        y = torch.cat(ys).float() * weights.flatten()[order, None]        # [N*A, D]
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        return out.index_add_(0, tok, y).to(h.dtype)


def build_trainable(cfg: MiMoConfig, seed: int = 0, moe: str = "grouped") -> MiMoForCausalLM:
    """fp32 master weights, dense experts with MXFP4 fake quantization; `moe` picks the
    expert forward ("grouped" or "mixed", see GroupedExperts)."""
    if moe not in ("grouped", "mixed"):
        raise TilecompError(f"build_trainable moe: expected 'grouped' or 'mixed', found {moe!r}")
    torch.manual_seed(seed)
    model = MiMoForCausalLM(cfg, dtype=torch.float32, experts="dense")
    for module in model.modules():
        if isinstance(module, DenseExperts):
            module.__class__ = GroupedExperts
            module.mixed = moe == "mixed"
    set_fake_quant(model, True)
    return model


def add_residual_dropout(model: MiMoForCausalLM, p: float) -> list:
    """Dropout on each block's attention and MLP outputs (before the residual add), as forward
    hooks: the reference model stays dropout-free, and in eval mode the hooks are the identity.
    The corpus is small (the stdlib: ~9M tokens), so multi-epoch training needs it."""
    if not 0.0 <= p < 1.0:
        raise TilecompError(f"target settings dropout: expected 0 <= p < 1, found {p}")
    if p == 0.0:
        return []

    def drop(module, args, output):
        return F.dropout(output, p, module.training)

    return [m.register_forward_hook(drop) for layer in model.model.layers
            for m in (layer.self_attn, layer.mlp)]


def resolve_moe(moe: str, device: torch.device) -> str:
    """"auto" -> "mixed" on a GPU, "grouped" on CPU (mixed does E/top_k times the expert FLOPs)."""
    if moe not in ("auto", "grouped", "mixed"):
        raise TilecompError(f"target settings moe: expected 'auto', 'grouped' or 'mixed', found {moe!r}")
    if moe == "auto":
        return "mixed" if device.type == "cuda" else "grouped"
    return moe


def set_fake_quant(model: MiMoForCausalLM, on: bool):
    for module in model.modules():
        if isinstance(module, DenseExperts):
            module.fake_quant = on


def to_mxfp4(model: MiMoForCausalLM, dtype=torch.bfloat16) -> MiMoForCausalLM:
    """A copy whose experts are packed MXFP4 (what ships); other weights cast to `dtype`
    except the fp32 router and sinks."""
    packed = copy.deepcopy(model)
    for layer in packed.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, DenseExperts):
            layer.mlp.experts = experts.to_mxfp4()
            layer.mlp.experts.dtype = dtype
    for name, p in packed.named_parameters():
        if not (name.endswith("gate.weight") or name.endswith("attention_sink_bias")):
            p.data = p.data.to(dtype)
    return packed


class RouterLoad:
    """Counts how often each expert is chosen (forward hooks on every Router)."""

    def __init__(self, model: MiMoForCausalLM):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.counts = [None] * len(self.routers)
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def record(module, args, output):
            _, idx = output
            n = module.e_score_correction_bias.numel()
            self.counts[i] = torch.bincount(idx.flatten(), minlength=n).float()
        return record

    @torch.no_grad()
    def update_bias(self, rate: float) -> torch.Tensor:
        """Move biases towards balance; return the worst max/mean load ratio (a 0-dim tensor
        on the model's device: reading it is a host sync, so the loop reads it only to log)."""
        worst = []
        for router, count in zip(self.routers, self.counts):
            if count is None:
                continue
            router.e_score_correction_bias += rate * torch.sign(count.mean() - count)
            worst.append(count.max() / count.mean().clamp(min=1))
        return torch.stack(worst).max() if worst else torch.zeros(())


def lm_loss(model, ids: torch.Tensor, device) -> torch.Tensor:
    """Next-token cross-entropy of ids [B, T] (mean over B*(T-1) targets)."""
    with loop.autocast(device):
        logits = model(ids[:, :-1])                                        # [B, T-1, V]
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, ids_stream, seq_len: int, max_windows: int, device, batch: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows of a held-out stream."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = list(sequential_windows(ids_stream, seq_len, max_windows))
    for i in range(0, len(windows), batch):
        ids = torch.stack(windows[i:i + batch]).to(device)
        total += float(lm_loss(model, ids, device)) * len(ids)
        count += len(ids)
    model.train(was_training)
    return total / max(1, count)


def make_optimizer(model, s: TargetSettings):
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95), **fused)
    for group in opt.param_groups:
        group["base_lr"] = s.lr
    return opt


def train_step(model, opt, load: "RouterLoad", ids: torch.Tensor, device, s: TargetSettings):
    """One optimizer step on ids [B, T+1]; returns (loss, worst router load ratio), both
    0-dim device tensors (no host sync)."""
    loss = lm_loss(model, ids, device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    opt.step()
    return loss, load.update_bias(s.bias_rate)


def train_target(cfg: MiMoConfig, data: TokenData, run_dir: Path, budget: loop.Budget,
                 s: TargetSettings = TargetSettings(), device=None, progress: bool = True) -> dict:
    """Train (or resume) in `run_dir` until the budget or this chunk's time is spent.

    Returns {"done": bool, "step": int, "history": History}."""
    device = loop.pick_device(device)
    run_dir = Path(run_dir)
    model = build_trainable(cfg, s.seed, resolve_moe(s.moe, device)).to(device)
    add_residual_dropout(model, s.dropout)
    opt = make_optimizer(model, s)
    load = RouterLoad(model)
    gen = torch.Generator().manual_seed(s.seed)
    state = loop.load_state(run_dir)
    step, seconds, history = 0, 0.0, loop.History()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, seconds, history = state["step"], state["seconds"], loop.History.from_dict(state["history"])
    clock = loop.Clock(seconds, step, budget)
    bar = tqdm(total=budget.steps or round(60 * budget.minutes), initial=0, disable=not progress,
               desc="target", unit="step" if budget.steps else "s")
    model.train()
    while budget.progress(step, clock.seconds) < 1.0 and not clock.chunk_over(step):
        loop.set_lr([opt], loop.lr_factor(budget.progress(step, clock.seconds)))
        ids = random_windows(data.train, s.batch, s.seq_len + 1, gen).to(device)
        loss, imbalance = train_step(model, opt, load, ids, device, s)
        step += 1
        if step % 10 == 0 or step == 1:
            value = float(loss.detach())
            history.train.append((step, value))
            bar.set_postfix(loss=f"{value:.3f}", imbalance=f"{float(imbalance):.2f}")
        if step % s.eval_every == 0:
            history.heldout.append((step, heldout_loss(model, data.heldout, s.seq_len, s.eval_windows, device)))
        bar.update(1 if budget.steps else round(clock.seconds) - bar.n)
    bar.close()
    done = budget.progress(step, clock.seconds) >= 1.0
    loop.save_state(run_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "generator": gen.get_state(), "step": step, "seconds": clock.seconds,
                              "history": history.to_dict(), "config": cfg.to_dict(),
                              "settings": asdict(s)})
    loop.write_json(run_dir / "history.json", history.to_dict())
    loop.plot_history(history, run_dir / "target_loss.png", f"MiMo target (MXFP4 QAT), {step} steps")
    return {"done": done, "step": step, "history": history, "model": model}


def load_trained(run_dir: Path, cfg: MiMoConfig) -> MiMoForCausalLM:
    """The trainable model with the weights of `run_dir/state.pt` (CPU)."""
    state = loop.load_state(run_dir)
    if state is None:
        raise FileNotFoundError(f"{run_dir}/{loop.STATE_FILE}: no target training state")
    model = build_trainable(cfg)
    model.load_state_dict(state["model"])
    return model
