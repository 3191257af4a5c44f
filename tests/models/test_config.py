"""Config validation and presets: every bad field gives one clear ConfigError."""
import pytest

from tilecomp.errors import ConfigError
from tilecomp.models import PRESETS, DFlashConfig, MiMoConfig, preset


def tiny_dict() -> dict:
    return preset("tiny")[0].to_dict()


def test_round_trip_keeps_unknown_hf_fields():
    d = {**tiny_dict(), "architectures": ["MiMoV2FlashForCausalLM"], "some_future_field": 3,
         "n_shared_experts": 0, "hidden_act": "silu"}
    cfg = MiMoConfig.from_dict(d)
    assert cfg.to_dict() == d
    assert MiMoConfig.from_dict(cfg.to_dict()) == cfg


def test_attn_spec_per_layer_kind():
    cfg = MiMoConfig.from_dict({**tiny_dict(), "partial_rotary_factor": 0.3})
    full, swa = cfg.attn(0), cfg.attn(1)
    assert full.window is None and not full.has_sink and full.rope_theta == cfg.rope_theta
    assert swa.window == cfg.sliding_window_size and swa.has_sink and swa.rope_theta == cfg.swa_rope_theta
    assert swa.n_kv_heads == cfg.swa_num_key_value_heads and full.n_kv_heads == cfg.num_key_value_heads
    assert full.rope_dim == 6                       # int(24 * 0.3) = 7 -> rounded down to even


@pytest.mark.parametrize("change, match", [
    ({"hiden_size": 64, "hidden_size": None}, r"src\.json: unknown field 'hiden_size' \(did you mean 'hidden_size'"),
    ({"vocab_size": None}, r"src\.json: missing field 'vocab_size' \(int\)"),
    ({"routed_scaling_factr": 1.0}, r"unknown field 'routed_scaling_factr' \(did you mean 'routed_scaling_factor'"),
    ({"num_hidden_layers": "6"}, r"src\.json: field 'num_hidden_layers': expected an integer, found str"),
    ({"norm_topk_prob": 1}, r"field 'norm_topk_prob': expected true/false, found int"),
    ({"rope_theta": True}, r"field 'rope_theta': expected a number"),
    ({"hybrid_layer_pattern": [0, 1, 1]}, r"field 'hybrid_layer_pattern': expected 6 entries .*found 3"),
    ({"moe_layer_freq": [0, 1, 1, 1, 1, 1, 1]}, r"field 'moe_layer_freq': expected 6 entries"),
    ({"moe_layer_freq": [0, 1, 2, 1, 1, 1]}, r"field 'moe_layer_freq': expected entries 0 or 1, found 2"),
    ({"hybrid_layer_pattern": "010"}, r"field 'hybrid_layer_pattern': expected a list"),
    ({"num_key_value_heads": 3}, r"field 'num_key_value_heads': expected a divisor"),
    ({"num_experts_per_tok": 99}, r"field 'num_experts_per_tok': expected <= n_routed_experts=16"),
    ({"quantization_config": {"bits": 4}}, r"field 'quantization_config'"),
    ({"hidden_size": 0}, r"field 'hidden_size': expected a positive value, found 0"),
    ({"n_shared_experts": 1}, r"field 'n_shared_experts': this reference supports only 0, found 1"),
    ({"scoring_func": "softmax"}, r"field 'scoring_func': this reference supports only 'sigmoid'"),
])
def test_bad_target_fields(change, match):
    d = tiny_dict()
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=match):
        MiMoConfig.from_dict(d, source="src.json")


def test_not_an_object():
    with pytest.raises(ConfigError, match="expected a JSON object, found list"):
        MiMoConfig.from_dict([1, 2], source="x.json")


@pytest.mark.parametrize("change, match", [
    ({"mask_token_id": 512}, r"d\.json: field 'mask_token_id': expected a token id below .*vocab_size=512, found 512"),
    ({"target_layer_ids": [0, 6]}, r"field 'target_layer_ids': expected layer ids in \[0, 6\), found 6"),
    ({"hidden_size": 32}, r"field 'hidden_size': expected the target's hidden_size=64, found 32"),
    ({"target_layer_ids": []}, r"field 'target_layer_ids': expected at least one layer"),
    ({"block_sise": 8}, r"unknown field 'block_sise' \(did you mean 'block_size'"),
    ({"sliding_window": 1.5}, r"field 'sliding_window': expected an integer, found float"),
])
def test_bad_draft_fields(change, match):
    target, draft = preset("tiny")
    d = {**draft.to_dict(), **change}
    with pytest.raises(ConfigError, match=match):
        DFlashConfig.from_dict(d, source="d.json", target=target)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_truncate(name):
    target, draft = preset(name)
    assert MiMoConfig.from_dict(target.to_dict()) == target
    draft.check_target(target)
    assert draft.block_size == 8
    assert draft.target_layer_ids[-1] == target.num_hidden_layers - 1
    kinds = {target.is_swa(i) for i in range(target.num_hidden_layers)}
    assert kinds == {True, False}
    short, sdraft = preset(name, layers=3)
    assert short.num_hidden_layers == 3 and len(short.hybrid_layer_pattern) == 3
    assert all(0 <= t < 3 for t in sdraft.target_layer_ids)
    sdraft.check_target(short)


def test_real_flash_shapes():
    t, d = preset("mimo-v2-flash")
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.vocab_size) == (4096, 48, 256, 152576)
    assert sum(t.hybrid_layer_pattern) == 39 and t.attn(0).rope_dim == 64
    assert d.target_layer_ids == [0, 11, 23, 35, 47] and d.sliding_window == 1024


def test_unknown_preset_and_bad_layers():
    with pytest.raises(ConfigError, match="expected one of .*found 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="--layers: expected 1..6"):
        preset("tiny", layers=7)
