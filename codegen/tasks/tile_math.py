"""Small @triton.jit helpers shared by the task bodies.

Shape legend: M rows (tokens or token x head), N output columns, K reduction.
Every helper works in fp32: callers convert bf16 loads first (the Triton
interpreter's bf16 arithmetic is wrong, and fp32 accumulation is the rule).

`MM` selects how a [M, K] x [N, K]^T product is formed:
  0  broadcast-multiply-sum in fp32 (any M, exact fp32; CPU tests, tiny tiles)
  1  tl.dot with fp32 operands, IEEE precision (needs M, N, K >= 16)
  2  tl.dot with bf16 operands, fp32 accumulation (Hopper tensor cores)
"""
import triton
import triton.language as tl

MM_SUM = 0
MM_DOT_F32 = 1
MM_DOT_BF16 = 2


@triton.jit
def mm_nt(a, b, MM: tl.constexpr):
    """a [M, K] fp32, b [N, K] fp32 -> a @ b^T [M, N] fp32."""
    if MM == 0:
        out = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    elif MM == 1:
        out = tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)))
    return out


@triton.jit
def mm_nn(a, b, MM: tl.constexpr):
    """a [M, K] fp32, b [K, N] fp32 -> a @ b [M, N] fp32."""
    if MM == 0:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif MM == 1:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return out


@triton.jit
def rescale(m_old, m_new):
    """exp(m_old - m_new), 0 where m_old is -inf (nothing seen yet)."""
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - m_new))


@triton.jit
def e2m1_to_f32(nib):
    """MXFP4 element (int32 nibble, bit 3 = sign) -> fp32:
    magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 for codes 0..7."""
    mag = nib & 7
    ex = mag >> 1
    man = (mag & 1).to(tl.float32)
    pow2 = (1 << tl.maximum(ex - 1, 0)).to(tl.float32)
    val = tl.where(ex == 0, 0.5 * man, (1.0 + 0.5 * man) * pow2)
    return tl.where((nib & 8) != 0, -val, val)


@triton.jit
def e8m0_to_f32(s):
    """E8M0 scale byte (int32) -> 2^(s-127), built from the fp32 exponent bits
    (exact for s in 1..254; s = 0 gives 0 instead of 2^-127)."""
    return (s << 23).to(tl.float32, bitcast=True)


@triton.jit
def mxfp4_tile(blocks_ptr, scales_ptr, row0, n_rows, byte0, K: tl.constexpr,
               BN: tl.constexpr, BKH: tl.constexpr):
    """Dequantize rows [row0, row0+BN) x bytes [byte0, byte0+BKH) of one MXFP4
    matrix [N, K] (blocks: K/2 bytes per row, low nibble = even element;
    scales: K/32 bytes per row). Returns (even, odd): fp32 [BN, BKH] holding
    elements 2j and 2j+1 of the tile. Rows >= n_rows read as 0."""
    rows = row0 + tl.arange(0, BN)
    cols = byte0 + tl.arange(0, BKH)
    row_ok = rows < n_rows
    col_ok = cols < K // 2
    ok = row_ok[:, None] & col_ok[None, :]
    byte = tl.load(blocks_ptr + rows[:, None] * (K // 2) + cols[None, :], mask=ok, other=0)
    byte = byte.to(tl.int32)
    sbyte = tl.load(scales_ptr + rows[:, None] * (K // 32) + (cols // 16)[None, :], mask=ok, other=0)
    scale = e8m0_to_f32(sbyte.to(tl.int32))
    even = e2m1_to_f32(byte & 15) * scale
    odd = e2m1_to_f32(byte >> 4) * scale
    return even, odd


@triton.jit
def load_rows_split(x_ptr, row_stride, n_rows, col0, n_cols,
                    BT: tl.constexpr, BK: tl.constexpr):
    """Load x[0:n_rows, col0:col0+BK] (zero padded to [BT, BK]) as fp32 and
    split the columns into (even, odd) halves [BT, BK/2]."""
    rows = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BK)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    even, odd = tl.split(tl.reshape(x, [BT, BK // 2, 2]))
    return even, odd
