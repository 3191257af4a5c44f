"""The MoE layer as one wide masked MLP: the expert forward used for training on a GPU.

    y = sum_e w_e * down_e(silu(gate_e x) * up_e x)        (w_e = 0 for unchosen experts)
      = down_all( concat_e( w_e * silu(gate_e x) * up_e x ) )

With the E experts' [F, D] gate/up weights stacked into one [E*F, D] matrix
and the down weights into one [D, E*F] matrix, a whole MoE layer is three
plain matmuls and a [N, E] mix of routing weights: static shapes, no host
sync, no per-expert kernels. It computes every expert on every token
(E / top_k times the expert FLOPs of a sparse forward), which on a GPU is
far cheaper than the per-expert launches and host syncs of the sparse form
(the example model: 16 experts, top 4). It is the same function as
`Experts.forward`; the routing weight is applied to the hidden activation
(before the down projection) instead of to the output.

- `mixed_experts` is the function (autograd-friendly: QAT training uses it
  with fake-quantized weights);
- `MixedFrozenExperts` holds a frozen target's MXFP4 experts dequantized once
  (the draft's self-distillation: greedy generation and hidden-state taps);
- `use_mixed_experts(target)` swaps them into a loaded target in place.

Shape legend: N tokens, D hidden, E experts, F expert width, A top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilecomp.models.mimo import MXFP4Experts


def mixed_experts(h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
                  up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """h [N, D], idx / weights [N, A]; gate / up [E, F, D], down [E, D, F] -> [N, D] (h's dtype)."""
    E, Fw, D = gate.shape
    mix = torch.zeros(h.shape[0], E, dtype=weights.dtype, device=h.device).scatter(1, idx, weights)
    x = h.to(gate.dtype)
    a = F.linear(x, gate.reshape(E * Fw, D)).view(-1, E, Fw)                 # [N, E, F]
    b = F.linear(x, up.reshape(E * Fw, D)).view(-1, E, Fw)                   # [N, E, F]
    hidden = F.silu(a) * b * mix[:, :, None].to(a.dtype)                     # [N, E, F]
    down_all = down.permute(1, 0, 2).reshape(D, E * Fw)                      # [D, E*F]
    return F.linear(hidden.reshape(-1, E * Fw), down_all).to(h.dtype)


class MixedFrozenExperts(nn.Module):
    """A frozen MXFP4 expert store, dequantized once, run by `mixed_experts`."""

    def __init__(self, experts: MXFP4Experts):
        super().__init__()
        gate, up, down = experts.weights()
        self.register_buffer("gate", gate, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down", down, persistent=False)

    def forward(self, h, idx, weights):
        return mixed_experts(h, idx, weights, self.gate, self.up, self.down)


def use_mixed_experts(target: nn.Module) -> nn.Module:
    """Replace every MXFP4Experts of a loaded (frozen) target by MixedFrozenExperts, in place.
    Not for saving: the packed weights are gone from the swapped modules."""
    for module in list(target.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, MXFP4Experts):
            module.experts = MixedFrozenExperts(experts)
    return target
