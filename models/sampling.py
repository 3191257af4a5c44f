"""The one sampling rule every engine uses (eager reference and megakernel).

    ids = sample(logits[..., V], positions[...], temperature, top_p, seed)

- temperature == 0: greedy, argmax over the vocabulary, lowest index on ties.
- temperature > 0: Gumbel-max over the top-p filtered, tempered distribution:
      z_i    = logits_i / temperature                       (fp32)
      p_i    = softmax(z)_i
      keep_i = (sum of p_j over tokens with p_j > p_i) < top_p
      key_i  = z_i - log(-log(u_i))      for kept tokens, -inf otherwise
      id     = argmax_i key_i            (lowest index on ties)
  with u_i = uniform(seed, position, i), a counter-based hash of the seed, the
  ABSOLUTE position of the token being chosen and the candidate token id. The
  noise depends on nothing else, so the same logits at the same position give
  the same token in speculative (DFlash) and plain decoding, in any engine.

The keep rule has no sort order inside ties (all equally probable tokens are
kept or dropped together), so a kernel can find the cut-off probability by
bisection instead of sorting the vocabulary.

The hash is written with 32-bit unsigned integer ops only (multiply mod 2^32,
xor, logical right shift) so the SAME function is a few lines of Triton on
tl.uint32 values (where multiply wraps mod 2^32 natively). In torch it runs on
int64 holding values in [0, 2^32); `mul32` splits the constant into 16-bit
halves so no intermediate product reaches 2^63.

    hash32(x):  x ^= x >> 16;  x = x * 0x7FEB352D mod 2^32     ("lowbias32",
                x ^= x >> 15;  x = x * 0x846CA68B mod 2^32      C. Wellons'
                x ^= x >> 16                                    hash prospector)
    h = hash32(hash32(hash32(seed ^ 0x3C6EF372) ^ position) ^ token_id)
    u = ((h >> 8) + 0.5) / 2^24                    in (0, 1), exact in fp32
"""
import torch

MASK32 = 0xFFFFFFFF
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B
SEED_SALT = 0x3C6EF372


def mul32(x, const: int):
    """x * const mod 2^32 for x in [0, 2^32), without int64 overflow."""
    low = x * (const & 0xFFFF)
    high = ((x * (const >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def hash32(x):
    """Integer avalanche hash of uint32 values (a Python int or an int64 tensor)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = mul32(x, HASH_MUL_1)
    x = x ^ (x >> 15)
    x = mul32(x, HASH_MUL_2)
    x = x ^ (x >> 16)
    return x


def uniform(seed: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u(seed, position, token) in (0, 1), fp32; positions and token_ids broadcast."""
    s = hash32((int(seed) & MASK32) ^ SEED_SALT)
    h = hash32(s ^ (positions.to(torch.int64) & MASK32))
    h = hash32(h ^ (token_ids.to(torch.int64) & MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def argmax_lowest(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, lowest index among equal maxima (explicitly)."""
    vocab = x.shape[-1]
    is_max = x == x.max(dim=-1, keepdim=True).values
    index = torch.arange(vocab, device=x.device).expand_as(x)
    return torch.where(is_max, index, vocab).min(dim=-1).values


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """keep_i = mass of strictly more probable tokens < top_p (ties kept together)."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    ascending, _ = probs.sort(dim=-1)
    # n_greater[i] = how many tokens are strictly more probable than token i
    n_greater = probs.shape[-1] - torch.searchsorted(ascending, probs.contiguous(), right=True)
    descending = ascending.flip(-1)
    mass_from_top = torch.cat([torch.zeros_like(descending[..., :1]), descending.cumsum(dim=-1)], dim=-1)
    return mass_from_top.gather(-1, n_greater) < top_p


def sample(logits: torch.Tensor, positions, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Choose one token per row of logits[..., V]; positions[...] are absolute."""
    logits = logits.float()
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, "
                         f"got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return argmax_lowest(logits)
    positions = torch.as_tensor(positions, dtype=torch.int64, device=logits.device)
    positions = positions.expand(logits.shape[:-1])
    z = logits / temperature
    keep = top_p_keep(torch.softmax(z, dim=-1), top_p)
    token_ids = torch.arange(logits.shape[-1], device=logits.device)
    u = uniform(seed, positions.unsqueeze(-1), token_ids)
    keys = z - torch.log(-torch.log(u))
    keys = torch.where(keep, keys, float("-inf"))
    return argmax_lowest(keys)
