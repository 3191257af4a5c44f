"""DFlash draft module: cache == no cache, non-causal block, sliding window, mask embedding."""
import types

import pytest
import torch
from torch import nn

from tilecomp.errors import ConfigError
from tilecomp.models.config import DFlashConfig, MiMoConfig
from tilecomp.models.dflash import DFlashDraft

VOCAB, D, N_TAPS = 50, 32, 2


def tiny_configs(window=6, block=4):
    target = MiMoConfig(
        hidden_size=D, num_hidden_layers=2, vocab_size=VOCAB, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, v_head_dim=8, swa_num_attention_heads=2,
        swa_num_key_value_heads=1, swa_head_dim=16, swa_v_head_dim=8, sliding_window_size=4,
        hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 0], intermediate_size=64,
        moe_intermediate_size=0, n_routed_experts=0, num_experts_per_tok=0)
    draft = DFlashConfig(mask_token_id=VOCAB - 1, target_layer_ids=[0, 1], sliding_window=window,
                         num_hidden_layers=2, hidden_size=D, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48, block_size=block)
    return target, draft


def fake_target(seed=0):
    """Just what the draft borrows: model.embed_tokens and lm_head."""
    torch.manual_seed(seed)
    t = types.SimpleNamespace(model=types.SimpleNamespace(embed_tokens=nn.Embedding(VOCAB, D)),
                              lm_head=nn.Linear(D, VOCAB, bias=False))
    return t


def make(seed=0, **kw):
    tcfg, dcfg = tiny_configs(**kw)
    torch.manual_seed(seed)
    draft = DFlashDraft(dcfg, tcfg)
    with torch.no_grad():          # norms away from 1 so they matter
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return draft, fake_target(seed), dcfg


def block(last, s, mask_id):
    return torch.tensor([[last] + [mask_id] * (s - 1)])


def test_parameter_names_are_the_checkpoint_names():
    draft, _, _ = make()
    names = set(draft.state_dict())
    expect = {"fc.weight", "hidden_norm.weight", "norm.weight", "mask_embedding"}
    for j in range(2):
        expect |= {f"layers.{j}.input_layernorm.weight", f"layers.{j}.post_attention_layernorm.weight"}
        expect |= {f"layers.{j}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expect |= {f"layers.{j}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expect
    assert draft.state_dict()["fc.weight"].shape == (D, N_TAPS * D)


@torch.no_grad()
def test_incremental_cache_equals_full_context():
    draft, target, dcfg = make(1)
    gen = torch.Generator().manual_seed(2)
    taps = torch.randn(1, 20, N_TAPS * D, generator=gen)
    ids = torch.randint(0, VOCAB - 1, (20,), generator=gen)
    cache = draft.new_cache(1, 64)
    done = 0
    for upto in (9, 12, 13, 17, 20):            # commit a few positions per step
        blk = block(int(ids[upto - 1]), dcfg.block_size, dcfg.mask_token_id)
        cached = draft(blk, taps[:, done:upto], cache, upto, target)
        full = draft(blk, taps[:, :upto], None, upto, target)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        assert cache.length == upto
        done = upto
    # roll back and redo: same as fresh
    cache.crop(15)
    blk = block(3, dcfg.block_size, dcfg.mask_token_id)
    torch.testing.assert_close(draft(blk, taps[:, 15:18], cache, 18, target),
                               draft(blk, taps[:, :18], None, 18, target), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_block_is_not_causal_and_context_is_windowed():
    draft, target, dcfg = make(3, window=6)
    gen = torch.Generator().manual_seed(4)
    taps = torch.randn(1, 16, N_TAPS * D, generator=gen)
    blk = torch.tensor([[5, 7, 9, 11]])
    base = draft(blk, taps, None, 16, target)
    # a later block token changes the logits of an earlier slot: no causal mask
    later = draft(torch.tensor([[5, 7, 9, 12]]), taps, None, 16, target)
    assert not torch.allclose(base[:, 0], later[:, 0])
    # the first query (position 16) sees context from 10; the last (19) from 13
    far = taps.clone()
    far[:, :10] += 5.0
    torch.testing.assert_close(draft(blk, far, None, 16, target), base)
    edge = taps.clone()
    edge[:, 10] += 5.0                 # visible to slot 0 only
    moved = draft(blk, edge, None, 16, target)
    assert not torch.allclose(moved[:, 0], base[:, 0])
    assert not torch.allclose(moved[:, 3], base[:, 3])   # via slot 0's key/value
    near = taps.clone()
    near[:, 15] += 5.0
    assert not torch.allclose(draft(blk, near, None, 16, target)[:, 3], base[:, 3])


@torch.no_grad()
def test_mask_slots_use_the_learned_mask_embedding():
    draft, target, dcfg = make(5)
    taps = torch.randn(1, 8, N_TAPS * D, generator=torch.Generator().manual_seed(6))
    blk = block(3, dcfg.block_size, dcfg.mask_token_id)
    base = draft(blk, taps, None, 8, target)
    target.model.embed_tokens.weight[dcfg.mask_token_id] += 1.0      # not used for MASK
    torch.testing.assert_close(draft(blk, taps, None, 8, target), base)
    draft.mask_embedding += 1.0
    assert not torch.allclose(draft(blk, taps, None, 8, target), base)


def test_logits_shape_and_bad_context_length():
    draft, target, dcfg = make(7)
    taps = torch.randn(1, 5, N_TAPS * D)
    with torch.no_grad():
        out = draft(block(1, dcfg.block_size, dcfg.mask_token_id), taps, None, 5, target)
    assert out.shape == (1, dcfg.block_size, VOCAB) and out.dtype == torch.float32
    cache = draft.new_cache(1, 32)
    with pytest.raises(ValueError, match="do not continue the cache"):
        draft(block(1, dcfg.block_size, dcfg.mask_token_id), taps, cache, 7, target)


def test_draft_checks_its_config_against_the_target():
    tcfg, dcfg = tiny_configs()
    dcfg.mask_token_id = VOCAB
    with pytest.raises(ConfigError, match="mask_token_id"):
        DFlashDraft(dcfg, tcfg)
