"""Bodies of the `attn_partial` and `attn_reduce` task kinds (flash decoding).

Shape legend: T block tokens, REP = n_heads / n_kv_heads query heads per KV
head, R = T * REP rows (row r is token r // REP, query head kvh * REP + r % REP),
DQK query/key head dim, DV value head dim, C keys per chunk.

Buffers (element offsets are the caller's business; pointers arrive based):
  q      [T, n_heads * DQK]         block queries (RoPE applied)
  k, v   [RING, n_kv, D*]           the layer's cache; key at absolute position
                                    j lives in row j % RING (RING = max_len for
                                    full layers, window + block for SWA rings)
  m, l   [n_kv, NCHUNK, R]          partial running max / denominator (fp32)
  acc    [n_kv, NCHUNK, R, DV]      partial unnormalised output (fp32)
  sink   [n_heads]                  learned sink logit (fp32), SWA layers
  o      [T, n_heads * DV]          attention output rows

Keys visible to query i (absolute position start + i), with kv_end = start + T:
  j < kv_end; causal: j <= start + i; window W > 0: j >= start + i - W.
The draft's attention is the non-causal form (keys = context window ; block).
Chunk c covers absolute positions [lo + c*C, lo + (c+1)*C), lo = max(0,
start - W) (0 without window). A chunk past kv_end runs no key loop and writes
the neutral partial (m = -inf, l = 0, acc = 0). The sink joins the
denominator once, in the reduce.
"""
import triton.language as tl
import triton

from .tile_math import mm_nn, mm_nt, rescale


@triton.jit
def window_low(start, WINDOW: tl.constexpr):
    """First absolute key position any query of the block can see."""
    if WINDOW > 0:
        lo = tl.maximum(start - WINDOW, 0)
    else:
        lo = start * 0
    return lo


@triton.jit
def attn_partial_tile(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, kvh, chunk, start, sm_scale,
                      T: tl.constexpr, REP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                      N_HEADS: tl.constexpr, K_POS_STRIDE: tl.constexpr, K_HEAD_STRIDE: tl.constexpr,
                      V_POS_STRIDE: tl.constexpr, V_HEAD_STRIDE: tl.constexpr, RING: tl.constexpr,
                      WINDOW: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
                      NCHUNK: tl.constexpr, BR: tl.constexpr, BDQK: tl.constexpr, BDV: tl.constexpr,
                      BLOCK_N: tl.constexpr, MM: tl.constexpr):
    """One (kv head, KV chunk) partial: online softmax over the chunk's keys."""
    R: tl.constexpr = T * REP
    rows = tl.arange(0, BR)
    row_ok = rows < R
    tok = rows // REP
    head = kvh * REP + rows % REP
    qpos = start + tok
    dq = tl.arange(0, BDQK)
    dv = tl.arange(0, BDV)
    dq_ok = dq < DQK
    dv_ok = dv < DV
    q = tl.load(q_ptr + (tok * (N_HEADS * DQK) + head * DQK)[:, None] + dq[None, :],
                mask=row_ok[:, None] & dq_ok[None, :], other=0.0).to(tl.float32)
    q = q * sm_scale                                                     # [BR, BDQK]

    kv_end = start + T
    c_lo = window_low(start, WINDOW) + chunk * CHUNK
    n_keys = tl.minimum(kv_end - c_lo, CHUNK)                           # <= 0: past the context
    m_i = tl.full([BR], float("-inf"), tl.float32)
    l_i = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BDV], tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        j = c_lo + n0 + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        ring = j % RING
        k = tl.load(k_ptr + (ring * K_POS_STRIDE + kvh * K_HEAD_STRIDE)[:, None] + dq[None, :],
                    mask=j_ok[:, None] & dq_ok[None, :], other=0.0).to(tl.float32)
        s = mm_nt(q, k, MM)                                               # [BR, BLOCK_N]
        vis = row_ok[:, None] & j_ok[None, :]
        if CAUSAL:
            vis = vis & (j[None, :] <= qpos[:, None])
        if WINDOW > 0:
            vis = vis & (j[None, :] >= qpos[:, None] - WINDOW)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = rescale(m_i, m_new)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(vis, tl.exp(s - m_use[:, None]), 0.0)
        v = tl.load(v_ptr + (ring * V_POS_STRIDE + kvh * V_HEAD_STRIDE)[:, None] + dv[None, :],
                    mask=j_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mm_nn(p, v, MM)
        m_i = m_new

    part = (kvh * NCHUNK + chunk) * R + rows
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def attn_reduce_tile(m_ptr, l_ptr, acc_ptr, sink_ptr, o_ptr, kvh, start,
                     T: tl.constexpr, REP: tl.constexpr, DV: tl.constexpr, N_HEADS: tl.constexpr,
                     WINDOW: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr,
                     HAS_SINK: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    """Merge the chunk partials of one kv head (log-sum-exp), add the sink to
    the denominator, normalise, write the head group's output rows."""
    R: tl.constexpr = T * REP
    rows = tl.arange(0, BR)
    row_ok = rows < R
    tok = rows // REP
    head = kvh * REP + rows % REP
    dv = tl.arange(0, BDV)
    out_ok = row_ok[:, None] & (dv < DV)[None, :]

    # chunks at or past the context hold neutral partials: skip reading them
    n_live = tl.minimum(tl.cdiv(start + T - window_low(start, WINDOW), CHUNK), NCHUNK)
    m_run = tl.full([BR], float("-inf"), tl.float32)
    l_run = tl.zeros([BR], tl.float32)
    o_run = tl.zeros([BR, BDV], tl.float32)
    for c in range(0, n_live):
        part = (kvh * NCHUNK + c) * R + rows
        m_c = tl.load(m_ptr + part, mask=row_ok, other=float("-inf"))
        l_c = tl.load(l_ptr + part, mask=row_ok, other=0.0)
        a_c = tl.load(acc_ptr + part[:, None] * DV + dv[None, :], mask=out_ok, other=0.0)
        m_new = tl.maximum(m_run, m_c)
        alpha = rescale(m_run, m_new)
        beta = rescale(m_c, m_new)
        l_run = l_run * alpha + l_c * beta
        o_run = o_run * alpha[:, None] + a_c * beta[:, None]
        m_run = m_new
    if HAS_SINK:
        sink = tl.load(sink_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        m_new = tl.maximum(m_run, sink)
        alpha = rescale(m_run, m_new)
        l_run = l_run * alpha + tl.exp(sink - m_new)
        o_run = o_run * alpha[:, None]
    out = o_run / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
    tl.store(o_ptr + (tok * (N_HEADS * DV) + head * DV)[:, None] + dv[None, :], out, mask=out_ok)
