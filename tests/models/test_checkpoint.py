"""Checkpoint round trips (sharded / unsharded, stacked / per-expert) and every bad-input error."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilecomp.errors import CheckpointError, ConfigError
from tilecomp.models import (MiMoForCausalLM, dequantize_mxfp4, load_config, load_pretrained, preset,
                             quantize_mxfp4, save_pretrained)
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import DenseExperts, MXFP4Experts


@pytest.fixture(scope="module")
def models():
    cfg, dcfg = preset("tiny", layers=3)
    torch.manual_seed(0)
    return MiMoForCausalLM(cfg).eval(), DFlashDraft(dcfg, cfg).eval()


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    save_pretrained(*models, path)
    return path


def copy_of(saved, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(saved, dst)
    return dst


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("experts, shard_size", [("mxfp4", None), ("mxfp4", 40_000),
                                                 ("per_expert", None), ("per_expert", 30_000)])
def test_round_trip(models, tmp_path, experts, shard_size):
    target, draft = models
    save_pretrained(target, draft, str(tmp_path), shard_size=shard_size, experts=experts)
    files = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in files) == (shard_size is not None)
    names = load_file(os.path.join(tmp_path, "model.safetensors")).keys() if shard_size is None else \
        json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"].keys()
    per_expert = "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert per_expert == (experts == "per_expert")
    assert ("model.layers.1.mlp.experts.up_proj_blocks" in names) == (experts == "mxfp4")

    t2, d2 = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert isinstance(t2.model.layers[1].mlp.experts, MXFP4Experts)
    assert_same(target, t2)
    assert_same(draft, d2)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(t2(ids), target(ids))


def test_load_config_reads_no_weights(saved, models, tmp_path):
    path = copy_of(saved, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    cfg, dcfg = load_config(path)
    assert cfg == models[0].config and dcfg == models[1].config


def test_bf16_load_keeps_router_and_sinks_fp32(saved):
    target, draft = load_pretrained(saved)
    assert target.lm_head.weight.dtype == torch.bfloat16
    assert target.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert target.model.layers[1].self_attn.attention_sink_bias.dtype == torch.float32
    assert target.model.layers[1].mlp.experts.gate_proj_blocks.dtype == torch.uint8
    assert draft.fc.weight.dtype == torch.bfloat16


def test_per_expert_float_weights_are_quantized_at_load(models, tmp_path):
    """Unquantized per-expert weights + quant_method mxfp4 -> MXFP4 experts equal to quantize()."""
    target, _ = models
    save_pretrained(target, None, str(tmp_path), experts="per_expert")
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    tensors["model.layers.2.mlp.experts.7.gate_proj.weight"] = w
    save_file(tensors, file)
    t2, draft = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert draft is None
    ex = t2.model.layers[2].mlp.experts
    got = dequantize_mxfp4(ex.gate_proj_blocks[7], ex.gate_proj_scales[7])
    assert not torch.equal(got, w) and (got - w).abs().max() < 0.25 * w.abs().max()
    assert torch.equal(got, dequantize_mxfp4(*quantize_mxfp4(w)))


def test_per_expert_without_quantization_loads_dense(models, tmp_path):
    target, _ = models
    save_pretrained(target, None, str(tmp_path), experts="per_expert")
    cfg_file = tmp_path / "config.json"
    cfg = json.load(open(cfg_file))
    cfg.pop("quantization_config")
    json.dump(cfg, open(cfg_file, "w"))
    t2, _ = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert isinstance(t2.model.layers[1].mlp.experts, DenseExperts)
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(t2(ids), target(ids), rtol=0, atol=0)


def test_tied_embeddings_round_trip(tmp_path):
    cfg, _ = preset("tiny", layers=2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    target = MiMoForCausalLM(cfg)
    save_pretrained(target, None, str(tmp_path))
    assert "lm_head.weight" not in load_file(os.path.join(tmp_path, "model.safetensors"))
    t2, _ = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert t2.lm_head.weight is t2.model.embed_tokens.weight
    assert_same(target, t2)


# --- bad input ---------------------------------------------------------------

def edit_tensors(path, fn, file="model.safetensors"):
    full = os.path.join(path, file)
    tensors = load_file(full)
    fn(tensors)
    save_file(tensors, full)


def test_missing_tensor(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.gate.e_score_correction_bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.gate\."
                                              r"e_score_correction_bias' \(expected float \[16\]\)"):
        load_pretrained(path)


def test_missing_experts(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if ".experts." in k])
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.gate_proj_blocks'"
                                              r".* or 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight'"):
        load_pretrained(path)


def test_wrong_shape(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight': "
                                              r"expected shape \[64\], found \[65\]"):
        load_pretrained(path)


def test_wrong_dtype(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    key = "model.layers.2.mlp.experts.down_proj_scales"
    edit_tensors(path, lambda t: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': expected dtype uint8, found F32"):
        load_pretrained(path)


def test_wrong_per_expert_shape(models, tmp_path):
    save_pretrained(models[0], None, str(tmp_path), experts="per_expert")
    key = "model.layers.1.mlp.experts.4.down_proj.weight"
    edit_tensors(str(tmp_path), lambda t: t.update({key: torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=rf"'{key}': expected shape \[64, 32\], found \[64, 64\]"):
        load_pretrained(str(tmp_path))


def test_truncated_file(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file or truncated"):
        load_pretrained(path)


def test_not_a_safetensors_file(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    open(os.path.join(path, "dflash", "model.safetensors"), "wb").write(b"PK\x03\x04 this is a zip file")
    with pytest.raises(CheckpointError, match=r"dflash/model\.safetensors: not a valid safetensors file"):
        load_pretrained(path)


def test_unknown_quant_method(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.quant_method: "
                                              r"expected 'mxfp4' or no quantization_config, found 'fp8'"):
        load_pretrained(path)


def test_missing_shard_and_missing_weights(models, tmp_path):
    save_pretrained(models[0], None, str(tmp_path / "a"), shard_size=40_000)
    os.remove(sorted((tmp_path / "a").glob("model-00002-of-*.safetensors"))[0])
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: file not found"):
        load_pretrained(str(tmp_path / "a"))
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_pretrained(str(tmp_path / "b"))


def test_bad_config_files(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    with open(os.path.join(path, "dflash", "config.json")) as f:
        d = json.load(f)
    d["mask_token_id"] = 100_000
    with open(os.path.join(path, "dflash", "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(ConfigError, match=r"dflash/config\.json: field 'mask_token_id'.*vocab_size=512"):
        load_pretrained(path)
    open(os.path.join(path, "config.json"), "w").write('{"hidden_size": 64,\n "oops"}')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(line 2"):
        load_config(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        load_pretrained(path)


def test_loader_builds_on_meta_and_never_initialises(saved, monkeypatch):
    """No random init and no full-size temporary: modules come from the meta device."""
    import tilecomp.models.mimo as mimo

    def fail(*args, **kwargs):
        raise AssertionError("load_pretrained must not initialise weights")

    monkeypatch.setattr(mimo, "init_weights", fail)
    monkeypatch.setattr(mimo.MXFP4Experts, "set_expert", fail)      # stacked experts: no quantization
    target, _ = load_pretrained(saved, dtype=torch.float32)
    assert not any(t.is_meta for t in target.state_dict().values())


@pytest.mark.parametrize("experts", ["mxfp4", "per_expert"])
def test_trained_dense_experts_save_as_mxfp4(tmp_path, experts):
    """A model trained with DenseExperts saves either way and loads as its MXFP4 quantization."""
    cfg, _ = preset("tiny", layers=2)
    torch.manual_seed(2)
    dense = MiMoForCausalLM(cfg, experts="dense").eval()
    save_pretrained(dense, None, str(tmp_path), experts=experts)
    loaded, _ = load_pretrained(str(tmp_path), dtype=torch.float32)
    ex = dense.model.layers[1].mlp.experts
    ex.fake_quant = True                                   # the loaded model computes the quantized experts
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), dense(ids), rtol=1e-6, atol=1e-6)
