"""Our MiMo target against transformers' own MiMoV2FlashForCausalLM (fp32, MXFP4-exact experts)."""
import pytest
import torch

from tilecomp.models import MiMoConfig, MiMoForCausalLM, dequantize_mxfp4

transformers = pytest.importorskip("transformers")
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM  # noqa: E402

HYBRID = [0, 1, 1, 0, 1, 1, 0]      # full / SWA, several of each
MOE = [0, 1, 1, 1, 0, 1, 1]         # dense on a full and on an SWA layer


def our_config(norm_topk_prob: bool, routed_scaling_factor) -> MiMoConfig:
    # transformers' MiMo has SWA layers with 2x the KV heads and the same head dims.
    return MiMoConfig(
        hidden_size=64, num_hidden_layers=len(HYBRID), vocab_size=160,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=24, swa_v_head_dim=16,
        sliding_window_size=5, hybrid_layer_pattern=HYBRID, moe_layer_freq=MOE,
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
        rope_theta=50_000.0, swa_rope_theta=300.0, partial_rotary_factor=0.334,
        attention_value_scale=0.5, layernorm_epsilon=1e-5, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor)


def hf_config(cfg: MiMoConfig) -> MiMoV2FlashConfig:
    rope = lambda theta: {"rope_type": "default", "rope_theta": theta,  # noqa: E731
                          "partial_rotary_factor": cfg.partial_rotary_factor}
    hf = MiMoV2FlashConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, v_head_dim=cfg.v_head_dim,
        sliding_window_size=cfg.sliding_window_size,
        layer_types=["sliding_attention" if s else "full_attention" for s in cfg.hybrid_layer_pattern],
        mlp_layer_types=["sparse" if m else "dense" for m in cfg.moe_layer_freq],
        rope_parameters={"full_attention": rope(cfg.rope_theta), "sliding_attention": rope(cfg.swa_rope_theta)},
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, attention_value_scale=cfg.attention_value_scale,
        rms_norm_eps=cfg.layernorm_epsilon, tie_word_embeddings=False)
    hf._attn_implementation = "eager"
    return hf


def randomize(model: MiMoForCausalLM, gen: torch.Generator):
    """Make every parameter matter: non-unit norms, strong router, visible sinks and biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("attention_sink_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def hf_state_dict(model: MiMoForCausalLM) -> dict:
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith("attention_sink_bias"):
            out[key.replace("attention_sink_bias", "sinks")] = t
        elif ".mlp.experts." in key:
            continue
        else:
            out[key] = t
    for i, layer in enumerate(model.model.layers):
        if model.config.is_moe(i):
            ex = layer.mlp.experts
            gate = dequantize_mxfp4(ex.gate_proj_blocks, ex.gate_proj_scales)      # [E, F, D]
            up = dequantize_mxfp4(ex.up_proj_blocks, ex.up_proj_scales)            # [E, F, D]
            down = dequantize_mxfp4(ex.down_proj_blocks, ex.down_proj_scales)      # [E, D, F]
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"model.layers.{i}.mlp.experts.down_proj"] = down
    return out


@pytest.mark.parametrize("norm_topk_prob, rsf, seed", [(True, None, 0), (False, 2.5, 1)])
def test_logits_match_transformers(norm_topk_prob, rsf, seed):
    cfg = our_config(norm_topk_prob, rsf)
    torch.manual_seed(seed)
    ours = MiMoForCausalLM(cfg, dtype=torch.float32)
    randomize(ours, torch.Generator().manual_seed(seed))
    hf = MiMoV2FlashForCausalLM(hf_config(cfg)).float().eval()
    hf.load_state_dict(hf_state_dict(ours), strict=True)

    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        got = ours(ids)
        want = hf(input_ids=ids).logits
    assert got.shape == want.shape == (2, 19, cfg.vocab_size)
    assert want.abs().max() > 1e-2                      # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_parity_is_sensitive_to_sinks():
    """A wrong sink changes the logits: the comparison above would notice a dropped sink."""
    cfg = our_config(True, None)
    torch.manual_seed(3)
    ours = MiMoForCausalLM(cfg, dtype=torch.float32)
    randomize(ours, torch.Generator().manual_seed(3))
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = ours(ids)
        ours.model.layers[1].self_attn.attention_sink_bias.add_(2.0)
        after = ours(ids)
    assert (before - after).abs().max() > 1e-3
