"""The torch.compile baseline: one DFlash step with static shapes, gpt-fast style.

The strongest simple thing a PyTorch user would write for the same model and
weights: static KV caches at fixed addresses, SWA layers gather only their
window, experts gathered per (token, choice) and (for MXFP4) dequantized
inside the graph, the draft ingests a fixed-size span of context taps,
acceptance on the device. It reuses the reference modules' layers and math
(models/) and replaces only what blocks a static graph: the ring KV cache
and the data-dependent unique-expert loop. `torch.compile(step,
mode="reduce-overhead", fullgraph=True)` turns it into CUDA graphs.

Shape legend: T block tokens, S cache slots, C draft context window, D hidden,
A experts per token, F expert width, G kv heads.
"""
import torch
import torch.nn.functional as F

from tilecomp.models.dflash import rope_cos_sin
from tilecomp.models.mimo import MoE, apply_rope, attend
from tilecomp.models.mxfp4 import dequantize_mxfp4


def gathered_experts(experts, idx: torch.Tensor, dtype) -> tuple[torch.Tensor, ...]:
    """idx [T, A] -> (gate [T, A, F, D], up [T, A, F, D], down [T, A, D, F]) in `dtype`."""
    if hasattr(experts, "gate_proj_blocks"):
        return tuple(dequantize_mxfp4(getattr(experts, f"{n}_blocks")[idx],
                                      getattr(experts, f"{n}_scales")[idx], dtype)
                     for n in ("gate_proj", "up_proj", "down_proj"))
    return experts.gate_proj[idx], experts.up_proj[idx], experts.down_proj[idx]


def moe_static(mlp: MoE, h: torch.Tensor) -> torch.Tensor:
    """h [T, D] -> [T, D]: every (token, choice) pair computed, no data-dependent shapes."""
    weights, idx = mlp.gate(h)                                            # [T, A]
    gate, up, down = gathered_experts(mlp.experts, idx, h.dtype)
    g = torch.einsum("td,tafd->taf", h, gate)
    u = torch.einsum("td,tafd->taf", h, up)
    y = torch.einsum("taf,tadf->tad", F.silu(g) * u, down)                # [T, A, D]
    return (y.float() * weights[..., None]).sum(1).to(h.dtype)


def window_positions(start: torch.Tensor, n: int) -> torch.Tensor:
    """Key positions start .. start + n - 1; those before 0 become a large negative
    number, which the causal and sliding-window masks hide."""
    kpos = start + torch.arange(n, device=start.device)
    return torch.where(kpos < 0, torch.full_like(kpos, -(1 << 30)), kpos)


class StaticStep:
    """Callable `(block_ids [T], pos0 [] long) -> (block [T], posterior [T], accepted [])`."""

    def __init__(self, target, draft, context: int, block: int, seed: int = 0):
        self.target, self.draft, self.T = target, draft, block
        cfg, w = target.config, target.lm_head.weight
        dev, dt = w.device, w.dtype
        self.slots = context + 2 * block
        g = torch.Generator(device=dev).manual_seed(seed)
        self.k, self.v = [], []
        for i in range(cfg.num_hidden_layers):
            s = cfg.attn(i)
            self.k.append(torch.randn(s.n_kv_heads, self.slots, s.head_dim, generator=g, device=dev).to(dt))
            self.v.append(torch.randn(s.n_kv_heads, self.slots, s.v_head_dim, generator=g, device=dev).to(dt))
        self.taps = None
        if draft is not None and block > 1:
            dc = draft.config
            shape = (dc.num_key_value_heads, self.slots, dc.head_dim)
            self.dk = [torch.randn(shape, generator=g, device=dev).to(dt) for _ in draft.layers]
            self.dv = [torch.randn(shape, generator=g, device=dev).to(dt) for _ in draft.layers]
            n_taps = len(dc.target_layer_ids)
            self.taps = torch.randn(block, n_taps * cfg.hidden_size, generator=g, device=dev).to(dt)
        for t in self.static_tensors():
            torch._dynamo.mark_static_address(t)

    def static_tensors(self):
        extra = [] if self.taps is None else [self.taps, *self.dk, *self.dv]
        return [*self.k, *self.v, *extra]

    # --- target verify ------------------------------------------------------------------
    def attention(self, layer, i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        attn, s = layer.self_attn, layer.self_attn.spec
        T = x.shape[0]
        q = attn.q_proj(x).view(1, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, T, s.n_kv_heads, s.v_head_dim).transpose(1, 2) * attn.value_scale
        q, k = apply_rope(q, pos, s.rope_dim, s.rope_theta), apply_rope(k, pos, s.rope_dim, s.rope_theta)
        self.k[i].index_copy_(1, pos, k[0].to(self.k[i].dtype))
        self.v[i].index_copy_(1, pos, v[0].to(self.v[i].dtype))
        if s.window is None:
            kpos = torch.arange(self.slots, device=x.device)
        else:                                       # only the window: W + T keys
            kpos = window_positions(pos[0] - s.window, s.window + T)
        kk, vv = self.k[i][:, kpos.clamp(min=0)][None], self.v[i][:, kpos.clamp(min=0)][None]
        o = attend(q, kk, vv, pos, kpos, s.window, attn.attention_sink_bias, s.head_dim ** -0.5)
        return attn.o_proj(o.transpose(1, 2).reshape(T, -1).to(x.dtype))

    def verify(self, ids: torch.Tensor, pos: torch.Tensor):
        model = self.target.model
        x = model.embed_tokens(ids)                                       # [T, D]
        taps = []
        tap_ids = [] if self.taps is None else self.draft.config.target_layer_ids
        for i, layer in enumerate(model.layers):
            x = x + self.attention(layer, i, layer.input_layernorm(x), pos)
            h = layer.post_attention_layernorm(x)
            x = x + (moe_static(layer.mlp, h) if isinstance(layer.mlp, MoE) else layer.mlp(h))
            if i in tap_ids:
                taps.append(x)
        logits = self.target.lm_head(model.norm(x)).float()               # [T, V]
        return logits, taps

    # --- draft ------------------------------------------------------------------------
    def run_draft(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Ingest the previous block's taps as context, then fill the block's MASK slots."""
        d, dc, T = self.draft, self.draft.config, self.T
        ctx_pos = pos - T                                                 # last step's span
        ctx = d.hidden_norm(d.fc(self.taps))                              # [T, D]
        W = min(dc.sliding_window, self.slots - 2 * T)
        win = window_positions(pos[0] - W, W)
        ctx_rope, block_rope = rope_cos_sin(ctx_pos, dc.head_dim, dc.rope_theta), \
            rope_cos_sin(pos, dc.head_dim, dc.rope_theta)
        mask = d.visibility(win, pos)
        x = d.embed_block(ids[None], self.target)
        for j, layer in enumerate(d.layers):
            k_new, v_new = layer.self_attn.context_kv(ctx[None], *ctx_rope)   # [1, G, T, Dh]
            self.dk[j].index_copy_(1, ctx_pos, k_new[0].to(self.dk[j].dtype))
            self.dv[j].index_copy_(1, ctx_pos, v_new[0].to(self.dv[j].dtype))
            rows = win.clamp(min=0)
            x = layer(x, block_rope, self.dk[j][:, rows][None], self.dv[j][:, rows][None], mask)
        return self.target.lm_head(d.norm(x)).float()[0].argmax(-1)      # [T]

    def __call__(self, ids: torch.Tensor, pos0: torch.Tensor):
        pos = pos0 + torch.arange(self.T, device=ids.device)
        if self.taps is not None:
            drafted = self.run_draft(ids, pos)
            ids = torch.cat([ids[:1], drafted[1:]])
        logits, taps = self.verify(ids, pos)
        posterior = logits.argmax(-1)
        if self.taps is not None:
            self.taps.copy_(torch.cat(taps, dim=-1))
        accepted = (ids[1:] == posterior[:-1]).long().cumprod(0).sum()
        return ids, posterior, accepted
