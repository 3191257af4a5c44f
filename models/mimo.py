"""MiMo-V2 target in eager PyTorch: the numerical reference for everything compiled.

Read top-down: MiMoForCausalLM -> MiMoModel -> Block -> Attention / MLP / MoE -> RMSNorm.
Module attribute names ARE the checkpoint tensor names (`state_dict()` keys).

Shape legend: B batch, T new tokens, S keys, D hidden, V vocab, H query heads,
G kv heads, Dk q/k head dim, Dv v head dim, R rope dims, F MLP width,
E experts, A active experts per token, N = B*T flattened tokens.
"""
import torch
import torch.nn.functional as F
from torch import nn

from tilecomp.errors import TilecompError

from .cache import KVCache
from .config import AttnSpec, MiMoConfig
from .mxfp4 import dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4, random_mxfp4

INIT_STD = 0.02


class Linear(nn.Linear):
    """nn.Linear without its own init (init_weights sets every weight; meta builds stay free)."""

    def reset_parameters(self):
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self):
        pass


class MiMoForCausalLM(nn.Module):
    def __init__(self, config: MiMoConfig, dtype: torch.dtype = torch.float32, experts: str = "mxfp4"):
        super().__init__()
        self.config = config
        self.model = MiMoModel(config, dtype, experts)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:
            init_weights(self)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                tap_layers: list[int] | None = None):
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] fp32 (, taps [B, T, n*D])."""
        end, limit = start_pos + input_ids.shape[1], self.config.max_position_embeddings
        if end > limit:
            raise TilecompError(f"positions up to {end - 1} requested; the model supports "
                                f"max_position_embeddings={limit}")
        h, taps = self.model(input_ids, cache, start_pos, tap_layers)
        logits = self.lm_head(h).float()                                  # [B, T, V]
        return logits if tap_layers is None else (logits, taps)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device=None, block: int = 8) -> KVCache:
        ref = self.lm_head.weight
        specs = [self.config.attn(i) for i in range(self.config.num_hidden_layers)]
        return KVCache(specs, batch, max_len, block, dtype or ref.dtype, device or ref.device)


class MiMoModel(nn.Module):
    def __init__(self, config: MiMoConfig, dtype: torch.dtype, experts: str):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, dtype, experts)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype)

    def forward(self, input_ids, cache, start_pos, tap_layers):
        x = self.embed_tokens(input_ids)                                  # [B, T, D]
        pos = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
        outputs = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cache)
            outputs[i] = x
        taps = None
        if tap_layers is not None:
            taps = torch.cat([outputs[i] for i in tap_layers], dim=-1)     # [B, T, n*D]
        return self.norm(x), taps


class Block(nn.Module):
    def __init__(self, config: MiMoConfig, layer_idx: int, dtype: torch.dtype, experts: str):
        super().__init__()
        D, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = RMSNorm(D, eps, dtype)
        self.self_attn = Attention(config.attn(layer_idx), D, layer_idx, config.attention_value_scale, dtype)
        self.post_attention_layernorm = RMSNorm(D, eps, dtype)
        if config.is_moe(layer_idx):
            self.mlp = MoE(config, dtype, experts)
        else:
            self.mlp = MLP(D, config.intermediate_size, dtype)

    def forward(self, x, pos, cache):
        x = x + self.self_attn(self.input_layernorm(x), pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to x's dtype, then scale by `weight` (in its own dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class Attention(nn.Module):
    """Full or sliding-window GQA with partial RoPE and an optional per-head sink logit."""

    def __init__(self, spec: AttnSpec, dim: int, layer_idx: int, value_scale: float | None,
                 dtype: torch.dtype):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.value_scale = 1.0 if value_scale is None else value_scale
        H, G = spec.n_heads, spec.n_kv_heads
        self.q_proj = Linear(dim, H * spec.head_dim, bias=False, dtype=dtype)
        self.k_proj = Linear(dim, G * spec.head_dim, bias=False, dtype=dtype)
        self.v_proj = Linear(dim, G * spec.v_head_dim, bias=False, dtype=dtype)
        self.o_proj = Linear(H * spec.v_head_dim, dim, bias=False, dtype=dtype)
        if spec.has_sink:
            self.attention_sink_bias = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        else:
            self.attention_sink_bias = None

    def forward(self, x, pos, cache):
        s = self.spec
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)      # [B, H, T, Dk]
        k = self.k_proj(x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)   # [B, G, T, Dk]
        v = self.v_proj(x).view(B, T, s.n_kv_heads, s.v_head_dim).transpose(1, 2)  # [B, G, T, Dv]
        v = v * self.value_scale
        q, k = apply_rope(q, pos, s.rope_dim, s.rope_theta), apply_rope(k, pos, s.rope_dim, s.rope_theta)
        if cache is None:
            kpos = pos
        else:
            k, v, kpos = cache.update(self.layer_idx, int(pos[0]), k, v)            # [B, G, S, *]
        o = attend(q, k, v, pos, kpos, s.window, self.attention_sink_bias, s.head_dim ** -0.5)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


def apply_rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """Neox-style RoPE on the first rope_dim dims of each head. x [B, *, T, Dk], pos [T]."""
    if rope_dim == 0:
        return x
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, device=x.device, dtype=torch.float32) / rope_dim)
    angles = pos.float()[:, None] * inv_freq                                # [T, R/2]
    cos, sin = angles.cos(), angles.sin()
    xr = x[..., :rope_dim].float()
    x1, x2 = xr[..., : rope_dim // 2], xr[..., rope_dim // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., rope_dim:]], dim=-1)


def attend(q, k, v, qpos, kpos, window, sink, scale):
    """Softmax attention in fp32. q [B, H, T, Dk], k [B, G, S, Dk], v [B, G, S, Dv] -> [B, H, T, Dv].

    A query at position i sees keys j with j <= i (and i - window <= j with a window).
    The sink logit (per head) joins the softmax denominator only.
    """
    H, G = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(H // G, dim=1)                        # [B, H, S, Dk]
    v = v.float().repeat_interleave(H // G, dim=1)                        # [B, H, S, Dv]
    scores = (q.float() @ k.transpose(-1, -2)) * scale                   # [B, H, T, S]
    visible = kpos[None, :] <= qpos[:, None]                             # [T, S]
    if window is not None:
        visible &= kpos[None, :] >= qpos[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return softmax_with_sink(scores, sink) @ v


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the keys of scores [..., H, T, S]; the sink logit [H] joins the denominator only."""
    if sink is None:
        return scores.softmax(dim=-1)
    sink_col = sink.float().view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink_col], dim=-1).softmax(dim=-1)[..., :-1]


class MLP(nn.Module):
    """Dense SwiGLU MLP."""

    def __init__(self, dim: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False, dtype=dtype)
        self.up_proj = Linear(dim, hidden, bias=False, dtype=dtype)
        self.down_proj = Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sigmoid-routed top-k experts, no shared expert."""

    def __init__(self, config: MiMoConfig, dtype: torch.dtype, experts: str):
        super().__init__()
        E, D, F_ = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate = Router(config)
        if experts == "mxfp4":
            self.experts = MXFP4Experts(E, D, F_, dtype)
        elif experts == "dense":
            self.experts = DenseExperts(E, D, F_, dtype)
        else:
            raise ValueError(f"experts: expected 'mxfp4' or 'dense', found {experts!r}")

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])                                    # [N, D]
        weights, idx = self.gate(h)                                       # [N, A] fp32, [N, A]
        return self.experts(h, idx, weights).view_as(x)


class Router(nn.Module):
    """fp32 router: sigmoid scores, top-k by scores + bias, weights from the unbiased scores."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        rsf = config.routed_scaling_factor
        self.routed_scaling_factor = 1.0 if rsf is None else rsf
        E, D = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.zeros(E, D, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, h):
        scores = (h.float() @ self.weight.float().T).sigmoid()            # [N, E]
        idx, weights = route_topk(scores, self.e_score_correction_bias, self.top_k)   # [N, A], [N, A]
        return route_normalize(weights, self.norm_topk_prob, self.routed_scaling_factor), idx


def route_topk(scores: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by scores + bias [N, E] -> (ids [N, k], their unbiased scores [N, k])."""
    idx = torch.topk(scores + bias, k, dim=-1).indices
    return idx, scores.gather(1, idx)


def route_normalize(weights: torch.Tensor, renorm: bool, scale: float) -> torch.Tensor:
    """Optionally renormalise the top-k weights [N, k] to sum 1, then scale them."""
    if renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


class Experts(nn.Module):
    """Shared forward of the expert stores; subclasses give `weights(ids) -> (gate, up, down)`."""

    def forward(self, h, idx, weights):
        """h [N, D], idx / weights [N, A] -> [N, D]; only the chosen experts are touched."""
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        used = idx.unique()                                               # [U]
        gate, up, down = self.weights(used)                               # [U, F, D], [U, F, D], [U, D, F]
        for j, e in enumerate(used.tolist()):
            tok, slot = torch.where(idx == e)
            x = h[tok].to(gate.dtype)                                     # [n, D]
            y = F.linear(F.silu(F.linear(x, gate[j])) * F.linear(x, up[j]), down[j])
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return out.to(h.dtype)

    def expert(self, e: int):
        """(gate [F, D], up [F, D], down [D, F]) of expert e."""
        return tuple(w[0] for w in self.weights(torch.tensor([e])))


class MXFP4Experts(Experts):
    """Packed MXFP4 weights; an expert is dequantized only when a token chose it."""

    def __init__(self, n_experts: int, dim: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype                                                # compute dtype
        for name, (N, K) in (("gate_proj", (hidden, dim)), ("up_proj", (hidden, dim)),
                             ("down_proj", (dim, hidden))):
            self.register_buffer(f"{name}_blocks", torch.zeros(n_experts, N, K // 32, 16, dtype=torch.uint8))
            self.register_buffer(f"{name}_scales", torch.zeros(n_experts, N, K // 32, dtype=torch.uint8))

    def weights(self, ids: torch.Tensor | None = None):
        """(gate, up, down) of experts `ids`, dequantized; None: all experts (no gather)."""
        names = ("gate_proj", "up_proj", "down_proj")
        if ids is None:
            return tuple(dequantize_mxfp4(getattr(self, f"{n}_blocks"), getattr(self, f"{n}_scales"),
                                          self.dtype) for n in names)
        ids = ids.to(self.gate_proj_blocks.device)
        return tuple(dequantize_mxfp4(getattr(self, f"{n}_blocks")[ids], getattr(self, f"{n}_scales")[ids],
                                      self.dtype) for n in names)

    def set_expert(self, e: int, gate, up, down):
        """Quantize one expert's [N, K] weights into slot e."""
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            blocks, scales = quantize_mxfp4(w)
            getattr(self, f"{name}_blocks")[e].copy_(blocks)
            getattr(self, f"{name}_scales")[e].copy_(scales)


class DenseExperts(Experts):
    """Trainable expert weights [E, N, K]; optional MXFP4 fake quantization (STE)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, dtype: torch.dtype, fake_quant: bool = False):
        super().__init__()
        self.fake_quant = fake_quant
        self.gate_proj = nn.Parameter(torch.zeros(n_experts, hidden, dim, dtype=dtype))
        self.up_proj = nn.Parameter(torch.zeros(n_experts, hidden, dim, dtype=dtype))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, dim, hidden, dtype=dtype))

    def weights(self, ids: torch.Tensor | None = None):
        """(gate, up, down) of experts `ids` (fake-quantized when on); None: all experts (no gather)."""
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if ids is not None:
            ids = ids.to(self.gate_proj.device)
            ws = tuple(w[ids] for w in ws)
        return tuple(fake_quantize_mxfp4(w) for w in ws) if self.fake_quant else ws

    def to_mxfp4(self) -> MXFP4Experts:
        E, F_, D = self.gate_proj.shape
        packed = MXFP4Experts(E, D, F_, self.gate_proj.dtype).to(self.gate_proj.device)
        with torch.no_grad():
            for e in range(E):
                packed.set_expert(e, self.gate_proj[e], self.up_proj[e], self.down_proj[e])
        return packed


@torch.no_grad()
def init_weights(model: MiMoForCausalLM, std: float = INIT_STD):
    """Random weights for presets: normal(std) matrices, unit norms, small sinks, MXFP4 experts."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
    for module in model.modules():
        if isinstance(module, MXFP4Experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                blocks, scales = getattr(module, f"{name}_blocks"), getattr(module, f"{name}_scales")
                b, s = random_mxfp4((*scales.shape[:-1], scales.shape[-1] * 32), std, blocks.device)
                blocks.copy_(b)
                scales.copy_(s)
        elif isinstance(module, Router):
            module.e_score_correction_bias.zero_()
