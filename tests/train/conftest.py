"""Shared tiny fixtures for the training tests (seconds on one CPU core)."""
import pytest
import torch

from tilecomp.models.config import DFlashConfig, MiMoConfig
from tilecomp.models.presets import mimo_layer_pattern

from train_helpers import VOCAB


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfgs():
    """3 layers (full, SWA, SWA; dense then 2 MoE of 16 experts), a 1-layer draft."""
    target = MiMoConfig(
        hidden_size=32, num_hidden_layers=3, vocab_size=VOCAB, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, v_head_dim=8, swa_num_attention_heads=2,
        swa_num_key_value_heads=2, swa_head_dim=16, swa_v_head_dim=8, sliding_window_size=6,
        hybrid_layer_pattern=mimo_layer_pattern(3), moe_layer_freq=[0, 1, 1], intermediate_size=64,
        moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=2,
        partial_rotary_factor=0.5, max_position_embeddings=256,
        quantization_config={"quant_method": "mxfp4"})
    draft = DFlashConfig(mask_token_id=1, target_layer_ids=[0, 2], sliding_window=8,
                         num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return target, draft
