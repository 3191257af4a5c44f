"""Named model shapes: `preset(name, layers=None) -> (MiMoConfig, DFlashConfig)`.

- tiny:          seconds on CPU; every feature present (full + SWA layers, dense + MoE,
                 a window of 8 that tests cross).
- small:         a GPU benchmark size.
- mimo-v2-flash: the real MiMo-V2-Flash shapes (DESIGN.md).
- mimo-v2.5-pro: reported shapes (hidden 6144, 70 layers = 1 dense + 69 MoE, 384 experts top-8,
                 128 query / 8 KV heads). ASSUMED by analogy to Flash: head dims 192/128, SWA
                 layers with twice the KV heads (16), the same hybrid pattern, window, thetas,
                 expert width 2048, dense width 4 * hidden.
DFlash drafts: 5 layers, block 8, window 1024 for the big ones; the draft's own attention
sizes (32 heads, 4 KV heads, head dim 128) are ASSUMED. `mask_token_id` is the last vocab id.
`layers=N` keeps the first N target layers and respreads the taps over them.
"""
import dataclasses

from tilecomp.errors import ConfigError

from .config import DFlashConfig, MiMoConfig


def mimo_layer_pattern(n_layers: int) -> list[int]:
    """1 = SWA; full attention at layer 0 and every 6th layer (i + 1) % 6 == 0."""
    return [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(n_layers)]


def spread_taps(n_layers: int, n_taps: int) -> list[int]:
    """n_taps layer ids spread from the first to the last layer (e.g. 48, 5 -> 0, 11, 23, 35, 47)."""
    if n_taps == 1:
        return [n_layers - 1]
    ids = [(n_layers - 1) * j // (n_taps - 1) for j in range(n_taps)]
    return sorted(set(ids))


def mimo_target(hidden, layers, vocab, heads, kv, swa_kv, head_dim, v_head_dim, window, inter,
            moe_inter, experts, top_k, max_pos, **over) -> MiMoConfig:
    """A MiMo-layout config (layer 0 full + dense, SWA except every 6th, MXFP4 experts);
    `over` sets any other field."""
    fields = dict(
        hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, v_head_dim=v_head_dim,
        swa_num_attention_heads=heads, swa_num_key_value_heads=swa_kv, swa_head_dim=head_dim,
        swa_v_head_dim=v_head_dim, sliding_window_size=window,
        hybrid_layer_pattern=mimo_layer_pattern(layers), moe_layer_freq=[0] + [1] * (layers - 1),
        intermediate_size=inter, moe_intermediate_size=moe_inter, n_routed_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=max_pos,
        quantization_config={"quant_method": "mxfp4"})
    fields.update(over)
    return MiMoConfig(**fields)


def _draft(target: MiMoConfig, layers, heads, kv, head_dim, inter, window, n_taps) -> DFlashConfig:
    return DFlashConfig(
        mask_token_id=target.vocab_size - 1,
        target_layer_ids=spread_taps(target.num_hidden_layers, n_taps),
        sliding_window=window, num_hidden_layers=layers, hidden_size=target.hidden_size,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        intermediate_size=inter, block_size=8, rope_theta=10_000.0,
        layernorm_epsilon=target.layernorm_epsilon)


def _tiny():
    t = mimo_target(hidden=64, layers=6, vocab=512, heads=4, kv=1, swa_kv=2, head_dim=24, v_head_dim=16,
                window=8, inter=128, moe_inter=32, experts=16, top_k=4, max_pos=4096)
    return t, _draft(t, layers=2, heads=4, kv=2, head_dim=16, inter=128, window=16, n_taps=3)


def _small():
    t = mimo_target(hidden=1536, layers=8, vocab=32768, heads=16, kv=2, swa_kv=4, head_dim=192,
                v_head_dim=128, window=128, inter=6144, moe_inter=768, experts=64, top_k=8,
                max_pos=32768)
    return t, _draft(t, layers=2, heads=16, kv=4, head_dim=128, inter=6144, window=512, n_taps=3)


def _flash():
    t = mimo_target(hidden=4096, layers=48, vocab=152576, heads=64, kv=4, swa_kv=8, head_dim=192,
                v_head_dim=128, window=128, inter=16384, moe_inter=2048, experts=256, top_k=8,
                max_pos=262144)
    return t, _draft(t, layers=5, heads=32, kv=4, head_dim=128, inter=16384, window=1024, n_taps=5)


def _pro():
    t = mimo_target(hidden=6144, layers=70, vocab=152576, heads=128, kv=8, swa_kv=16, head_dim=192,
                v_head_dim=128, window=128, inter=24576, moe_inter=2048, experts=384, top_k=8,
                max_pos=262144)
    return t, _draft(t, layers=5, heads=32, kv=4, head_dim=128, inter=24576, window=1024, n_taps=5)


PRESETS = {"tiny": _tiny, "small": _small, "mimo-v2-flash": _flash, "mimo-v2.5-pro": _pro}


def preset(name: str, layers: int | None = None) -> tuple[MiMoConfig, DFlashConfig]:
    if name not in PRESETS:
        raise ConfigError(f"preset: expected one of {sorted(PRESETS)}, found {name!r}")
    target, draft = PRESETS[name]()
    if layers is None:
        return target, draft
    if not 1 <= layers <= target.num_hidden_layers:
        raise ConfigError(f"--layers: expected 1..{target.num_hidden_layers} for preset {name!r}, "
                          f"found {layers}")
    draft = dataclasses.replace(draft, target_layer_ids=spread_taps(layers, len(draft.target_layer_ids)))
    return first_layers(target, layers), draft


def first_layers(target: MiMoConfig, layers: int) -> MiMoConfig:
    """The config of the first `layers` target layers (attention and MoE patterns cut to match)."""
    return dataclasses.replace(target, num_hidden_layers=layers,
                               hybrid_layer_pattern=target.hybrid_layer_pattern[:layers],
                               moe_layer_freq=target.moe_layer_freq[:layers])
