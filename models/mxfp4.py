"""MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements, one E8M0 scale per 32.

Blocks run along the LAST dimension (the input dim K of a [N, K] weight).
Packed layout (as gpt-oss checkpoints):
  blocks uint8 [..., N, K/32, 16]   two E2M1 codes per byte, low nibble = even element
  scales uint8 [..., N, K/32]       E8M0: value 2^(s - 127); 255 = NaN

Shape legend: N output rows, K input columns, NB = K/32 blocks.
"""
import math

import torch

BLOCK = 32
E8M0_BIAS = 127
E2M1_MAX = 6.0
E2M1_EMAX = 2            # exponent of the largest normal E2M1 value (6 = 1.5 * 2^2)

# Code c (4 bits: sign | 2-bit exponent | 1-bit mantissa) -> value.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _round_to_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Magnitudes a >= 0 -> nearest E2M1 magnitude, ties to even code, saturating at 6."""
    # The E2M1 grid has step 0.5 in [0, 2], 1 in [2, 4], 2 in [4, 6]; torch.round is half-to-even,
    # and an even multiple of each step is exactly an even code.
    fine = torch.round(a * 2) / 2
    mid = torch.round(a)
    coarse = torch.round(a / 2) * 2
    q = torch.where(a < 2, fine, torch.where(a < 4, mid, coarse))
    return q.clamp(max=E2M1_MAX)


def _e2m1_code(mag: torch.Tensor) -> torch.Tensor:
    """Exact E2M1 magnitudes -> 3-bit codes: 0..2 step 0.5 -> 0..4, then 3 -> 5, 4 -> 6, 6 -> 7."""
    code = torch.where(mag <= 2, mag * 2, torch.where(mag == 3, 5.0, torch.where(mag == 4, 6.0, 7.0)))
    return code.to(torch.uint8)


def _shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(amax)) - emax(E2M1), clamped to the E8M0 range; 0-blocks get the smallest."""
    _, exp = torch.frexp(amax)              # amax = m * 2^exp, m in [0.5, 1) -> floor(log2) = exp - 1
    e = exp.to(torch.int32) - 1 - E2M1_EMAX
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32])."""
    K = w.shape[-1]
    if K % BLOCK:
        raise ValueError(f"quantize_mxfp4: last dim must be a multiple of {BLOCK}, found {K}")
    x = w.detach().float().reshape(*w.shape[:-1], K // BLOCK, BLOCK)     # [..., N, NB, 32]
    if not torch.isfinite(x).all():
        raise ValueError("quantize_mxfp4: weight has NaN or Inf entries")
    e = _shared_exponent(x.abs().amax(dim=-1))                           # [..., N, NB]
    scaled = torch.ldexp(x, (-e).unsqueeze(-1).float())
    mag = _round_to_e2m1(scaled.abs())
    codes = _e2m1_code(mag)
    codes = codes | (torch.signbit(x).to(torch.uint8) << 3)                # [..., N, NB, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)                   # [..., N, NB, 16]
    scales = (e + E8M0_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def _pair_table(device) -> torch.Tensor:
    """Byte -> (value of low nibble, value of high nibble): [256, 2] fp32."""
    byte = torch.arange(256)
    return torch.stack([E2M1_VALUES[byte & 0x0F], E2M1_VALUES[byte >> 4]], dim=-1).to(device)


_PAIRS = {}


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(blocks [..., N, NB, 16], scales [..., N, NB]) -> w [..., N, NB*32] in `dtype`."""
    if blocks.device not in _PAIRS:
        _PAIRS[blocks.device] = _pair_table(blocks.device)
    vals = _PAIRS[blocks.device][blocks.long()]                           # [..., N, NB, 16, 2]
    scale = torch.ldexp(torch.ones((), device=scales.device), scales.float() - E8M0_BIAS)
    scale = scale.masked_fill(scales == 255, float("nan"))                # [..., N, NB]
    w = vals.flatten(-2) * scale.unsqueeze(-1)                            # [..., N, NB, 32]
    return w.flatten(-2).to(dtype)


def fake_quantize_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """MXFP4 round trip in the forward pass, identity gradient (straight-through estimator)."""
    q = dequantize_mxfp4(*quantize_mxfp4(w), dtype=w.dtype)
    return w + (q - w).detach()


def random_mxfp4(shape, std: float, device=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed weights [..., N, K] for presets, without a float copy: uniform random codes
    under one scale `random_scale_code(std)`."""
    *lead, K = shape
    blocks = torch.randint(0, 256, (*lead, K // BLOCK, BLOCK // 2), dtype=torch.uint8,
                           device=device, generator=generator)
    scales = torch.full((*lead, K // BLOCK), random_scale_code(std), dtype=torch.uint8, device=device)
    return blocks, scales


def random_scale_code(std: float) -> int:
    """E8M0 code of 2^round(log2(std / RMS)): uniform random E2M1 codes (RMS of the 16 values
    = sqrt(8.5625)) under this scale have a standard deviation close to std."""
    return round(math.log2(std / math.sqrt(8.5625))) + E8M0_BIAS
