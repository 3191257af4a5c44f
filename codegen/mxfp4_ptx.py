"""Inline-PTX MXFP4 dequantizations: MX_DOT 8 (byte-permute table lookups on the stored bytes) and
MX_DOT 9 (rotate-and-mask on words the engine repacks once, see "MX_DOT 9" below).

MX_DOT 8: MXFP4 codes -> bf16 pairs with byte-permute table lookups, as one inline-PTX block.

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
        "prmt": "prmt.b32 {}, {}, {}, {};", "fma": "fma.rn.bf16x2 {}, {}, {}, {};",
        "rotl": "shf.l.wrap.b32 {0}, {1}, {1}, {2};", "sel": "lop3.b32 {}, {}, {}, {}, 0xE4;"}


def _operand(x) -> str:
    return f"{x:#x}" if isinstance(x, int) else (x if x.startswith("$") else f"%{x}")


def ptx(program=None, local_regs=None) -> str:
    """The asm block for tl.inline_asm_elementwise. MX_DOT 8 (the default; CONSTRAINTS, pack 4):
    one register holds the 4 code bytes, one the 4 scale bytes, and each bf16 output takes 2
    registers of pairs. MX_DOT 9: `ptx(WORD_PROGRAM, WORD_LOCALS)` (WORD_CONSTRAINTS, pack 1)."""
    program = PROGRAM if program is None else program
    local_regs = LOCALS if local_regs is None else local_regs
    lines = ["{", ".reg .b32 " + ", ".join(f"%{r}" for r in local_regs) + ";"]
    lines += [_PTX[op].format(_operand(dst), *map(_operand, src)) for op, dst, *src in program]
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
    return _run(PROGRAM, word, (scale & 0xFF) * 0x01010101)


def _run(program, word: int, second: int) -> tuple[int, int, int, int]:
    reg = {"$4": word & 0xFFFFFFFF, "$5": second & 0xFFFFFFFF}

    def val(x):
        return reg[x] if isinstance(x, str) else x

    for op, dst, *src in program:
        a = [val(x) for x in src]
        reg[dst] = {"mov": lambda: a[0], "and": lambda: a[0] & a[1], "or": lambda: a[0] | a[1],
                    "shl": lambda: a[0] << a[1], "shr": lambda: a[0] >> a[1],
                    "mul": lambda: a[0] * a[1], "prmt": lambda: _prmt(*a),
                    "fma": lambda: _fma_bf16x2(*a),
                    "rotl": lambda: (a[0] << a[1]) | (a[0] >> (32 - a[1])),
                    "sel": lambda: (a[0] & a[2]) | (a[1] & ~a[2])}[op]() & 0xFFFFFFFF
    return reg["$0"], reg["$1"], reg["$2"], reg["$3"]


# ---------------------------------------------------------------------------------------------
# MX_DOT 9: rotate-and-mask on repacked words.
#
# The engine stores every expert matrix's codes repacked once (`repack_words`): each 32-bit word
# still holds the 8 codes of 8 consecutive K elements, with their 32 bits moved so that output
# register j (bf16 pair: element 2j low, element 2j + 1 high: the K order the tensor cores read) is
# the word rotated by ROUTES[j]'s
# amount and masked. A bf16 whose bits are the code's magnitude bits e1 e0 m at bits 8..6 (exponent
# field e1 e0, mantissa bit m; the code 0.5 is the bf16 subnormal 2^-127) and its sign at bit 15
# reads as E2M1 x 2^-126, exactly; one `fma.rn.bf16x2` by 2^(s - 1 - WORD_SHIFT) (bf16, both
# halves, built per 32-element group outside the block) applies the scale, and the expert loop
# multiplies its fp32 accumulator by 2^WORD_SHIFT once at the end. 9 integer operations and 4
# bf16x2 multiplies per 8 elements, against about 36 + 4 for MX_DOT 8. No rotation set tiles all
# 32 bits with four copies of the 8 target bits (checked by brute force), so pair 3 takes two.
PAIR_MASK = 0x81C081C0                   # bits 6-8, 15 | 22-24, 31 of a bf16 pair
# output register -> (rotate-left amount, mask of the output bits it supplies)
ROUTES = ((0, PAIR_MASK),), ((4, PAIR_MASK),), ((10, PAIR_MASK),), ((6, 0x80C080C0), (14, 0x01000100))
# (the second mask of a two-route register is the rest of PAIR_MASK: WORD_PROGRAM selects with the
# first and masks with PAIR_MASK, the templates' Triton-op form masks each rotation with its own)
assert all(len(r) == 1 and r[0][1] == PAIR_MASK or len(r) == 2 and r[0][1] | r[1][1] == PAIR_MASK
           and not r[0][1] & r[1][1] for r in ROUTES)
WORD_SHIFT = 32
# scale codes for which every product is exact: the factor 2^(s-1-WORD_SHIFT) is a normal bf16
# (s <= 128 + WORD_SHIFT) and 0.5 * 2^(s-127-WORD_SHIFT) >= 2^-126 (s >= WORD_SHIFT + 2). (The dot
# then multiplies x by weights 2^WORD_SHIFT too small: a product under fp32's 2^-126, |x w| < 2^-94
# in true value, may be flushed by the tensor cores; trained weights have s near 120.)
WORD_SCALE_RANGE = (WORD_SHIFT + 2, WORD_SHIFT + 128)
# (op, dst, *operands): $0..$3 outputs, $4 the repacked word, $5 the group's factor (bf16 pair)
WORD_PROGRAM = (("mov", "nz", 0x80008000),) + tuple(
    op for j, routes in enumerate(ROUTES) for op in (
        ((("and", f"${j}", "$4", routes[0][1]),) if routes[0][0] == 0 and len(routes) == 1 else
         (("rotl", "t", "$4", routes[0][0]), ("and", f"${j}", "t", routes[0][1])) if len(routes) == 1 else
         (("rotl", "t", "$4", routes[0][0]), ("rotl", "u", "$4", routes[1][0]),
          ("sel", "t", "t", "u", routes[0][1]), ("and", f"${j}", "t", PAIR_MASK)))
        + (("fma", f"${j}", f"${j}", "$5", "nz"),))
)
WORD_LOCALS = ("nz", "t", "u")
WORD_CONSTRAINTS = "=r,=r,=r,=r,r,r"


# element e of a word -> (output register, bit offset of its half)
WORD_ELEMENT = tuple((e // 2, 16 * (e % 2)) for e in range(8))


def _word_destinations() -> list[list[int]]:
    """dest[e][i]: the bit of the repacked word that holds bit i (m, e0, e1, sign) of element e."""
    dest = []
    for e in range(8):
        j, half = WORD_ELEMENT[e]
        bits = []
        for target in (6, 7, 8, 15):
            q = target + half
            amount = next(r for r, mask in ROUTES[j] if mask >> q & 1)
            bits.append((q - amount) % 32)
        dest.append(bits)
    return dest


WORD_DEST = _word_destinations()


def word_factor(scale: int) -> int:
    """The bf16 pair 2^(s - 1 - WORD_SHIFT) the block multiplies by (s in WORD_SCALE_RANGE)."""
    bits = (scale + 126 - WORD_SHIFT) << 7
    return bits | bits << 16


def emulate_word(word: int, scale: int) -> tuple[int, int, int, int]:
    """WORD_PROGRAM's four output registers for a repacked word and a scale code (the values x
    2^-WORD_SHIFT: the bf16 pairs the tensor cores see)."""
    return _run(WORD_PROGRAM, word, word_factor(scale))


def repack_word(word: int) -> int:
    """A word of 8 codes in the stored MXFP4 order (element e = nibble e) in MX_DOT 9's order."""
    out = 0
    for e in range(8):
        code = word >> 4 * e & 15
        for i in range(4):
            out |= (code >> i & 1) << WORD_DEST[e][i]
    return out


def repack_words(blocks):
    """MXFP4 blocks (uint8 [..., K/32, 16], the models/mxfp4 layout) with every little-endian
    32-bit word repacked for MX_DOT 9 (same shape and dtype; torch, on the tensor's device, in
    chunks so a large expert tensor needs little extra memory)."""
    import torch
    flat = blocks.contiguous().view(-1)
    if flat.numel() % 4:
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)}: not a whole number of 32-bit words")
    out = torch.empty_like(flat)
    chunk = 1 << 26
    for start in range(0, flat.numel(), chunk):
        b = flat[start:start + chunk].view(-1, 4).to(torch.int64)
        w = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
        r = torch.zeros_like(w)
        for e in range(8):
            for i in range(4):
                r |= (w >> (4 * e + i) & 1) << WORD_DEST[e][i]
        out[start:start + chunk].view(-1, 4).copy_(torch.stack([r >> (8 * k) & 255 for k in range(4)], 1))
    return out.view(blocks.shape)


def afrag_source() -> list[int]:
    """AFRAG's element order in a 128-element block: position 8 w + e (w = 4q + g the word,
    e = e0 + 2 e1 + 4 e2 its element) holds element 32 g + 16 e2 + 8 e1 + 2 q + e0."""
    src = []
    for w in range(16):
        q, g = divmod(w, 4)
        for e in range(8):
            e0, e1, e2 = e & 1, e >> 1 & 1, e >> 2
            src.append(32 * g + 16 * e2 + 8 * e1 + 2 * q + e0)
    assert sorted(src) == list(range(128))
    return src


def afrag_order(blocks):
    """MXFP4 blocks (uint8 [..., K/32, 16]) with the elements of every 128-element block of a row
    in AFRAG's order (afrag_source; codegen/templates/tasks/_mxfp4.j2 puts them back), before
    repack_words. A word's 8 elements stay in one 32-element group (one scale). K % 128 == 0."""
    import torch
    *lead, groups, nbytes = blocks.shape
    if nbytes != 16 or groups % 4:
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)}: AFRAG needs [..., K/32, 16] with K a "
                         "multiple of 128")
    src = torch.tensor(afrag_source(), device=blocks.device)
    b = blocks.contiguous().view(-1, 64)                             # 128-element blocks (64 bytes)
    out = torch.empty_like(b)
    chunk = 1 << 20
    for start in range(0, b.shape[0], chunk):
        x = b[start:start + chunk]
        nib = torch.stack([x & 15, x >> 4], dim=-1).view(-1, 128)   # element k of the block
        nib = nib[:, src].view(-1, 64, 2)
        out[start:start + chunk] = nib[..., 0] | nib[..., 1] << 4
    return out.view(blocks.shape)
