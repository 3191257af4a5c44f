"""MXFP4 against an independent E2M1 table and the OCP MX v1.0 rounding rule."""
import math

import torch

from tilecomp.models import E2M1_VALUES, dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4
from tilecomp.models.mimo import DenseExperts


def e2m1_from_bits(code: int) -> float:
    """Decode a 4-bit E2M1 code from its fields: sign | exponent (2 bits, bias 1) | mantissa (1 bit)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return sign * mag


GRID = [e2m1_from_bits(c) for c in range(8)]             # magnitudes of codes 0..7


def nearest_even(v: float) -> float:
    """Nearest grid magnitude to |v| (saturating at 6), ties to the even code; sign kept."""
    a = min(abs(v), 6.0)
    dists = [abs(a - g) for g in GRID]
    best = min(dists)
    codes = [c for c, d in enumerate(dists) if d == best]
    code = codes[0] if len(codes) == 1 else next(c for c in codes if c % 2 == 0)
    return math.copysign(GRID[code], v)


def test_table_matches_bit_decoding():
    assert E2M1_VALUES.tolist() == [e2m1_from_bits(c) for c in range(16)]
    assert GRID == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_rounding_rule_on_random_blocks():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=gen) * torch.logspace(-3, 2, 16)[:, None]
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (16, 4, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (16, 4) and scales.dtype == torch.uint8
    got = dequantize_mxfp4(blocks, scales)
    for n in range(16):
        for b in range(4):
            x = w[n, b * 32:(b + 1) * 32].tolist()
            e = math.floor(math.log2(max(abs(v) for v in x))) - 2
            assert scales[n, b].item() == e + 127
            want = [nearest_even(v / 2.0 ** e) * 2.0 ** e for v in x]
            assert got[n, b * 32:(b + 1) * 32].tolist() == want


def test_ties_go_to_even_and_large_values_saturate():
    # scale exponent 0 (max 7 -> floor(log2 7) - 2 = 0): values are exact E2M1 inputs.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -1.25, -5.0, 6.5]
    w = torch.tensor(ties + [0.0] * (32 - len(ties))).view(1, 32)
    got = dequantize_mxfp4(*quantize_mxfp4(w))[0, :len(ties)].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -4.0, 6.0]


def test_zero_block_and_scale_range():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1e-38                                    # floor(log2) - 2 = -129: clamps to 2^-127
    w[1, 0] = 3 * 2.0 ** 100
    blocks, scales = quantize_mxfp4(w)
    assert scales[0].tolist() == [0, 0] and blocks[0].eq(0).all()
    assert scales[1, 0].item() == 127 + 101 - 2
    assert scales[1, 1].item() == 0
    back = dequantize_mxfp4(blocks, scales)
    assert back[0].eq(0).all() and back[1, 0].item() == 3 * 2.0 ** 100
    assert back[1, 32].item() == 1.5 * 2.0 ** -127        # 1e-38 * 2^127 = 1.70 -> 1.5


def test_packed_layout_low_nibble_is_even_element():
    # max 6 -> exponent 0: element 0 = 0.5 (code 1), element 1 = -1.0 (code 0b1010), element 2 = 6 (code 7)
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([0.5, -1.0, 6.0])
    blocks, scales = quantize_mxfp4(w)
    assert scales.item() == 127
    assert blocks[0, 0, 0].item() == 0x01 | (0x0A << 4)
    assert blocks[0, 0, 1].item() == 0x07


def test_quantize_is_idempotent_on_stacked_weights():
    w = torch.randn(3, 8, 96, generator=torch.Generator().manual_seed(1)) * 0.02
    q = dequantize_mxfp4(*quantize_mxfp4(w))
    assert q.shape == w.shape
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(q)), q)
    assert dequantize_mxfp4(*quantize_mxfp4(w), dtype=torch.bfloat16).float().equal(q)   # exact in bf16


def test_fake_quantize_has_identity_gradient():
    w = (torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_()
    y = fake_quantize_mxfp4(w)
    assert torch.equal(y.detach(), dequantize_mxfp4(*quantize_mxfp4(w)))
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(4, 64))


def test_dense_experts_to_mxfp4_matches_fake_quant():
    torch.manual_seed(0)
    dense = DenseExperts(6, 64, 32, torch.float32, fake_quant=True)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.05)
    packed = dense.to_mxfp4()
    h = torch.randn(5, 64)
    idx = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 2], [4, 4]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(packed(h, idx, weights), dense(h, idx, weights), rtol=0, atol=0)
        dense.fake_quant = False
        assert not torch.equal(packed(h, idx, weights), dense(h, idx, weights))


def test_random_mxfp4_has_the_requested_scale():
    from tilecomp.models.mxfp4 import random_mxfp4
    blocks, scales = random_mxfp4((4, 64, 128), 0.02, generator=torch.Generator().manual_seed(3))
    assert blocks.shape == (4, 64, 4, 16) and scales.shape == (4, 64, 4)
    w = dequantize_mxfp4(blocks, scales)
    assert 0.014 < w.std().item() < 0.028 and abs(w.mean().item()) < 0.002
