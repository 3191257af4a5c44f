"""DFlash block draft: fills the MASK slots of a block in ONE forward pass.

Shape legend: B batch, S block size, Tn new context positions, C cached
context positions, D hidden, H query heads, Hk kv heads, Dh head dim,
n_taps tapped target layers, V vocab.

A small stack of decoder layers at the target's hidden size. Its context is
the target itself: hidden states tapped from `target_layer_ids` (the OUTPUT of
each listed target layer, for every committed token), concatenated, projected
by `fc` and normalised by `hidden_norm`. Every draft layer projects those
context features with its own k_proj / v_proj and puts them in front of the
block's own keys and values:

    K = [k_proj(ctx) ; k_proj(norm(x_block))],  V likewise,  Q = q_proj(norm(x_block))

Queries come from the block only; inside the block there is no causal mask;
over the context a query at position q sees keys at positions >= q - window
(sliding window). RoPE (neox style, whole head) uses absolute positions for
both context and block. Context K/V are cached (`DFlashCache`) for committed
positions only; block K/V are never cached.

The draft owns no embedding and no LM head: it borrows `target.model.embed_tokens`
and `target.lm_head`. Block slots whose id is `mask_token_id` are embedded
with the learned `mask_embedding` instead.

Parameter names are the tensor names in `dflash/model.safetensors`:
fc.weight, hidden_norm.weight, mask_embedding, norm.weight,
layers.{j}.input_layernorm.weight, layers.{j}.self_attn.{q,k,v,o}_proj.weight,
layers.{j}.post_attention_layernorm.weight, layers.{j}.mlp.{gate,up,down}_proj.weight
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DFlashConfig, MiMoConfig


class DFlashRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin [T, Dh] (fp32) for neox-style rotary embedding of whole heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, Dh]; cos/sin [T, Dh]; rotate (first half, second half) pairs."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)


class DFlashCache:
    """Per-layer K/V of the projected context, committed positions only.

    k[j], v[j]: [B, Hk, max_len, Dh]; positions 0..length-1 are valid.
    """

    def __init__(self, dcfg: DFlashConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, dcfg.num_key_value_heads, max_len, dcfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(dcfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(dcfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def crop(self, n: int):
        """Roll back to the first n positions."""
        if not 0 <= n <= self.length:
            raise ValueError(f"DFlashCache.crop({n}): expected 0 <= n <= length={self.length}")
        self.length = n


class DFlashAttention(nn.Module):
    def __init__(self, dcfg: DFlashConfig):
        super().__init__()
        d, h, hk, dh = dcfg.hidden_size, dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, hk, dh
        self.window = dcfg.sliding_window
        self.q_proj = nn.Linear(d, h * dh, bias=False)
        self.k_proj = nn.Linear(d, hk * dh, bias=False)
        self.v_proj = nn.Linear(d, hk * dh, bias=False)
        self.o_proj = nn.Linear(h * dh, d, bias=False)

    def context_kv(self, ctx, cos, sin):
        """ctx [B, Tn, D] -> k, v [B, Hk, Tn, Dh] (k rotated at the context positions)."""
        b, t, _ = ctx.shape
        k = apply_rope(self.k_proj(ctx).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(ctx).view(b, t, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, block_rope, ctx_k, ctx_v, mask):
        """x [B, S, D]; ctx_k/v [B, Hk, C, Dh]; mask [S, C + S] bool (True = visible)."""
        b, s, _ = x.shape
        cos, sin = block_rope
        q = apply_rope(self.q_proj(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        k = torch.cat([ctx_k, k.transpose(1, 2)], dim=2)           # [B, Hk, C + S, Dh]
        v = torch.cat([ctx_v, v.transpose(1, 2)], dim=2)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.float(), v.float(),
                                             attn_mask=mask)       # [B, H, S, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1).to(x.dtype))


class DFlashMLP(nn.Module):
    def __init__(self, dcfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(dcfg.hidden_size, dcfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dcfg.hidden_size, dcfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(dcfg.intermediate_size, dcfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashLayer(nn.Module):
    def __init__(self, dcfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = DFlashRMSNorm(dcfg.hidden_size, dcfg.layernorm_epsilon)
        self.self_attn = DFlashAttention(dcfg)
        self.post_attention_layernorm = DFlashRMSNorm(dcfg.hidden_size, dcfg.layernorm_epsilon)
        self.mlp = DFlashMLP(dcfg)

    def forward(self, x, block_rope, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), block_rope, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraft(nn.Module):
    def __init__(self, dcfg: DFlashConfig, target_cfg: MiMoConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        dcfg.check_target(target_cfg)
        self.config = dcfg
        d = dcfg.hidden_size
        self.fc = nn.Linear(len(dcfg.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = DFlashRMSNorm(d, dcfg.layernorm_epsilon)
        self.layers = nn.ModuleList(DFlashLayer(dcfg) for _ in range(dcfg.num_hidden_layers))
        self.norm = DFlashRMSNorm(d, dcfg.layernorm_epsilon)
        self.mask_embedding = nn.Parameter(torch.zeros(d))
        self.to(dtype)
        if not self.mask_embedding.is_meta:     # meta builds (checkpoint loading) skip the init
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        """Random init: linears and the mask embedding ~ N(0, std), norms = 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, DFlashRMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.mask_embedding, std=std)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> DFlashCache:
        p = self.fc.weight
        return DFlashCache(self.config, batch, max_len, dtype or p.dtype, device or p.device)

    def embed_block(self, block_ids, target):
        """block_ids [B, S] -> [B, S, D]; MASK ids take the learned mask embedding."""
        x = target.model.embed_tokens(block_ids)
        is_mask = (block_ids == self.config.mask_token_id).unsqueeze(-1)
        return torch.where(is_mask, self.mask_embedding.to(x.dtype), x)

    def visibility(self, ctx_pos, block_pos):
        """[S, C + S] bool: all block keys; context keys within the sliding window."""
        ctx_ok = ctx_pos[None, :] >= block_pos[:, None] - self.config.sliding_window
        return torch.cat([ctx_ok, torch.ones(len(block_pos), len(block_pos), dtype=torch.bool,
                                             device=ctx_ok.device)], dim=1)

    def forward(self, block_ids, taps_new, cache: DFlashCache | None, start_pos: int, target):
        """block_ids [B, S] at positions start_pos.., taps_new [B, Tn, n_taps*D] for the
        context positions start_pos-Tn..start_pos-1 (the ones not yet in `cache`).
        Appends their K/V to `cache`; returns logits [B, S, V] (fp32)."""
        b, s = block_ids.shape
        t_new = taps_new.shape[1]
        first_new = start_pos - t_new
        if first_new < 0 or (cache is not None and cache.length != first_new):
            have = 0 if cache is None else cache.length
            raise ValueError(f"DFlashDraft: {t_new} new context positions before start_pos={start_pos} "
                             f"do not continue the cache (length {have})")
        dev = block_ids.device
        ctx_pos = torch.arange(first_new, start_pos, device=dev)
        block_pos = torch.arange(start_pos, start_pos + s, device=dev)
        dh, theta = self.config.head_dim, self.config.rope_theta
        ctx_rope = rope_cos_sin(ctx_pos, dh, theta)
        block_rope = rope_cos_sin(block_pos, dh, theta)
        ctx = self.hidden_norm(self.fc(taps_new.to(self.fc.weight.dtype)))   # [B, Tn, D]
        x = self.embed_block(block_ids, target).to(self.fc.weight.dtype)       # [B, S, D]
        # no query of the block sees a context key before start_pos - window
        lo = max(first_new if cache is None else 0, start_pos - self.config.sliding_window)
        mask = self.visibility(torch.arange(lo, start_pos, device=dev), block_pos)
        if cache is not None and start_pos > cache.max_len:
            raise ValueError(f"DFlashCache: position {start_pos} beyond max_len={cache.max_len}")
        for j, layer in enumerate(self.layers):
            k_ctx, v_ctx = layer.self_attn.context_kv(ctx, *ctx_rope)   # [B, Hk, Tn, Dh]
            if cache is not None:
                cache.k[j][:, :, first_new:start_pos] = k_ctx
                cache.v[j][:, :, first_new:start_pos] = v_ctx
                k_ctx, v_ctx = cache.k[j][:, :, lo:start_pos], cache.v[j][:, :, lo:start_pos]
            else:
                k_ctx, v_ctx = k_ctx[:, :, lo - first_new:], v_ctx[:, :, lo - first_new:]
            x = layer(x, block_rope, k_ctx, v_ctx, mask)
        if cache is not None:
            cache.length = start_pos
        return target.lm_head(self.norm(x)).float()
