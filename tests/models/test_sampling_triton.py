"""The sampling hash written in Triton (uint32 ops) gives bit-identical uniforms.

This is also the reference spelling for generated kernels: multiply on
tl.uint32 wraps mod 2^32, `>>` on unsigned is a logical shift.
"""
import torch
import triton
import triton.language as tl

from tilecomp.models.sampling import MASK32, SEED_SALT, hash32, uniform


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _uniform_kernel(out_ptr, seed_hash, pos_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.load(pos_ptr + row).to(tl.uint32)
    tok = tl.arange(0, BLOCK)
    h = _hash32(seed_hash.to(tl.uint32) ^ pos)
    h = _hash32(h ^ tok.to(tl.uint32))
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row * V + tok, u, mask=tok < V)


def test_triton_uniform_is_bit_identical_to_torch():
    pos = torch.tensor([0, 1, 5, 4095, 123456, 2**31 + 7, 2**32 - 1], dtype=torch.int64)
    V = 200
    for seed in (0, 7, 2**31 + 3, 123456789):
        out = torch.empty(len(pos), V)
        seed_hash = hash32((seed & MASK32) ^ SEED_SALT)
        _uniform_kernel[(len(pos),)](out, seed_hash, pos, V, 256)
        assert torch.equal(out, uniform(seed, pos.unsqueeze(-1), torch.arange(V))), seed
