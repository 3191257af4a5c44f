import torch

from tilecomp.models.dflash import DFlashDraft
from tilecomp.train import draft as dr
from tilecomp.train import loop
from tilecomp.train import target as tg

from train_helpers import VOCAB, repeating_stream

CPU = torch.device("cpu")


def models(tiny_cfgs, seed=0):
    tcfg, dcfg = tiny_cfgs
    target = tg.to_mxfp4(tg.build_trainable(tcfg, seed), dtype=torch.float32)
    torch.manual_seed(seed)
    return target, DFlashDraft(dcfg, tcfg)


def test_multi_block_forward_equals_draft_forward_per_block(tiny_cfgs):
    target, draft = models(tiny_cfgs)
    ids = torch.randint(2, VOCAB, (2, 30))
    taps = dr.target_taps(target, ids, draft.config.target_layer_ids, CPU)
    anchors = torch.tensor([1, 9, 14, 22])          # window 8: some contexts are cut by it
    logits = dr.multi_block_logits(draft, target, ids, taps, anchors)
    for k, a in enumerate(anchors.tolist()):
        block = torch.full((2, 8), draft.config.mask_token_id)
        block[:, 0] = ids[:, a]
        ref = draft(block, taps[:, :a], None, a, target)
        torch.testing.assert_close(logits[:, k], ref, rtol=1e-4, atol=1e-5)


def test_block_mask_keeps_blocks_apart():
    mask = dr.block_mask(torch.tensor([3, 10]), T=12, S=2, window=4)
    # block 0 (positions 3, 4) sees context 0..2 within the window, its own keys only
    assert mask[0, :12].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1, :12].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[2, :12].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert mask[3, :12].nonzero().flatten().tolist() == [7, 8, 9]
    assert mask[:, 12:].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_position_weights_decay_like_dflash():
    w = dr.position_weights(8, 4.0)
    assert w.shape == (7,) and w[0] == 1.0
    torch.testing.assert_close(w[1:] / w[:-1], torch.full((6,), float(torch.exp(torch.tensor(-0.25)))))


def test_greedy_continue_matches_full_forward_argmax(tiny_cfgs):
    target, _ = models(tiny_cfgs)
    prompts = torch.randint(2, VOCAB, (3, 5))
    seqs = dr.greedy_continue(target, prompts, 12, CPU)
    assert seqs.shape == (3, 17) and torch.equal(seqs[:, :5], prompts)
    with torch.no_grad():
        logits = target(seqs[:, :-1])
    torch.testing.assert_close(logits[:, 4:].argmax(-1), seqs[:, 5:])


def test_draft_steps_reduce_block_loss_and_resume(tiny_cfgs, tmp_path):
    target, draft = models(tiny_cfgs)
    stream = torch.from_numpy(repeating_stream(2000).astype("int64"))
    sequences = stream[:1920].view(60, 32)
    s = dr.DraftSettings(prompt_len=4, batch=8, anchors=6, lr=1e-1)
    weights = dr.position_weights(8, s.decay_gamma)
    probe = sequences[:8]
    anchors = torch.tensor([3, 8, 13, 20])

    def probe_loss():
        with torch.no_grad():
            return float(dr.blocks_loss(draft, target, probe, anchors, weights, CPU)[0])

    before = probe_loss()
    first = dr.train_draft(draft, target, sequences, tmp_path, loop.Budget(steps=16, chunk_steps=8), s,
                           CPU, progress=False)
    assert not first["done"]
    _, fresh = models(tiny_cfgs)
    second = dr.train_draft(fresh, target, sequences, tmp_path, loop.Budget(steps=16, chunk_steps=8), s,
                            CPU, progress=False)
    assert second["done"] and second["step"] == 16
    draft = fresh
    assert probe_loss() < before - 0.2     # a frozen random LM head slows this toy case
    assert (tmp_path / "draft_loss.png").is_file()
    assert not any(p.requires_grad for p in target.parameters())   # the target stays frozen


def test_split_validation_holds_out_the_last_rows():
    seqs = torch.arange(40).view(20, 2)
    train, val = dr.split_validation(seqs, 0.1)
    assert train.shape == (18, 2) and val.shape == (2, 2)
    assert torch.equal(torch.cat([train, val]), seqs)            # a split, not a sample
    assert dr.split_validation(seqs, 0.0)[1].shape[0] == 0       # off
    assert dr.split_validation(seqs[:3], 0.01)[1].shape[0] == 1  # at least one row when on
