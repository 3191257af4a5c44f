"""Reference engine: DFlash output == the target's own decoding (greedy and sampled)."""
import pytest
import torch

from tilecomp.errors import TilecompError
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.runtime import ReferenceEngine
from tilecomp.runtime.reference import accepted_length


def tiny_models(seed):
    tcfg, dcfg = preset("tiny")
    torch.manual_seed(seed)
    target = MiMoForCausalLM(tcfg).eval()
    draft = DFlashDraft(dcfg, tcfg).eval()
    return target, draft


@torch.no_grad()
def full_forward_greedy(target, prompt, n):
    """Independent reference: re-run the whole sequence without a cache every token."""
    seq = list(prompt)
    for _ in range(n):
        logits = target(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


class OracleDraft(torch.nn.Module):
    """The real draft (so its cache is exercised), but slots 1..k of each block are
    overwritten with the known continuation, k varying per step: acceptance 0..S-1."""

    def __init__(self, draft, continuation):
        super().__init__()
        self.inner, self.config = draft, draft.config
        self.continuation = continuation          # absolute position -> token
        self.calls = 0

    def new_cache(self, *a, **kw):
        return self.inner.new_cache(*a, **kw)

    def forward(self, block, taps, cache, start_pos, target):
        logits = self.inner(block, taps, cache, start_pos, target)
        k = [0, 7, 3, 1, 5, 2][self.calls % 6]
        self.calls += 1
        for j in range(1, min(k, logits.shape[1] - 1) + 1):
            tok = self.continuation.get(start_pos + j)
            if tok is not None:
                logits[0, j] = -1e4
                logits[0, j, tok] = 1e4
        return logits


def test_accepted_length():
    assert accepted_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == 2
    assert accepted_length(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])) == 0
    assert accepted_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) == 3


@pytest.mark.parametrize("seed,prompt_len", [(0, 21), (1, 30), (2, 19)])
def test_greedy_dflash_equals_target_greedy(seed, prompt_len):
    target, draft = tiny_models(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    prompt = torch.randint(0, target.config.vocab_size, (prompt_len,), generator=gen).tolist()
    n = 24
    expected = full_forward_greedy(target, prompt, n)
    engine = ReferenceEngine(target, draft, max_len=128)
    plain = engine.generate(prompt, n, use_draft=False)
    assert plain.tokens == expected and plain.acceptance == [] and plain.mean_acceptance == 1.0
    spec = engine.generate(prompt, n)                       # real (random) draft
    assert spec.tokens == expected
    assert len(spec.acceptance) >= 1 and all(0 <= a < draft.config.block_size for a in spec.acceptance)
    continuation = {len(prompt) + i: t for i, t in enumerate(expected)}
    oracle = OracleDraft(draft, continuation)
    fast = ReferenceEngine(target, oracle, max_len=128).generate(prompt, n)
    assert fast.tokens == expected
    assert max(fast.acceptance) == draft.config.block_size - 1
    assert fast.mean_acceptance > 2.0
    assert len(fast.acceptance) < len(spec.acceptance)


def test_streaming_callback_sees_every_token_once():
    target, draft = tiny_models(3)
    prompt = list(range(5, 25))
    chunks = []
    res = ReferenceEngine(target, draft, max_len=96).generate(prompt, 13, on_tokens=chunks.append)
    assert [t for c in chunks for t in c] == res.tokens and len(res.tokens) == 13
    assert all(len(c) >= 1 for c in chunks)
    assert res.tokens_per_s > 0 and res.elapsed_s > 0
    assert set(res.to_dict()) >= {"tokens", "acceptance", "mean_acceptance", "tokens_per_s"}


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_is_reproducible_and_draft_independent(seed):
    target, draft = tiny_models(10 + seed)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    engine = ReferenceEngine(target, draft, max_len=96)
    kw = dict(temperature=0.9, top_p=0.95, seed=1234 + seed)
    plain = engine.generate(prompt, 20, use_draft=False, **kw)
    again = engine.generate(prompt, 20, use_draft=False, **kw)
    assert plain.tokens == again.tokens
    assert engine.generate(prompt, 20, use_draft=False, temperature=0.9, top_p=0.95,
                           seed=99).tokens != plain.tokens
    assert plain.tokens != full_forward_greedy(target, prompt, 20)
    # same logits at the same position -> same token, with or without the draft
    assert engine.generate(prompt, 20, **kw).tokens == plain.tokens
    continuation = {len(prompt) + i: t for i, t in enumerate(plain.tokens)}
    oracle = ReferenceEngine(target, OracleDraft(draft, continuation), max_len=96)
    fast = oracle.generate(prompt, 20, **kw)
    assert fast.tokens == plain.tokens and max(fast.acceptance) >= 3


def test_bad_requests_raise_clear_errors():
    target, draft = tiny_models(4)
    engine = ReferenceEngine(target, draft, max_len=40)
    with pytest.raises(TilecompError, match="max positions 40"):
        engine.generate(list(range(41)), 1)
    with pytest.raises(TilecompError, match="max_new_tokens 30"):
        engine.generate(list(range(5)), 30)
    with pytest.raises(TilecompError, match="outside the vocabulary"):
        engine.generate([1, 512], 2)
    with pytest.raises(TilecompError, match="empty prompt"):
        engine.generate([], 2)
    with pytest.raises(TilecompError, match="no DFlash draft"):
        ReferenceEngine(target, None).generate([1, 2], 2)
    with pytest.raises(TilecompError, match="top_p"):
        engine.generate([1, 2], 2, temperature=1.0, top_p=0.0)
    empty = engine.generate([1, 2], 0)
    assert empty.tokens == [] and empty.acceptance == [] and empty.mean_acceptance == 1.0
