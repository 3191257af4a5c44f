import torch

from tilecomp.models.mimo import DenseExperts, MiMoForCausalLM
from tilecomp.train import loop
from tilecomp.train import target as tg
from tilecomp.train.data import TokenData

from train_helpers import VOCAB, repeating_stream

CPU = torch.device("cpu")
SETTINGS = tg.TargetSettings(batch=4, seq_len=24, lr=1e-2, eval_every=1000, eval_windows=2)


def tiny_data():
    s = repeating_stream(4000)
    return TokenData(None, s, repeating_stream(600, seed=0), repeating_stream(300, seed=0), VOCAB)


def test_grouped_experts_match_reference_experts(tiny_cfgs):
    torch.manual_seed(0)
    model = tg.build_trainable(tiny_cfgs[0])
    experts = model.model.layers[1].mlp.experts
    h = torch.randn(40, 32, requires_grad=True)
    idx = torch.randint(0, 16, (40, 2))
    w = torch.rand(40, 2)
    fast = experts(h, idx, w)
    ref = DenseExperts.forward(experts, h, idx, w)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast.square().sum(), experts.gate_proj)[0]
    g_ref = torch.autograd.grad(ref.square().sum(), experts.gate_proj)[0]
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


def test_packed_mxfp4_model_computes_what_was_trained(tiny_cfgs):
    model = tg.build_trainable(tiny_cfgs[0], seed=1)
    packed = tg.to_mxfp4(model, dtype=torch.float32)
    assert not any(isinstance(m, DenseExperts) for m in packed.modules())
    ids = torch.randint(2, VOCAB, (2, 20))
    torch.testing.assert_close(packed(ids), model(ids), rtol=1e-4, atol=1e-4)
    tg.set_fake_quant(model, False)
    assert (packed(ids) - model(ids)).abs().max() > 1e-5   # the unquantized model differs


def test_a_few_steps_reduce_loss(tiny_cfgs, tmp_path):
    data = tiny_data()
    before = tg.heldout_loss(tg.build_trainable(tiny_cfgs[0]), data.heldout, 24, 8, CPU)
    result = tg.train_target(tiny_cfgs[0], data, tmp_path, loop.Budget(steps=12), SETTINGS, CPU,
                             progress=False)
    after = tg.heldout_loss(result["model"], data.heldout, 24, 8, CPU)
    assert result["done"] and after < before - 0.5
    assert (tmp_path / "target_loss.png").stat().st_size > 1000


def test_resume_continues_exactly(tiny_cfgs, tmp_path):
    data = tiny_data()
    straight = tg.train_target(tiny_cfgs[0], data, tmp_path / "a", loop.Budget(steps=6), SETTINGS, CPU,
                               progress=False)
    first = tg.train_target(tiny_cfgs[0], data, tmp_path / "b", loop.Budget(steps=6, chunk_steps=3),
                            SETTINGS, CPU, progress=False)
    assert not first["done"] and first["step"] == 3
    second = tg.train_target(tiny_cfgs[0], data, tmp_path / "b", loop.Budget(steps=6, chunk_steps=3),
                             SETTINGS, CPU, progress=False)
    assert second["done"] and second["step"] == 6
    for (name, a), b in zip(straight["model"].state_dict().items(), second["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_router_bias_moves_towards_balance(tiny_cfgs):
    model = tg.build_trainable(tiny_cfgs[0])
    load = tg.RouterLoad(model)
    model(torch.randint(2, VOCAB, (2, 16)))
    counts = load.counts[0].clone()
    load.update_bias(0.01)
    bias = load.routers[0].e_score_correction_bias
    busiest, idlest = int(counts.argmax()), int(counts.argmin())
    assert bias[busiest] < 0 < bias[idlest]


def test_lr_schedule_warms_up_then_decays():
    values = [loop.lr_factor(p / 100) for p in range(101)]
    peak = values.index(max(values))
    assert 0 < peak <= 4 and values[0] < 0.05 and abs(values[-1] - 0.1) < 1e-6
    assert all(a >= b - 1e-12 for a, b in zip(values[peak:], values[peak + 1:]))


def test_state_is_checkpoint_layout(tiny_cfgs, tmp_path):
    """The trained model saves and loads through the shared checkpoint code."""
    from tilecomp.models.checkpoint import load_pretrained, save_pretrained
    model = tg.build_trainable(tiny_cfgs[0], seed=2)
    packed = tg.to_mxfp4(model, dtype=torch.float32)
    save_pretrained(packed, None, tmp_path)
    loaded, draft = load_pretrained(tmp_path, dtype=torch.float32)
    assert draft is None and isinstance(loaded, MiMoForCausalLM)
    ids = torch.randint(2, VOCAB, (1, 12))
    torch.testing.assert_close(loaded(ids), packed(ids), rtol=1e-4, atol=1e-4)


def test_mixed_experts_match_grouped_experts_forward_and_grad(tiny_cfgs):
    """The GPU forward (every expert on every token, masked by the routing weights) is the
    same function, with the same gradients, as the sparse one."""
    torch.manual_seed(3)
    model = tg.build_trainable(tiny_cfgs[0], moe="mixed")
    experts = model.model.layers[1].mlp.experts
    assert experts.mixed
    h = torch.randn(40, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:2] for _ in range(40)])
    w = torch.rand(40, 2)
    mixed = experts(h, idx, w)
    experts.mixed = False
    grouped = experts(h, idx, w)
    torch.testing.assert_close(mixed, grouped, rtol=1e-5, atol=1e-6)
    for p in (experts.gate_proj, experts.down_proj, h):
        experts.mixed = True
        g_mixed = torch.autograd.grad(experts(h, idx, w).square().sum(), p)[0]
        experts.mixed = False
        g_grouped = torch.autograd.grad(experts(h, idx, w).square().sum(), p)[0]
        torch.testing.assert_close(g_mixed, g_grouped, rtol=1e-4, atol=1e-6)
    assert g_grouped.abs().max() > 0


def test_frozen_mixed_target_matches_packed_target(tiny_cfgs):
    from tilecomp.train.mixed import MixedFrozenExperts, use_mixed_experts
    packed = tg.to_mxfp4(tg.build_trainable(tiny_cfgs[0], seed=2), dtype=torch.float32)
    ids = torch.randint(2, VOCAB, (2, 20))
    want = packed(ids)
    use_mixed_experts(packed)
    assert any(isinstance(m, MixedFrozenExperts) for m in packed.modules())
    torch.testing.assert_close(packed(ids), want, rtol=1e-4, atol=1e-5)


def test_unknown_moe_forward_is_named():
    import pytest
    from tilecomp.errors import TilecompError
    with pytest.raises(TilecompError, match="moe"):
        tg.build_trainable(None, moe="sparse")
    with pytest.raises(TilecompError, match="settings moe"):
        tg.resolve_moe("sparse", torch.device("cpu"))
    assert tg.resolve_moe("auto", torch.device("cpu")) == "grouped"


def test_residual_dropout_acts_in_training_only(tiny_cfgs):
    model = tg.build_trainable(tiny_cfgs[0], seed=4)
    ids = torch.randint(2, VOCAB, (2, 16))
    model.eval()
    clean = model(ids)
    handles = tg.add_residual_dropout(model, 0.5)
    assert len(handles) == 2 * len(model.model.layers)
    torch.testing.assert_close(model(ids), clean, rtol=0, atol=0)        # eval: identity
    model.train()
    assert (model(ids) - clean).abs().max() > 1e-3                       # training: dropped
    for h in handles:
        h.remove()
    model.eval()
    torch.testing.assert_close(model(ids), clean, rtol=0, atol=0)


def test_distinct_lines_measures_repetition():
    from tilecomp.train.evaluate import distinct_lines
    assert distinct_lines("a = 1\nb = 2\n\n    c = 3\n") == 1.0
    assert distinct_lines("x\nx\nx\ny\n") == 0.5
    assert distinct_lines("  \n") == 1.0
