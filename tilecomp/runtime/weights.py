"""Pack the target's and the draft's parameters into the typed arenas.

Slot names are the checkpoint tensor names (`model.layers.0.self_attn.q_proj.weight`;
draft tensors under `draft.`). Matrices and embeddings go to the `w` arena (the
engine's weight dtype), the router weight / bias and the attention sinks to `f32`,
MXFP4 expert blocks and scales to `u8`. RMSNorm gains go where the kernels read
them: `f32` when they are built with NORM_F32 (codegen/layout.norm_arena), else `w`.
"""
from __future__ import annotations

import torch

from tilecomp.errors import CheckpointError

from .buffers import ArenaBuilder

FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "attention_sink_bias")


def arena_of(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.uint8:
        return "u8"
    if name.endswith(FP32_SUFFIXES):
        return "f32"
    if not tensor.is_floating_point():
        raise CheckpointError(f"tensor {name}: dtype {tensor.dtype}, expected a float or uint8 tensor")
    return "w"


def norm_gains(module) -> set[str]:
    """Names of the RMSNorm gains of `module` (the `weight` of every *RMSNorm submodule)."""
    return {f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
            if type(sub).__name__.endswith("RMSNorm")}


def add_weights(builder: ArenaBuilder, target, draft=None, norm_arena: str = "w"):
    """Every parameter and buffer of target (and draft, prefixed `draft.`) into `builder`; the
    RMSNorm gains into `norm_arena`."""
    for prefix, module in (("", target), ("draft.", draft)):
        if module is None:
            continue
        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        gains = norm_gains(module)
        for name, tensor in tensors.items():
            if tensor.is_meta:
                raise CheckpointError(f"tensor {prefix}{name} has no data (meta tensor)")
            arena = norm_arena if name in gains else arena_of(name, tensor)
            builder.add(prefix + name, tensor.detach(), arena)
