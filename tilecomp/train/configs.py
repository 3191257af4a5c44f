"""Shapes of the shipped example model (`examples/model/`) and of the CPU test miniature.

Example target: hidden 384, 8 layers (full attention at 0 and 5, SWA window 128
elsewhere, sinks on SWA layers), partial RoPE on half of each 64-dim q/k head,
v heads of 32, layer 0 dense, layers 1..7 MoE with 16 experts of width 192,
top-4, sigmoid router. About 33M parameters (25M in experts, stored MXFP4).
Draft: 2 layers, block 8, window 256, taps of 4 target layers.
"""
from __future__ import annotations

from tilecomp.models.config import DFlashConfig, MiMoConfig
from tilecomp.models.presets import mimo_target

from .tokenizer import MASK_ID


def _target(vocab_size: int, hidden: int, layers: int, heads: int, kv: int, swa_kv: int,
            head_dim: int, v_head_dim: int, window: int, inter: int, moe_inter: int,
            experts: int, top_k: int) -> MiMoConfig:
    return mimo_target(hidden, layers, vocab_size, heads, kv, swa_kv, head_dim, v_head_dim, window,
                       inter, moe_inter, experts, top_k, max_pos=4096, partial_rotary_factor=0.5,
                       tie_word_embeddings=False)


def _draft(target: MiMoConfig, layers: int, heads: int, kv: int, head_dim: int, inter: int,
           window: int, taps: list[int]) -> DFlashConfig:
    return DFlashConfig(
        mask_token_id=MASK_ID, target_layer_ids=taps, sliding_window=window,
        num_hidden_layers=layers, hidden_size=target.hidden_size, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, intermediate_size=inter, block_size=8,
        rope_theta=10_000.0, layernorm_epsilon=target.layernorm_epsilon)


def example_configs(vocab_size: int) -> tuple[MiMoConfig, DFlashConfig]:
    target = _target(vocab_size, hidden=384, layers=8, heads=8, kv=2, swa_kv=4, head_dim=64,
                     v_head_dim=32, window=128, inter=1024, moe_inter=192, experts=16, top_k=4)
    return target, _draft(target, layers=2, heads=6, kv=2, head_dim=64, inter=768, window=256,
                          taps=[1, 3, 5, 7])


def cpu_configs(vocab_size: int) -> tuple[MiMoConfig, DFlashConfig]:
    """The size trained on CPU when no GPU is available (about 2.5M parameters)."""
    target = _target(vocab_size, hidden=128, layers=4, heads=4, kv=1, swa_kv=2, head_dim=32,
                     v_head_dim=16, window=64, inter=384, moe_inter=64, experts=16, top_k=2)
    return target, _draft(target, layers=1, heads=4, kv=2, head_dim=32, inter=384, window=128,
                          taps=[0, 1, 3])


def miniature_configs(vocab_size: int) -> tuple[MiMoConfig, DFlashConfig]:
    """A few-second CPU model with every feature (for tests and dry runs)."""
    target = _target(vocab_size, hidden=64, layers=3, heads=4, kv=1, swa_kv=2, head_dim=16,
                     v_head_dim=8, window=16, inter=128, moe_inter=32, experts=16, top_k=2)
    return target, _draft(target, layers=1, heads=4, kv=2, head_dim=16, inter=128, window=32,
                          taps=[0, 2])


CONFIGS = {"example": example_configs, "cpu": cpu_configs, "miniature": miniature_configs}
