"""The model shipped under examples/model/ (the default of `tilecomp generate`)."""
import json
import os
from pathlib import Path

import torch

from tilecomp.cli import main
from tilecomp.commands import generate
from tilecomp.models.checkpoint import load_config, load_pretrained
from tilecomp.runtime.reference import ReferenceEngine
from tilecomp.train.tokenizer import load_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "model"


def test_default_checkpoint_is_the_shipped_model():
    assert Path(generate.DEFAULT_CHECKPOINT).resolve() == SHIPPED


def test_shipped_files_are_small_and_experts_are_mxfp4():
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total < 40 * 2**20
    assert all(f.stat().st_size < 16 * 2**20 for f in SHIPPED.rglob("*") if f.is_file())
    cfg, dcfg = load_config(SHIPPED)
    assert cfg.n_routed_experts >= 16 and 0 in cfg.hybrid_layer_pattern and 1 in cfg.hybrid_layer_pattern
    assert cfg.add_swa_attention_sink_bias and 0 < cfg.partial_rotary_factor < 1
    assert dcfg.block_size == 8 and len(dcfg.target_layer_ids) >= 2
    index = json.loads((SHIPPED / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("mlp.experts.gate_proj_blocks") for k in index)
    assert not any(".experts.0." in k for k in index)          # stored packed, not per expert


def test_speculative_output_equals_plain_greedy_on_the_shipped_model():
    target, draft = load_pretrained(SHIPPED, dtype=torch.float32)
    tok = load_tokenizer(SHIPPED)
    prompt = tok.encode("def fibonacci(n):").ids
    engine = ReferenceEngine(target, draft, max_len=128)
    spec = engine.generate(prompt, 24)
    plain = engine.generate(prompt, 24, use_draft=False)
    assert spec.tokens == plain.tokens
    assert sum(spec.acceptance) > 0                               # some drafted tokens accepted


def test_generate_without_checkpoint_uses_the_shipped_model(capsys):
    assert main(["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["tokens"]) == 16 and report["mean_acceptance"] >= 1.0
    assert isinstance(report["text"], str) and os.path.isdir(generate.DEFAULT_CHECKPOINT)
