"""MX_DOT 8: MXFP4 codes -> bf16 pairs with byte-permute table lookups, as one inline-PTX block.

One instance takes 4 raw bytes of a row (8 E2M1 codes: byte j holds element 2j in its low nibble,
2j + 1 in its high nibble) and their group's E8M0 scale byte, and returns 4 registers of bf16
pairs: the even elements (0, 2 | 4, 6) and the odd ones (1, 3 | 5, 7), each pair with the lower
element in the low half. The bf16 magnitude of a code m (0, .5, 1, 1.5, 2, 3, 4, 6) is looked up
with `prmt` (4 table bytes selected per instruction from two 32-bit tables): the low bytes from
LO_A / LO_B, the high bytes from HI_A / HI_B. The signs are moved to bits 15 / 31 with `prmt` too,
and one `fma.rn.bf16x2` applies 2^(s - 127) (a bf16 with exponent field s). About 4.5 integer
operations per element against ~8 for MX_DOT 3's fp32 bit-cast path, and the values are the same
bf16 numbers MX_DOT 3 rounds its fp32 products to (exact for scale codes 2..252, see SCALE_RANGE).

PROGRAM is the one definition: `ptx()` renders it for tl.inline_asm_elementwise, `emulate()` runs
it on integers, so the CPU tests check the instructions the GPU runs (the interpreter cannot run
inline PTX).
"""
from __future__ import annotations

import struct

# bf16 bits of the E2M1 magnitudes: 0 0.5 1.0 1.5 | 2.0 3.0 4.0 6.0
MAGNITUDES = (0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0)
LO_A, LO_B, HI_A, HI_B = (sum((MAGNITUDES[4 * half + i] >> shift & 0xFF) << (8 * i) for i in range(4))
                          for shift, half in ((0, 0), (0, 1), (8, 0), (8, 1)))
# scale codes for which every product is exact (no bf16 subnormal, no overflow): 0.5 * 2^(s-127)
# >= 2^-126 and 6 * 2^(s-127) < 2^128
SCALE_RANGE = (2, 252)

# (op, dst, *operands); registers: $0..$3 outputs (E01 E23 O01 O23), $4 the code word, $5 the
# scale word (4 copies of the group's scale byte); the others are the block's locals
PROGRAM = (
    ("mov", "la", LO_A), ("mov", "lb", LO_B), ("mov", "ha", HI_A), ("mov", "hb", HI_B),
    ("mov", "z", 0), ("mov", "nz", 0x80008000),   # -0.0 pair: x * s + (-0) keeps the sign of 0
    ("and", "s", "$5", 0xFF),
    ("mul", "s", "s", 0x00800080),                # 2^(s-127) as bf16 in both halves
    ("and", "so", "$4", 0x80808080),              # odd codes' signs: bit 7 of each byte
    ("shl", "se", "$4", 4),
    ("and", "se", "se", 0x80808080),              # even codes' signs
) + tuple(op for out, lo_sel, hi_sel, signs, sign_sel in (
    ("$0", ("shr", 0, 0x0707), ("shl", 4, 0x7070), "se", 0x1404),     # elements 0, 2
    ("$1", ("shr", 16, 0x0707), ("shr", 12, 0x7070), "se", 0x3424),   # elements 4, 6
    ("$2", ("shr", 4, 0x0707), ("shr", 0, 0x7070), "so", 0x1404),     # elements 1, 3
    ("$3", ("shr", 20, 0x0707), ("shr", 16, 0x7070), "so", 0x3424),   # elements 5, 7
) for op in (
    (lo_sel[0], "t", "$4", lo_sel[1]),
    ("and", "t", "t", lo_sel[2]),                 # selector nibbles 0 and 2: the two magnitudes
    ("prmt", "lo", "la", "lb", "t"),              # their bf16 low bytes
    (hi_sel[0], "t", "$4", hi_sel[1]),
    ("and", "t", "t", hi_sel[2]),                 # selector nibbles 1 and 3
    ("prmt", "hi", "ha", "hb", "t"),              # their bf16 high bytes
    ("prmt", "sg", signs, "z", sign_sel),         # the two signs to bits 15 and 31
    ("or", out, "lo", "hi"),
    ("or", out, out, "sg"),
    ("fma", out, out, "s", "nz"),                 # x 2^(s-127)
))
LOCALS = ("la", "lb", "ha", "hb", "z", "nz", "s", "so", "se", "t", "lo", "hi", "sg")
CONSTRAINTS = "=r,=r,=r,=r,r,r"

_PTX = {"mov": "mov.b32 {}, {};", "and": "and.b32 {}, {}, {};", "or": "or.b32 {}, {}, {};",
        "shl": "shl.b32 {}, {}, {};", "shr": "shr.u32 {}, {}, {};", "mul": "mul.lo.u32 {}, {}, {};",
        "prmt": "prmt.b32 {}, {}, {}, {};", "fma": "fma.rn.bf16x2 {}, {}, {}, {};"}


def _operand(x) -> str:
    return f"{x:#x}" if isinstance(x, int) else (x if x.startswith("$") else f"%{x}")


def ptx() -> str:
    """The asm block for tl.inline_asm_elementwise (CONSTRAINTS, pack 4: one register holds the 4
    code bytes, one the 4 scale bytes, and each bf16 output takes 2 registers of pairs)."""
    lines = ["{", ".reg .b32 " + ", ".join(f"%{r}" for r in LOCALS) + ";"]
    lines += [_PTX[op].format(_operand(dst), *map(_operand, src)) for op, dst, *src in PROGRAM]
    return " ".join(lines + ["}"])


def _prmt(a: int, b: int, sel: int) -> int:
    pool = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for k in range(4):
        nib = sel >> (4 * k) & 0xF
        byte = pool >> (8 * (nib & 7)) & 0xFF
        if nib & 8:                                         # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _to_bf16(x: float) -> int:
    """Round-to-nearest-even fp32 -> bf16 bits (x is exactly representable where it is used)."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((u + 0x7FFF + (u >> 16 & 1)) >> 16) & 0xFFFF


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for half in (0, 16):
        x, y, z = (_bf16(v >> half) for v in (a, b, c))
        out |= _to_bf16(x * y + z) << half
    return out


def emulate(word: int, scale: int) -> tuple[int, int, int, int]:
    """The four output registers PROGRAM computes for a code word and a scale byte."""
    reg = {"$4": word & 0xFFFFFFFF, "$5": (scale & 0xFF) * 0x01010101}

    def val(x):
        return reg[x] if isinstance(x, str) else x

    for op, dst, *src in PROGRAM:
        a = [val(x) for x in src]
        reg[dst] = {"mov": lambda: a[0], "and": lambda: a[0] & a[1], "or": lambda: a[0] | a[1],
                    "shl": lambda: a[0] << a[1], "shr": lambda: a[0] >> a[1],
                    "mul": lambda: a[0] * a[1], "prmt": lambda: _prmt(*a),
                    "fma": lambda: _fma_bf16x2(*a)}[op]() & 0xFFFFFFFF
    return reg["$0"], reg["$1"], reg["$2"], reg["$3"]
