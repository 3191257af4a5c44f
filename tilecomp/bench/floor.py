"""The bandwidth floor of one decode step: bytes that must cross HBM once.

floor_s = step_bytes / measured copy bandwidth. Counted once each (DESIGN.md,
"Performance method"): target attention and dense weights, the router, the
MXFP4 bytes (nibbles + E8M0 scales) of the experts actually routed this step
(unique experts per layer, measured), norms, the LM head, the draft (when on),
the KV cache a step must read (full layers: the whole context; SWA layers:
the window), the KV it writes, and the block's activations (small).

Shape legend: T block tokens, C context, D hidden, E experts, F expert width,
V vocab, G kv heads, Dk / Dv head dims.
"""
from dataclasses import dataclass, field

from tilecomp.models import DFlashConfig, MiMoConfig

MXFP4_BYTES_PER_ELEM = 0.5 + 1 / 32        # a nibble plus one E8M0 byte per 32 elements


@dataclass
class StepBytes:
    """Bytes by category for one step; `total` is what the floor divides."""
    parts: dict = field(default_factory=dict)

    def add(self, name: str, nbytes: float):
        self.parts[name] = self.parts.get(name, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def kv_read_positions(window: int | None, context: int, block: int) -> int:
    """Keys a block of `block` queries at positions context.. must read from the cache."""
    if window is None:
        return context
    return min(context, window + block - 1)


def target_bytes(cfg: MiMoConfig, context: int, block: int, unique_experts: list[int],
                 wbytes: int = 2, expert_bytes: float = MXFP4_BYTES_PER_ELEM) -> StepBytes:
    """unique_experts[i]: distinct experts layer i's block tokens chose (ignored on dense layers)."""
    D, out = cfg.hidden_size, StepBytes()
    for i in range(cfg.num_hidden_layers):
        s = cfg.attn(i)
        qkvo = D * (s.n_heads * s.head_dim + s.n_kv_heads * (s.head_dim + s.v_head_dim)) \
            + s.n_heads * s.v_head_dim * D
        out.add("attention_weights", qkvo * wbytes)
        out.add("norms", 2 * D * wbytes)
        kv_row = s.n_kv_heads * (s.head_dim + s.v_head_dim) * wbytes
        out.add("kv_read", kv_read_positions(s.window, context, block) * kv_row)
        out.add("kv_write", block * kv_row)
        if cfg.is_moe(i):
            E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
            out.add("router", E * D * 4 + E * 4)
            out.add("experts_routed", unique_experts[i] * 3 * F * D * expert_bytes)
        else:
            out.add("dense_mlp", 3 * D * cfg.intermediate_size * wbytes)
        out.add("activations", 4 * block * D * wbytes)
    out.add("lm_head", cfg.vocab_size * D * wbytes)
    out.add("embedding_rows", block * D * wbytes)
    return out


def draft_bytes(dcfg: DFlashConfig, context: int, block: int, wbytes: int = 2) -> StepBytes:
    """The DFlash draft's own weights and context KV (its LM head is the target's, counted once)."""
    D, H, G, Dh = dcfg.hidden_size, dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.head_dim
    out = StepBytes()
    out.add("draft_weights", len(dcfg.target_layer_ids) * D * D * wbytes)           # fc
    per_layer = D * (H * Dh + 2 * G * Dh) + H * Dh * D + 3 * D * dcfg.intermediate_size
    out.add("draft_weights", dcfg.num_hidden_layers * per_layer * wbytes)
    out.add("draft_kv_read", dcfg.num_hidden_layers * min(context, dcfg.sliding_window)
            * 2 * G * Dh * wbytes)
    out.add("activations", dcfg.num_hidden_layers * 4 * block * D * wbytes)
    return out


def step_bytes(cfg: MiMoConfig, dcfg: DFlashConfig | None, context: int, block: int,
               unique_experts: list[int], expert_bytes: float = MXFP4_BYTES_PER_ELEM) -> StepBytes:
    out = target_bytes(cfg, context, block, unique_experts, expert_bytes=expert_bytes)
    if dcfg is not None and block > 1:
        for name, n in draft_bytes(dcfg, context, block).parts.items():
            out.add(name, n)
    return out
