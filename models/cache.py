"""KV cache for the eager reference: full layers keep every position, SWA layers a ring.

A sliding-window layer keeps the last `window + block` positions: enough that after
writing a block of up to `block` tokens and rolling back (`crop`) to any committed
length inside that block, the `window` keys the next query needs are still there.

Shape legend: B batch, G kv heads, S cache slots, T new tokens, Dk / Dv head dims.
Every sequence of a batch shares one length.
"""
import torch

from tilecomp.errors import TilecompError

from .config import AttnSpec


def ring_slots(window: int | None, max_len: int, block: int) -> int:
    """Cache slots of one layer: every position (full attention) or the last window + block."""
    return max_len if window is None else min(max_len, window + block)


class KVCache:
    def __init__(self, specs: list[AttnSpec], batch: int, max_len: int, block: int = 8,
                 dtype: torch.dtype = torch.float32, device=None):
        self.specs = list(specs)
        self.max_len = max_len
        self.block = block
        self.length = 0                     # positions written (committed after a crop)
        self.low = [0] * len(specs)         # oldest position each layer still holds
        self.k, self.v = [], []
        for s in self.specs:
            slots = ring_slots(s.window, max_len, block)
            self.k.append(torch.zeros(batch, s.n_kv_heads, slots, s.head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(batch, s.n_kv_heads, slots, s.v_head_dim, dtype=dtype, device=device))

    def slots(self, i: int) -> int:
        return self.k[i].shape[2]

    def crop(self, n: int):
        """Roll back to the first n positions."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KVCache.crop: expected 0 <= n <= length={self.length}, found {n}")
        self.length = n

    def update(self, i: int, start: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store k/v [B, G, T, D] at positions start..start+T-1 of layer i.

        Returns (k [B, G, S, Dk], v [B, G, S, Dv], pos [S]): every key that a query in
        the new span may attend (older cached ones, then the new ones) with its position.
        Writing at start < length drops positions >= start first.
        """
        T = k_new.shape[2]
        if start > self.length:
            raise ValueError(f"KVCache.update: start={start} leaves a gap after length={self.length}")
        if start + T > self.max_len:
            raise TilecompError(f"KV cache holds max_len={self.max_len} positions; "
                                f"writing positions {start}..{start + T - 1} exceeds it")
        window = self.specs[i].window
        first = 0 if window is None else max(0, start - window)     # oldest key still needed
        if first < self.low[i]:
            raise ValueError(f"KVCache layer {i}: positions from {first} are needed but the ring only "
                             f"holds {self.low[i]}..; crop back at most block={self.block} positions")
        old = torch.arange(first, start, device=k_new.device)
        k_old = self.k[i][:, :, old % self.slots(i)]
        v_old = self.v[i][:, :, old % self.slots(i)]
        self._write(i, start, k_new, v_new)
        self.length = start + T
        pos = torch.arange(first, start + T, device=k_new.device)
        return (torch.cat([k_old, k_new.to(k_old.dtype)], dim=2),
                torch.cat([v_old, v_new.to(v_old.dtype)], dim=2), pos)

    def _write(self, i: int, start: int, k_new: torch.Tensor, v_new: torch.Tensor):
        S, T = self.slots(i), k_new.shape[2]
        keep = min(T, S)                                      # only the last S positions survive
        pos = torch.arange(start + T - keep, start + T, device=k_new.device)
        self.k[i][:, :, pos % S] = k_new[:, :, T - keep:].to(self.k[i].dtype)
        self.v[i][:, :, pos % S] = v_new[:, :, T - keep:].to(self.v[i].dtype)
        self.low[i] = max(self.low[i], start + T - S)   # older slots were overwritten
