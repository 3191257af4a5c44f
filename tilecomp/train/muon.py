"""Muon for matrix parameters: momentum, then Newton-Schulz orthogonalisation of the update.

`make_muon` returns `torch.optim.Muon` when the installed torch has it, else
the small `Muon` below (same update: nesterov momentum, 5 quintic
Newton-Schulz iterations, decoupled weight decay, the update scaled as
Moonshot's "match RMS of AdamW" rule 0.2 * sqrt(max(A, B)) so AdamW
learning rates carry over).
"""
from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (singular values pushed towards ~1), g [A, B]."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.float().norm() + eps)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Fallback Muon for 2-D parameters (used when torch.optim.Muon is absent)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: expected 2-D parameters, found shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad + group["momentum"] * buf                 # nesterov
                update = orthogonalize(update, group["ns_steps"])
                scale = 0.2 * math.sqrt(max(p.shape))
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def make_muon(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if hasattr(torch.optim, "Muon"):
        return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay,
                                adjust_lr_fn="match_rms_adamw")
    return Muon(params, lr=lr, weight_decay=weight_decay)
