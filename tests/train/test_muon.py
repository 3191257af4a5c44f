import pytest
import torch

from tilecomp.train import muon


@pytest.mark.parametrize("shape", [(32, 32), (24, 64), (64, 24)])
def test_newton_schulz_orthogonalises(shape):
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))
    k = min(shape)
    spectrum = torch.logspace(0, 1.7, k)            # singular values 1 .. 50: badly conditioned
    g = u[:, :k] @ torch.diag(spectrum) @ v[:, :k].T
    out = muon.orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25         # quintic NS pushes every singular value near 1
    # same singular vectors: out ~ U V^T up to that per-direction scale
    polar = u[:, :k] @ v[:, :k].T
    assert torch.nn.functional.cosine_similarity(out.flatten(), polar.flatten(), dim=0) > 0.97


def test_fallback_muon_step_is_an_orthogonal_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 48))
    opt = muon.Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0)
    before = p.detach().clone()
    p.grad = torch.randn(16, 48)
    opt.step()
    update = (before - p.detach()) / (0.1 * 0.2 * 48 ** 0.5)
    torch.testing.assert_close(update, muon.orthogonalize(p.grad), rtol=1e-4, atol=1e-5)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.3


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D"):
        muon.Muon([torch.nn.Parameter(torch.zeros(4))])


def test_make_muon_reduces_a_least_squares_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(8, 8))
    target = torch.randn(8, 8)
    opt = muon.make_muon([w], lr=0.1, weight_decay=0.0)
    first = None
    for _ in range(40):
        loss = (w - target).square().mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
