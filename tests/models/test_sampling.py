"""The shared sampling rule: greedy ties, hash, reproducibility, distribution, top-p."""
import pytest
import torch

from tilecomp.models.sampling import hash32, sample, top_p_keep, uniform


def hash32_bigint(x: int) -> int:
    """Independent spelling of lowbias32 with Python's exact integers."""
    x %= 2**32
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    x ^= x >> 16
    return x


def test_hash32_matches_exact_integer_arithmetic():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (2000,), generator=gen, dtype=torch.int64)
    xs = torch.cat([xs, torch.tensor([0, 1, 2**31, 2**32 - 1])])
    got = hash32(xs)
    assert got.tolist() == [hash32_bigint(x) for x in xs.tolist()]
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


def test_uniform_is_in_open_interval_and_decorrelated():
    u = uniform(7, torch.arange(64).unsqueeze(-1), torch.arange(4096))
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    # neighbouring tokens and neighbouring positions are uncorrelated
    a = u - u.mean()
    corr_tok = float((a[:, 1:] * a[:, :-1]).mean() / a.var())
    corr_pos = float((a[1:] * a[:-1]).mean() / a.var())
    assert abs(corr_tok) < 0.02 and abs(corr_pos) < 0.02
    assert not torch.equal(uniform(7, torch.tensor(3), torch.arange(8)),
                           uniform(8, torch.tensor(3), torch.arange(8)))


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -2.0, -1.0]])
    assert sample(logits, torch.zeros(3), temperature=0.0).tolist() == [1, 0, 0]
    big = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(big, torch.arange(5)), big.argmax(-1))


def test_sampled_is_reproducible_and_depends_on_seed_and_position():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(100, 116)
    a = sample(logits, pos, temperature=1.0, top_p=1.0, seed=3)
    assert torch.equal(a, sample(logits, pos, temperature=1.0, top_p=1.0, seed=3))
    assert not torch.equal(a, sample(logits, pos, temperature=1.0, top_p=1.0, seed=4))
    assert not torch.equal(a, sample(logits, pos + 1, temperature=1.0, top_p=1.0, seed=3))
    # a row's token depends only on its own logits and position, not on the batch
    single = torch.stack([sample(logits[i], pos[i], 1.0, 1.0, 3) for i in range(16)])
    assert torch.equal(a, single)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_distribution_matches_tempered_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    n = 20000
    ids = sample(logits.expand(n, -1), torch.arange(n), temperature, 1.0, seed=11)
    counts = torch.bincount(ids, minlength=6).float()
    probs = torch.softmax(logits / temperature, -1)
    # 5 degrees of freedom: P(chi2 > 25) is about 1e-4
    assert chi_square(counts, probs) < 25.0
    # a visibly wrong distribution must fail the same check
    assert chi_square(counts, torch.softmax(logits, -1) if temperature != 1.0
                      else torch.full((6,), 1 / 6)) > 25.0


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    n = 5000
    ids = sample(logits.expand(n, -1), torch.arange(n), 1.0, top_p=0.75, seed=5)
    counts = torch.bincount(ids, minlength=5).float()
    # mass strictly above token 2 is 0.7 < 0.75 -> kept; above token 3 is 0.85 -> dropped
    assert counts[3] == 0 and counts[4] == 0 and counts[2] > 0
    kept = torch.tensor([0.5, 0.2, 0.15]) / 0.85
    assert chi_square(counts[:3], kept) < 20.0


def test_top_p_keeps_ties_together_and_always_keeps_the_top_token():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.05, 0.0]])
    assert top_p_keep(probs, 0.3).tolist() == [[True] * 4, [True, False, False, False]]
    assert top_p_keep(probs, 1e-6)[:, 0].all()


def test_top_p_tiny_is_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(9))
    ids = sample(logits, torch.arange(64), 1.3, top_p=1e-6, seed=2)
    assert torch.equal(ids, logits.argmax(-1))


def test_bad_sampling_arguments_raise():
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(3), 0, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(3), 0, -1.0, 1.0, 0)
