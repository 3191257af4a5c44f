"""Typed arenas: every tensor the megakernel touches lives in one of four flat
buffers and is addressed by an element offset (the offsets go into task records).

  w    weights and KV caches, in the engine's weight dtype (fp32 on CPU tests, bf16 on GPU)
  f32  fp32 activations, logits, partials and fp32 parameters (router, sinks)
  u8   MXFP4 expert blocks and scales
  i32  token ids, step state, routing plans
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tilecomp.errors import CheckpointError

ARENAS = ("w", "f32", "u8", "i32")
ALIGN = 64  # elements; keeps every slot 128-byte aligned for bf16 and wider


@dataclass
class Slot:
    arena: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ArenaBuilder:
    """Collects named tensors / reservations, then lays them out in the four arenas."""
    wdtype: torch.dtype = torch.float32
    slots: dict[str, Slot] = field(default_factory=dict)
    _sizes: dict[str, int] = field(default_factory=lambda: {a: 0 for a in ARENAS})
    _init: dict[str, torch.Tensor] = field(default_factory=dict)
    _transforms: list = field(default_factory=list)

    def dtype(self, arena: str) -> torch.dtype:
        return {"w": self.wdtype, "f32": torch.float32, "u8": torch.uint8,
                "i32": torch.int32}[arena]

    def reserve(self, name: str, shape, arena: str) -> Slot:
        if name in self.slots:
            raise CheckpointError(f"arena slot {name!r} allocated twice")
        if arena not in ARENAS:
            raise CheckpointError(f"slot {name!r}: arena {arena!r}, expected one of {ARENAS}")
        slot = Slot(arena, self._sizes[arena], tuple(int(s) for s in shape))
        self._sizes[arena] += -(-max(slot.numel, 1) // ALIGN) * ALIGN
        self.slots[name] = slot
        return slot

    def add(self, name: str, tensor: torch.Tensor, arena: str) -> Slot:
        slot = self.reserve(name, tensor.shape, arena)
        self._init[name] = tensor
        return slot

    def offset(self, name: str) -> int:
        return self.slots[name].offset

    def transform(self, fn) -> None:
        """Have build() write fn(name, t) instead of every added tensor t (same shape and dtype:
        the slots are laid out already); e.g. a kernel-specific weight layout. Applied one slot at
        a time while the arenas are filled, so a transformed copy of all the weights never exists
        at once (a flash-sized model's experts are tens of GB)."""
        self._transforms.append(fn)

    def build(self, device="cpu", share: "Arenas | None" = None, share_names=()) -> "Arenas":
        """The arenas, filled. share / share_names: arenas of `share` reused as they are (not
        allocated, not written) for the named arenas whose slots here are exactly share's (same
        names, offsets and shapes, all of them initialised tensors: weights written the same
        way); the caller vouches for the same tensors and transforms. Two engines of one model
        then hold one copy of e.g. the MXFP4 experts."""
        reused = {}
        for a in share_names:
            mine = {n: s for n, s in self.slots.items() if s.arena == a}
            theirs = {n: s for n, s in share.slots.items() if s.arena == a} if share is not None else None
            if (theirs is None or mine != theirs or any(n not in self._init for n in mine)
                    or share.data[a].numel() != max(self._sizes[a], ALIGN)):
                raise CheckpointError(f"arena {a!r}: cannot be shared (its slots differ from the "
                                      f"other engine's, or hold more than weights)")
            reused[a] = share.data[a]
        data = {a: reused.get(a) if a in reused else
                torch.zeros(max(self._sizes[a], ALIGN), dtype=self.dtype(a), device=device) for a in ARENAS}
        arenas = Arenas(data, dict(self.slots))
        for name, tensor in self._init.items():
            if self.slots[name].arena in reused:
                continue
            for fn in self._transforms:
                out = fn(name, tensor)
                if out.shape != tensor.shape or out.dtype != tensor.dtype:
                    raise CheckpointError(f"arena slot {name!r}: a transform changed {tuple(tensor.shape)} "
                                          f"{tensor.dtype} into {tuple(out.shape)} {out.dtype}")
                tensor = out
            arenas.view(name).copy_(tensor.to(arenas.view(name).dtype))
        return arenas


@dataclass
class Arenas:
    data: dict[str, torch.Tensor]
    slots: dict[str, Slot]

    def view(self, name: str) -> torch.Tensor:
        """A tensor view of one slot (writes go to the arena)."""
        slot = self.slots[name]
        return self.data[slot.arena][slot.offset:slot.offset + slot.numel].view(slot.shape)

    def offset(self, name: str) -> int:
        return self.slots[name].offset

    def pointers(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.data[a] for a in ARENAS)
