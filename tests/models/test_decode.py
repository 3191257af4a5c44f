"""Cached decode (token by token, blocks of 8 with rollback) equals the full forward."""
import pytest
import torch

from tilecomp.errors import TilecompError
from tilecomp.models import MiMoForCausalLM, preset

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg, _ = preset("tiny")                 # window 8, full + SWA layers, dense + MoE
    torch.manual_seed(0)
    model = MiMoForCausalLM(cfg, dtype=torch.float32).eval()
    with torch.no_grad():                   # visible sinks and a selection bias
        for layer in model.model.layers:
            if layer.self_attn.attention_sink_bias is not None:
                layer.self_attn.attention_sink_bias.normal_(0, 1)
            if cfg.is_moe(layer.self_attn.layer_idx):
                layer.mlp.gate.weight.normal_(0, 0.3)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def tokens(n, seed, vocab=512, batch=2):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_token_by_token_across_the_window(tiny):
    ids = tokens(26, 0)
    full = tiny(ids)
    cache = tiny.new_cache(2, 64)
    outs = [tiny(ids[:, :5], cache, 0)]
    for p in range(5, 26):
        outs.append(tiny(ids[:, p:p + 1], cache, p))
    assert cache.length == 26
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


@torch.no_grad()
def test_blocks_of_8_with_rollback(tiny):
    """Write 8-token blocks, keep a random prefix of each (crop), continue from there."""
    gen = torch.Generator().manual_seed(1)
    seq = tokens(6, 2)
    cache = tiny.new_cache(2, 96, block=8)
    tiny(seq, cache, 0)
    for step in range(6):
        p = seq.shape[1]
        block = tokens(8, 100 + step)
        got = tiny(block, cache, p)
        want = tiny(torch.cat([seq, block], dim=1))[:, p:]
        torch.testing.assert_close(got, want, **TOL)
        keep = int(torch.randint(1, 9, (1,), generator=gen))
        seq = torch.cat([seq, block[:, :keep]], dim=1)
        cache.crop(seq.shape[1])
    assert seq.shape[1] > 8 + 8                 # the sliding window was crossed


@torch.no_grad()
def test_long_prefill_then_decode(tiny):
    ids = tokens(30, 3, batch=1)
    full = tiny(ids)
    cache = tiny.new_cache(1, 40)
    torch.testing.assert_close(tiny(ids[:, :27], cache, 0), full[:, :27], **TOL)   # prefill > ring size
    torch.testing.assert_close(tiny(ids[:, 27:], cache, 27), full[:, 27:], **TOL)


@torch.no_grad()
def test_swa_ring_is_window_plus_block(tiny):
    cache = tiny.new_cache(1, 1000, block=8)
    cfg = tiny.config
    for i in range(cfg.num_hidden_layers):
        want = cfg.sliding_window_size + 8 if cfg.is_swa(i) else 1000
        assert cache.k[i].shape[2] == cache.v[i].shape[2] == want


@torch.no_grad()
def test_rolling_back_past_the_ring_is_an_error(tiny):
    cache = tiny.new_cache(1, 64, block=8)
    tiny(tokens(40, 4, batch=1), cache, 0)
    cache.crop(20)                               # ring holds 24..39 only
    with pytest.raises(ValueError, match="crop back at most"):
        tiny(tokens(1, 5, batch=1), cache, 20)


@torch.no_grad()
def test_writing_past_max_len_is_an_error(tiny):
    cache = tiny.new_cache(1, 10)
    with pytest.raises(TilecompError, match="max_len=10"):
        tiny(tokens(11, 6, batch=1), cache, 0)


@torch.no_grad()
def test_taps_are_layer_outputs_in_list_order(tiny):
    ids = tokens(7, 7)
    last = tiny.config.num_hidden_layers - 1
    logits, taps = tiny(ids, tap_layers=[last, 0, 2])
    D = tiny.config.hidden_size
    assert taps.shape == (2, 7, 3 * D)
    torch.testing.assert_close(tiny.lm_head(tiny.model.norm(taps[..., :D])), logits, **TOL)
    _, first = tiny(ids, tap_layers=[0])
    torch.testing.assert_close(taps[..., D:2 * D], first, rtol=0, atol=0)
    # cached taps equal full-forward taps
    cache = tiny.new_cache(2, 16)
    _, t1 = tiny(ids[:, :4], cache, 0, tap_layers=[last, 0, 2])
    _, t2 = tiny(ids[:, 4:], cache, 4, tap_layers=[last, 0, 2])
    torch.testing.assert_close(torch.cat([t1, t2], dim=1), taps, **TOL)


@torch.no_grad()
def test_bf16_model_runs_and_tracks_fp32(tiny):
    ids = tokens(10, 8, batch=1)
    bf = MiMoForCausalLM(tiny.config, dtype=torch.bfloat16)
    bf.load_state_dict(tiny.state_dict())
    assert bf.model.layers[1].mlp.gate.weight.dtype == torch.float32       # router stays fp32
    got, want = bf(ids), tiny(ids)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@torch.no_grad()
def test_positions_past_max_position_embeddings_are_an_error():
    cfg, _ = preset("tiny", layers=1)
    cfg.max_position_embeddings = 12
    model = MiMoForCausalLM(cfg)
    model(tokens(12, 9, batch=1))
    with pytest.raises(TilecompError, match="positions up to 12 requested.*max_position_embeddings=12"):
        model(tokens(3, 9, batch=1), start_pos=10)
