"""The task-record layout of the megakernel, defined once.

A task record is RECORD_WORDS int64 words in a device buffer; records are
stored program-major in queue order, and `queue[p]:queue[p+1]` are the
records program p runs. The generated kernel reads fields with the offsets
below (rendered into the template), and the runtime packs records with
`pack_records` from the same table, so the two cannot disagree.

Word map (W = RECORD_WORDS):
  0            kind        KIND_IDS[kind]
  1            task        task id in the tile program (for error reports)
  2            n_wait      waits used (the first n_wait wait slots)
  3            n_signal    signals used (the first n_signal signal slots)
  4 .. 4+A     args        kind-specific ints, named per kind in KINDS
  then         waits       MAX_WAITS x (counter, target, per_step)
  then         signals     MAX_SIGNALS x (counter, increment)
  then         prefetch    MAX_PF x (arena, element offset, bytes): the task's contiguous weight
                           ranges, which WPF > 0 moves into L2 before the task's wait

A wait on counter c with (target, per_step) is satisfied at step `epoch`
(1, 2, ...) when counters[c] >= (epoch - 1) * per_step + target: counters
only grow, `per_step` is the static number of signals c gets per step, so
no memset is needed between steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tilecomp.errors import ScheduleError

RECORD_DTYPE = torch.int64
MAX_ARGS = 28
MAX_WAITS = 4
MAX_SIGNALS = 2
# Counters sit on their own 128-byte line (32 int32 words), so programs
# polling one counter do not slow the release of another.
COUNTER_STRIDE = 32
# Error buffer: one row per program: (flag, task, counter, value, target).
ERROR_WORDS = 5

F_KIND = 0
F_TASK = 1
F_NWAIT = 2
F_NSIGNAL = 3
F_ARG0 = 4
F_WAIT0 = F_ARG0 + MAX_ARGS
WAIT_WORDS = 3
F_SIGNAL0 = F_WAIT0 + MAX_WAITS * WAIT_WORDS
SIGNAL_WORDS = 2
MAX_PF = 2
PF_WORDS = 3
F_PF0 = F_SIGNAL0 + MAX_SIGNALS * SIGNAL_WORDS
RECORD_WORDS = F_PF0 + MAX_PF * PF_WORDS
# the arenas a prefetch range can name (record word: the index into this; runtime/buffers.py names)
PF_ARENAS = ("w", "f32")
PF_MIN_BYTES = 4096         # smaller weight ranges (norm gains, biases) are not worth a record slot


@dataclass(frozen=True)
class KindABI:
    """What one task kind's body reads from its record and the kernel signature.

    args: names of the kind's record args; the frame loads each into a local
      `r_<name>` (int64 scalar) at the top of the kind's branch.
    constexprs: kernel constexpr parameters the body uses (by name).
    """
    name: str
    id: int
    args: tuple[str, ...]
    constexprs: tuple[str, ...] = ()

    def arg_word(self, name: str) -> int:
        return F_ARG0 + self.args.index(name)


def _kinds(*specs) -> dict[str, KindABI]:
    table = {}
    for i, (name, args, constexprs) in enumerate(specs, start=1):
        assert len(args) <= MAX_ARGS, name
        assert len(set(args)) == len(args), name
        table[name] = KindABI(name, i, tuple(args), tuple(constexprs))
    return table


# Offsets named `*` are element offsets into an arena (see codegen/README.md);
# the others are sizes, indices or flags. Kinds keep the INTERFACES.md order.
# A tile [n0, n1) covers columns n0 .. min(n1, n0 + BLOCK_N); n1 <= n0 means one BLOCK_N tile.
KINDS: dict[str, KindABI] = _kinds(
    # token rows -> x rows (columns d0:d1; d1 <= d0: all); ids < 0 or == mask_id take the mask embedding
    ("embed", ("ids", "table", "mask_row", "mask_id", "out", "n_rows", "dim", "row0", "d0", "d1"),
     ("BLOCK_T", "BLOCK_D", "WALIGN", "AALIGN")),
    # y[t, n0:n0+BN] (+)= norm?(x[t, :]) @ W[n0:n0+BN, k0:k1]^T (+ bias) (+ residual);
    # w_up >= 0: SwiGLU, y = silu(norm?(x) @ W^T) * (norm?(x) @ W_up^T)
    ("linear", ("x", "x_stride", "w", "w_up", "k_dim", "n_dim", "n0", "n1", "k0", "k1",
                "norm", "eps_bits", "bias", "res", "res_stride", "y", "y_stride", "n_rows",
                "rows"),
     ("BLOCK_T", "BLOCK_N", "BLOCK_K", "STAGES", "WALIGN", "L2PF", "AALIGN", "NORM_F32", "UPLOOP")),
    # y[t, n0:n0+BN] = sum_s part[s, t, n0:n0+BN] (+ residual)
    ("linear_reduce", ("part", "n_split", "split_stride", "n_dim", "n0", "n1", "res", "y",
                       "y_stride", "n_rows", "rows"),
     ("BLOCK_T", "BLOCK_N", "STAGES", "AALIGN")),
    # one KV head group: q/k/v rows for T tokens, partial RoPE, K/V cache write
    # one KV head: its REP query heads, k and v rows for the tokens; partial RoPE on q/k;
    # k/v written to cache row (pos + t) % ring of the head ([n_kv, ring, D]). wq < 0: k/v only (draft context)
    # q_head0 / q_heads: the group's query heads this task projects (q_heads 0: all of them);
    # wk < 0: no k/v (a query-only part of a split group); rope_part 1 / 2: only the rotary rows
    # (the first rope_dim of each q / k head) / only the others (0: all); row1 > row0: the
    # others only from row row0 to row1 of the head (q / k; v: its rows), the rotary rows not at all;
    # rope_part 3: rows row0 .. row1 of the one matrix given, its heads' rows end to end (qkv_span)
    ("qkv_rope_kv", ("x", "x_stride", "norm", "eps_bits", "wq", "wk", "wv", "q_out", "k_cache",
                     "v_cache", "head", "n_heads_q", "n_kv_heads", "head_dim", "v_head_dim",
                     "rope_dim", "theta_bits", "v_scale_bits", "dim", "pos", "ring", "n_rows",
                     "rows", "q_head0", "q_heads", "rope_part", "row0", "row1"),
     ("BLOCK_T", "BLOCK_K", "BLOCK_N", "BLOCK_R", "STAGES", "WALIGN", "L2PF", "AALIGN", "NORM_F32", "QKV_LOOP")),
    # (kv head, chunk): partial (m, l, acc) of the head group's queries; key j at cache row
    # j % ring; pos = arena_i32 offset of the block start; causal 0 = the draft's form
    # arrive >= 0 (passes/fold_reduce.py): the counter the head's partials arrive at; the last
    # to arrive merges them as attn_reduce does (sink, out, n_chunks: attn_reduce's args)
    ("attn_partial", ("q", "k_cache", "v_cache", "part_m", "part_l", "part_acc",
                      "head", "chunk", "chunk_len", "n_heads_q", "n_kv_heads", "head_dim",
                      "v_head_dim", "window", "causal", "pos", "ring", "scale_bits", "n_rows",
                      "arrive", "n_chunks", "sink", "out"),
     ("BLOCK_TA", "BLOCK_S", "BLOCK_HD", "BLOCK_HV", "STAGES", "ARRIVE")),
    # kv head (its query heads h0..h1 of the group; h1 <= h0: all): merge the chunk partials,
    # sink (-1 = none) in the denominator, normalise
    ("attn_reduce", ("part_m", "part_l", "part_acc", "sink", "out", "head", "n_chunks",
                     "n_heads_q", "n_kv_heads", "v_head_dim", "n_rows", "h0", "h1"),
     ("BLOCK_TR", "BLOCK_HV", "STAGES")),
    # layer: (norm +) router + sigmoid + biased top-k + weights -> plan (count, experts
    # ascending) and weights [n_slots, n_rows]; gate < 0: x holds router logits already;
    # split != 0: only the logits of experts [e0, e1) (a split router's first phase)
    ("moe_route", ("x", "norm", "eps_bits", "gate", "bias", "xn", "plan", "weights",
                   "n_experts", "top_k", "scale_bits", "norm_topk", "dim", "n_rows",
                   "split", "e0", "e1", "logits", "arrive", "n_splits", "xn0", "xn1", "sync", "n_sync"),
     ("BLOCK_T", "BLOCK_E", "BLOCK_RN", "BLOCK_K", "BLOCK_KR", "STAGES", "WALIGN", "AALIGN", "NORM_F32",
      "ARRIVE", "ROUTE_DOT", "XACT")),
    # (slot, columns n0..n1 in BLOCK_N tiles; n1 <= n0: one tile), the same for expert_down and
    # moe_combine: act[slot] = silu(x @ gate^T) * (x @ up^T), MXFP4 dequantized in registers
    ("expert_up_gate", ("x", "plan", "gate_blocks", "gate_scales", "up_blocks", "up_scales",
                        "act", "slot", "n0", "n1", "inter", "dim", "n_rows", "weights", "part", "parts",
                        "sync"),
     ("BLOCK_T", "BLOCK_NX", "BLOCK_KX", "MX_DOT", "PTX_ASM", "STAGES_X", "SALIGN", "L2PF", "AALIGN", "XPIPE", "WLEFT", "STILE", "AFRAG", "XACT", "XFLAT", "XQUEUE", "XEVEN", "XTILE")),
    # (slot, n tile): out[slot] = weights[slot, t] * (act[slot] @ down^T)
    # parts > 0 (both expert kinds): part `part` of `parts` of all routed (slot, tile) units
    # sync >= 0 (both expert kinds; LowerOptions.expert_queue, kernel XQUEUE): the parts take their
    # units from the layer's queue (arena_i32 [2 + n_slots], zeroed by moe_route's plan task):
    # [0] / [1] up_gate / down units taken, [2 + s] slot s's up_gate units done
    ("expert_down", ("act", "plan", "weights", "blocks", "scales", "out", "slot", "n0", "n1",
                     "inter", "dim", "n_rows", "part", "parts", "sync"),
     ("BLOCK_T", "BLOCK_NX", "BLOCK_KX", "MX_DOT", "PTX_ASM", "STAGES_X", "SALIGN", "L2PF", "AALIGN", "XPIPE", "WLEFT", "STILE", "AFRAG", "XACT", "XFLAT", "XQUEUE", "XEVEN", "XTILE")),
    # n tile: y = res + sum of the slot partials (slot order, slots < plan count); weights:
    # moe_route's per-(slot, token) weights (COMB_GATHER: which slots each row chose)
    ("moe_combine", ("part", "plan", "n_slots", "res", "y", "n0", "n1", "dim", "n_rows", "weights",
                     "top_k"),
     ("BLOCK_T", "BLOCK_NC", "STAGES_C", "AALIGN", "COMB_GATHER", "BLOCK_KS", "BLOCK_SL")),
    # logits tile + per-row (max key, argmax) of the tile; key = logit (greedy) or
    # logit / T + Gumbel(seed, position, token) (sampling), position = state.pos + row + pos_shift
    ("lm_head", ("x", "x_stride", "norm", "eps_bits", "w", "dim", "vocab", "n0", "n1", "logits",
                 "tile_key", "tile_arg", "tile", "n_tiles", "state", "pos_shift", "n_rows", "rows"),
     ("BLOCK_T", "BLOCK_NH", "BLOCK_K", "STAGES", "WALIGN", "L2PF", "AALIGN", "NORM_F32")),
    # out[t] = token of the largest tile key of row t (lowest token on ties); with top_p < 1
    # (and temperature > 0) the whole logits row is re-read: top-p cut-off, then Gumbel keys
    ("sample_reduce", ("tile_key", "tile_arg", "n_tiles", "out", "n_rows", "logits", "vocab",
                       "state", "pos_shift"),
     ("BLOCK_T", "BLOCK_V", "BLOCK_N")),
    # DFlash acceptance (mode 1) or plain decoding (mode 0): commit, next-step state
    ("accept", ("state", "draft_tok", "post_tok", "n_block", "out_tokens", "block", "draft_block",
                "mask_id"),
     ("BLOCK_T",)),
    ("allreduce", ("buf", "numel", "rank"), ()),
    ("send", ("buf", "numel", "peer"), ()),
    ("recv", ("buf", "numel", "peer"), ()),
)

# constexprs that tune a kind's code without changing its results, with their defaults:
# STAGES = weight tiles in flight per pipelined K loop (tl.range num_stages; 1 = one-tile
# manual prefetch issued before the task's wait)
# WALIGN = weight rows and slots are multiples of this many elements (alignment hint for
# 16-byte loads; 1 = no hint)
# MX_DOT = 1: the expert loops multiply with tl.dot_scaled (Triton's MXFP4 product, bf16
# activations) in a pipelined K loop (STAGES_X raw tiles in flight, staged in shared memory);
# 2: tl.dot_scaled with the next raw tile prefetched into registers; 0 and 3: the template's
# own bit-level dequantization to fp32 (exact: the interpreter runs them, where bf16 math is
# wrong), 0 with per-code branches, 3 by bit-casting the code into fp32 (no branch).
# 5: 3 with the weights as the dots' left operand (rows = the MMA's M: Hopper's wgmma at 64+
# rows, the tokens on N), the activations converted once per K step for all warps.
# 6: the codes as 32-bit words, one mask + integer multiply + mask per element and one scale
# multiply (3 has ~5 integer ops and 2 multiplies), joined back in registers into 3's even / odd
# tiles for the same two dots per K step; exact for scale codes 65..191 and all-zero groups (the
# engine checks the weights, else 3).
# 7: 3's even / odd tiles interleaved back into K order (tl.join), one dot per matrix per K step
# over the natural x tile (sm_90: 4 bar.sync per up_gate K step against 8). Session 10, H200:
# up_gate in a kernel of its own 438 against 514 us, but in the whole megakernel 656 against 577,
# and flash 8L block 8 14.75 against 13.1-13.3 ms, so 3 stays.
# 8: bf16 pairs straight from the codes, byte-permute (prmt) table lookups and a bf16x2 scale
# multiply in inline PTX (codegen/mxfp4_ptx.py; the values 3 rounds to bf16, for scale codes
# 2..252: the engine checks the weights, else 3). GPU only (the interpreter has no inline asm);
# sm_90 up_gate K loop 1132 instructions against 1302. Not yet measured on a GPU.
# 9: the codes as 32-bit words that the engine repacks once (codegen/mxfp4_ptx.py, "MX_DOT 9"):
# per word 9 rotate / mask operations and 4 bf16x2 multiplies in inline PTX give its 8 elements
# in K order (x 2^-32, put back on the accumulator), one dot per matrix per K step over the
# natural x tile; exact for scale codes 34..160 (the engine checks the weights, else 3). GPU only.
# SALIGN = expert scale rows (K / 32 bytes) are multiples of this many bytes (1 = no hint)
# L2PF = weight tiles the streaming loops (linear, lm_head, qkv_rope_kv, experts) prefetch
# into L2 ahead of their loads, with Hopper's bulk prefetch (cp.async.bulk.prefetch.L2: no
# register or shared-memory cost), plus the first L2PF tiles of a task before its wait (for
# the experts: once the plan names the expert). 0 = off: the interpreter has no inline asm,
# and GPUs before sm_90 have no bulk prefetch (the engine turns it off there).
# AALIGN = the fp32 activation offsets and row lengths ACT_ALIGNED_ARGS names are multiples of this
# many elements (4: 16-byte vector loads of activations; the engine lowers it to what the
# records allow, act_alignment). Without it every fp32 activation load in the K loops was a
# 4-byte copy per element: ncu on flash 2L block 8 counted 54% of linear's and the LM head's
# global sectors as excessive (H200, session 9).
# NORM_F32 = 1: the RMSNorm gains live in arena_f32 (exact: they are widened from the checkpoint
# dtype), and the K loops load them as one fp32 [1, BLOCK_K] row per step. 0 (bf16 gains in
# arena_w): a stride-0 [BLOCK_T, BLOCK_K] bf16 tile, which Triton's coalescing groups with the x
# tile (one shape, shared offsets) and gives 8 elements per thread, so every fp32 x copy is two
# 16-byte halves 32 bytes apart: 74% of linear's remaining excessive sectors (ncu source counters,
# H200, session 9). Measured (session 10, H200, flash 8L): 13.13 / 13.25 ms with 1 against 12.87
# with 0 at block 8, 4.54 against 4.60 at block 1; run-to-run spread is 2-3%, so 0 (version 8's
# loads) stays the default. The engine places the gains (weights.add_weights) and checks every
# record's norm slot (RecordBuilder).
# PTX_ASM (MX_DOT 9 only) = 1: the repacked words are decoded by the inline-PTX block of
# codegen/mxfp4_ptx.py (9 integer ops and 4 bf16x2 multiplies per word; a GPU build, GPU_TUNING);
# 0: the same rotations and masks as Triton integer ops, the pairs widened to fp32 and scaled there
# (what the interpreter runs, so the CPU tests cover the repacked arena, the word routes, the K
# order and the 2^WORD_SHIFT rescale end to end; on a GPU a measurable variant).
# ROUTE_DOT: the fp32 router's product (moe_route). 0: input_precision "ieee", Triton's FMA dot,
# whose operands go through shared memory in a layout with many bank conflicts: ncu on the whole
# small block-1 step (H100, session 13) counted ~32 shared wavefronts per LDS.128 of the router's
# K loop (28 excessive), and the trace 60 us per split-router task (157 us on flash 8L block 8) for
# ~6 KB of weights. 1: "tf32x3", three tensor-core products of the tf32 halves (hi*hi + hi*lo +
# lo*hi), error about fp32's (lo*lo is ~2^-22 relative); the interpreter computes both in fp32.
# 2 (split router only; the single-task router takes 1): no dot, the products of a [BLOCK_RN,
# BLOCK_KR] weight tile and the [BLOCK_T, BLOCK_KR] rows accumulated elementwise in a [BLOCK_RN,
# BLOCK_T, BLOCK_KR] fp32 tile, summed once after the K loop (sm_90, BLOCK_RN 4 x BLOCK_KR 128:
# a 186-instruction K step with 36 FFMA, no spills, against ieee's 639 with 140 conflicted LDS).
# XPIPE (expert kinds, MX_DOT 0/3/5-9): 1 runs the K loops as Triton's software pipeline
# (`tl.range(..., num_stages=STAGES_X)`: the raw MXFP4 tiles of STAGES_X - 1 K steps ahead in
# flight as 16-byte async copies into shared memory, sm_90 build checked: LDGSTS.128 in the loop,
# up_gate alone 53 -> 88 KB of shared memory, no spills) instead of 0, the one-step register
# prefetch (the next tile loaded before this one is decoded: ~16 KB in flight per SM for up_gate's
# 128 x 128 tiles, which at ~1.5 us loaded latency caps 132 SMs near 1.4 TB/s; the expert
# phases measure ~0.75-1 TB/s on both the H100 and the H200). Measured: GPU_TUNING's notes below
# (v13, on by default on a GPU). The pipelined loops have no L2PF prefetch (it belongs to the register-prefetch loops only).
# STILE (expert kinds): 1 reads the E8M0 scales in the tiled layout the engine writes once
# (tile_scales below: per matrix, the 32-bit word of 4 groups that covers 128 K elements of a row,
# K-word-major, so a K step's words for consecutive rows are consecutive), 0 the models' row-major
# [N, K/32] bytes. In the row-major layout a 128-wide K step reads 4 bytes per row from rows
# K/32 bytes apart: one 32-byte L2 sector per row for 4 useful bytes (ncu on up_gate alone, v14,
# H100: the scale loads' sectors were a quarter of the kind's global sectors). Needs every expert
# matrix's K/32 to be a multiple of 4 (the engine falls back to 0 otherwise).
# AFRAG (expert kinds, MX_DOT 9, BLOCK_KX a multiple of 128): 1 has the engine store each
# 128-element block of a row with word 4q + g holding the elements 32g + 16 e2 + 8 e1 + 2q + e0
# (codegen/mxfp4_ptx.py afrag_order), and loads the tile's rows in afrag_rows order
# (_mxfp4.j2); the template's reshape / permute put both back. The dequantized values of a word
# then sit in the thread that the wgmma register operand (WLEFT 1) wants them in, so Triton drops
# the layout conversion through shared memory: sm_90 up_gate K loop without its 16 STS.128 + 16
# LDSM (64 KB written and read back per K step) and with 2 bar.sync instead of 4. 0: K order.
# UPLOOP (linear): 1 gives the linear tasks without a SwiGLU up matrix (o_proj, down_proj, the
# draft's fc / o / down) their own pipelined K loop without the up tile; 0 runs every task through
# the one loop that loads the up tile masked off (no bytes move, but the zeros are still staged in
# shared memory, read back and multiplied). sm_90 build (`bench/sass_loops.py linear`): the
# no-up loop is 265 instructions per 256-wide K step with 16 HMMA, 24 LDSM and 14 async copies,
# against 343 with 32 / 32 / 22. Measured: GPU_TUNING's notes below (v37, on by default on a GPU).
# UPLOOP 2: as 1, and the tasks with neither an up matrix nor a norm (o_proj, down_proj, the
# draft's o / down) run a third loop without the norm gains: the one-norm-loop form loads a
# [BLOCK_T, BLOCK_K] gain tile masked off every K step (no bytes, but staged through the
# pipeline and multiplied into x with the row scale). sm_90 build (Triton 3.6, flash, GPU tiles,
# `bench/sass_loops.py linear --variant UPLOOP=2`): that loop is 185 instructions per 256-wide K
# step (12 async copies) against the no-up loop's 259 (14); x keeps its multiply by the row
# scale (1 there): fed from shared memory straight into the dot, the fp32 tile was read with 64
# LDS.64 per step (258 instructions). Not yet measured on a GPU.
# XACT (moe_route, expert kinds; not a --tile switch: the engine sets it from the tile program,
# runtime/compiled.py tile_constexprs): 1 when the lowering stored the experts' inputs (moe_route's
# normed rows xn and up_gate's act) as "operand" buffers, in the weights' dtype in arena_w
# (LowerOptions.expert_operands), 0 when they are fp32 in arena_f32. The tensor-core paths round
# them to bf16 before the dot either way, so the products are the same bits. With MX_DOT 9 and
# WLEFT the K loop then loads the x tile K-major straight into the pipeline's shared-memory
# buffers (the dot's right operand): no per-step fp32 load, conversion, shared-memory store and
# fence, and the dots become properly asynchronous (sm_90 build: wgmma.wait_group 3 instead of 0
# after each dot, so the next K step's dequantization overlaps the tensor cores).
# XFLAT (expert kinds): 1 walks a task's (slot, tile) units and their K steps as ONE loop
# (`tl.range(..., flatten=True)` on the unit loop: Triton fuses the nest and software-pipelines
# the whole of it), so the raw tiles of the next unit are in flight while this unit's last K steps
# run; 0 restarts the K loop's pipeline for every unit (a fill of STAGES_X - 1 tiles and a drain
# per unit: ~7 units of 32 K steps per up_gate task and ~14 of 16 per down task at flash block 8).
# sm_90 build: one loop with the unit's setup and epilogue behind branches; its common path is
# ~495 instructions per up_gate K step (452 nested) and ~330 per down step (287).
# STAGES_C / BLOCK_NC (moe_combine): the slot loop's pipeline depth and column tile. The combine
# sums ~57 slot partials (flash block 8) one after another; each is a small load from L2, so the
# task is a chain of load latencies with STAGES_C - 1 of them in flight (the v18 trace: 64 us per
# combine task, on every MoE layer's chain). BLOCK_NC as wide as the lowering's column range (128)
# walks the slots once per task instead of once per BLOCK_NC tile. The CPU values: 3 and BLOCK_N.
# COMB_GATHER (moe_combine): 1 adds, for each row, only the partials of the top_k slots it chose
# (the nonzero entries of moe_route's weights, ascending): top_k independent gathered loads per
# column tile instead of the chain over all count slots (version 23 found the chain's depth
# did not move the step: the all-slot chain reads count / top_k times the bytes it needs and waits
# count / (STAGES_C - 1) load latencies). The same sum in the same order less the skipped zeros.
# BLOCK_KS / BLOCK_SL: powers of two at least the experts per token and the plan's slots
# (constexprs_for sets them from the model; a task whose top_k or n_slots exceeds them sums the
# chain instead).
# QKV_LOOP (qkv_rope_kv): 1 runs every chunk of a task through ONE projection loop over (matrix,
# chunk): k, v, then the query heads, each chunk max(BLOCK_R, BLOCK_N) rows wide, a k / q head's
# rotary chunk first (its rotated accumulator picked by tl.where), with int32 in-row offsets and
# the sin / cos tables built BLOCK_T // 4 rows at a time; 0 gives each matrix's rotary chunk and
# each BLOCK_N chunk of the rest a K loop of its own (one copy of the K loop's code per chunk kind
# and matrix). With BLOCK_R 128 > BLOCK_N 64 (the flash presets) a 192-row q head is 2 passes over
# x instead of 3. sm_90 build (Triton 3.6, flash, GPU tiles, `bench/sass_loops.py qkv_rope_kv
# --variant XACT=1[,QKV_LOOP=1] --code-size --any-loop`): the kind's code 89.0 -> 40.4 KB (accept +
# the kind, less accept); the kernel of the kind alone 93.9 -> 45.1 KB, spills 80 / 40 -> 68 / 56
# bytes (the sin / cos loop and the matrix loop touch local memory, the K step does not); one
# 324-instruction K step (32 HMMA) for every chunk instead of 5 copies (k's and q's 128-row rotary
# ones, 335 / 327, and k's, v's and q's 64-row ones, 270 with 16 HMMA); the whole engine kernel 332
# -> 287 KB, spills 192 / 108 -> 136 / 108 bytes, shared memory 188,416 bytes either way.
# Measured (v28, H100): -0.259 ms per flash 8L block-8 step; on by default on a GPU (GPU_TUNING).
# XEVEN (expert_up_gate / expert_down): 1 lets a program whose expert tiles all lie inside their
# matrices drop the bounds masks of the expert weight loads and of the K of their input's loads
# (runtime/compiled.expert_tiles_whole decides; the launch gets 0 otherwise). sm_90 build (Triton
# 3.6, flash, GPU tiles, `bench/sass_loops.py expert_up_gate,expert_down --variant
# XACT=1[,XEVEN=1]`): the up_gate K step 420 -> 390 instructions, down 259 -> 232, the two kinds'
# kernel 210 -> 179 registers. Measured (session 24, H100, interleaved A/B of 60 pairs): flash 8L
# block 8 -0.024 ms (0.3%; `--ab-tile XEVEN=0` against it on: +0.024 [+0.015, +0.033]); block 1
# +0.007 [+0.002, +0.017] (session 25). Exact on the GPU (session 25: the small preset's tokens
# check, median prompt-logit deviation 2.3318 with and without it, every margin the same). Off by
# default: the two blocks' effects cancel; --tile XEVEN=1 turns it on.
# XTILE (expert kinds): 1 has the engine store each expert matrix's codes tile by tile (tile_blocks
# below: every BLOCK_NX x BLOCK_KX tile, the bytes one K step of one unit loads, is one contiguous
# run of BLOCK_NX * BLOCK_KX / 2 bytes, the tiles of a row band in K order), and the loads address
# it so; 0: the models' row-major [N, K/2] bytes. Row-major, a 128 x 128 K step reads 64 bytes
# from each of 128 rows K/2 bytes apart (2 KB for up_gate, 1 KB for down at flash shapes): every
# 64-byte piece is its own DRAM burst in another page, and the row's next 64 bytes come a K step
# later. The tiled layout streams 8 KB runs instead. Needs every expert matrix's rows and K to be
# multiples of BLOCK_NX and BLOCK_KX (the engine falls back to 0 otherwise); the arena then
# depends on those two tiles too (a variant program cannot change them). L2PF's row prefetches
# still name row-major addresses (a hint: they fetch other lines, nothing reads them wrong).
# Measured (v36, session 25, H100): flash 4L block 8 A/B -0.021 ms [-0.030, -0.010] (0.44%); 8L
# 30-step runs 7.537 against 7.401 ms (within their spread); exact (the small preset's tokens check
# gives XTILE 0's deviations to the last bit). Off: the experts' access pattern is not what holds them.
TUNING_DEFAULTS = {"STAGES": 3, "WALIGN": 1, "MX_DOT": 3, "STAGES_X": 3, "SALIGN": 1, "L2PF": 0, "AALIGN": 4,
                   "NORM_F32": 0, "NOINLINE": 0, "PTX_ASM": 0, "ARRIVE": 0, "ROUTE_DOT": 0, "XPIPE": 0,
                   "WLEFT": 0, "STILE": 0, "AFRAG": 0, "UPLOOP": 0, "XACT": 0, "WPF": 0, "WPFL": 0,
                   "INLINE": 0, "XFLAT": 0, "STAGES_C": 3, "MMAV2": 0, "QKV_LOOP": 0,
                   "COMB_GATHER": 0, "BLOCK_KS": 8, "BLOCK_SL": 64, "XQUEUE": 0, "XEVEN": 0,
                   "XTILE": 0}


# switches that change how the engine writes the weights into its arena (MX_DOT 9's repacked words,
# AFRAG's element order, STILE's scale tiles, NORM_F32's norm gains): a kernel built with another
# value needs another arena, so `MegakernelEngine.variant_program` (the bench's A/B on one engine)
# refuses them
ARENA_TILES = ("MX_DOT", "AFRAG", "STILE", "NORM_F32", "XTILE")


# tile sizes that default to another one when a kernel's constexprs leave them out
# (moe_combine's column tile is the linear tile unless a GPU tuning widens it)
# (attn_reduce's row tile is attn_partial's unless set: the GPU sets both, so a BLOCK_TA variant
# leaves the merge's tile alone)
DERIVED_TILES = {"BLOCK_NC": "BLOCK_N", "BLOCK_TR": "BLOCK_TA"}


# constexprs of the frame itself (every kernel has them): NOINLINE = 1 calls each kind's compute
# function as a separate device function (triton.jit(noinline=True): the register allocator
# sees one kind at a time; a kind in the whole megakernel spilled 28x more than in a kernel of
# its own, ncu on expert_up_gate, H200, session 10); 0 inlines it (the code of version 8).
# INLINE (with NOINLINE 1): a mask of kind ids (bit KINDS[name].id; `inline_mask`) whose bodies
# stay inlined. When a wgmma sits in a called device function, ptxas serializes every wgmma of
# the kernel (C7510, "wgmma pipeline crossing function boundary"): with NOINLINE 1 each HGMMA of
# the expert K loops is followed by a full WARPGROUP.DEPBAR (wait for 0 in flight), so the
# dequantization of the next K step cannot overlap the tensor cores. With both expert kinds (the
# only wgmma users) inlined the message is gone and the waits are asynchronous again, whatever
# the other kinds do.
# Measured (v19, session 19, H100): INLINE=expert_up_gate+expert_down takes the expert phases
# alone 229 -> 217 us (up_gate) and 148 -> 139 us (down), but the whole flash 8L block-8 step is
# slower (8.79 / 8.89 ms against 8.63 / 8.63; the frame then spills 112 / 136 bytes), so it is 0.
# WPF (KB; 0 = off): cross-task prefetch. Before its bounded wait, a task has one thread issue
# Hopper's bulk L2 prefetch (cp.async.bulk.prefetch.L2, 32 KB per instruction) for the first WPF KB
# of each of its contiguous weight ranges (record words F_PF0..: runtime/compiled.py
# RecordBuilder.prefetch_ranges), so the bytes move while the programs wait on the chain (the
# flash 8L trace, docs/PERF.md v18: 28% of program time is waiting) instead of after the wait.
# WPFL 1 marks the prefetched lines evict_last, so streams that pass between the prefetch and the
# task's own loads do not push them out. GPU only (inline PTX; the interpreter refuses WPF > 0).
# WPF's step: KB per bulk prefetch instruction; WPF is a multiple of it
WPF_CHUNK_KB = 32
# MMAV2 1: the kernel is built with Triton's MMA v3 (wgmma) off (the DISABLE_MMA_V3 build switch,
# set around the build by codegen/harness.py mma_v2_build), so every tl.dot is an mma.sync
# (HMMA.16816) instead. Only the expert kinds use wgmma (the weights as the dot's left operand,
# rows = M; the other kinds' dots already are mma.sync: their sm_90 loops are the same
# instruction for instruction either way). An HGMMA with a register operand needs a
# WARPGROUP.ARRIVE before and a WARPGROUP.DEPBAR after it: 16 of each per up_gate K step, each a
# meeting point of the warpgroup's 4 warps, and under NOINLINE 1 every DEPBAR waits for 0 in
# flight (C7510, INLINE above). ncu on up_gate alone (v19): ~23% of the warp samples on those
# DEPBARs, 29% on the block barrier. An HMMA is a plain register instruction: no warpgroup
# meeting, the scoreboard waits only for its accumulator. sm_90 build (bench/sass_loops.py): the
# up_gate K step 459 -> 418 instructions (32 HMMA + 8 LDSM instead of 16 HGMMA + 16 ARRIVE + 16
# DEPBAR), down 288 -> 256; the whole kernel's registers and spills unchanged (255, 64 / 108 bytes).
# The constexpr is in the kernel's signature only so that the two builds are two JIT cache entries.
FRAME_CONSTEXPRS = ("NOINLINE", "INLINE", "WPF", "WPFL", "MMAV2")
# TRACE's stamps per row of the trace buffer (%globaltimer ns): a task's (start, wait done, work
# done: after the task's barrier, before its release, signalled), then a program's (entry, 0, 0,
# exit). Work done -> signalled is the release: the fences and atomic adds that publish the task.
TRACE_WORDS = 4


def tile_scales(scales: torch.Tensor) -> torch.Tensor:
    """STILE's layout of MXFP4 scales: uint8 [..., N, K/32] (row-major, the models' layout) ->
    the same shape and bytes with each matrix stored as [K/128, N, 4]: the 4 groups of row n that
    cover K elements 128w .. 128w + 127 are the 32-bit word w * N + n of the matrix. K/32 must be
    a multiple of 4."""
    *lead, n, g = scales.shape
    if g % 4:
        raise ValueError(f"MXFP4 scales of shape {tuple(scales.shape)}: K/32 = {g} is not a multiple of 4 "
                         "(STILE needs whole 32-bit words per row)")
    return scales.reshape(*lead, n, g // 4, 4).transpose(-3, -2).contiguous().reshape(scales.shape)


def tile_blocks(blocks: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """XTILE's layout of MXFP4 codes: uint8 [..., N, K/32, 16] (row-major, K/2 bytes per row: the
    models' layout, or MX_DOT 9's repacked words) -> the same shape and bytes with each matrix
    stored as [N / block_n, K / block_k, block_n, block_k / 2]: tile (i, j), rows block_n i ..
    and K elements block_k j .., is one contiguous run. N and K must be multiples of the tiles."""
    *lead, n, g, b = blocks.shape
    k = 32 * g
    if b != 16 or n % block_n or k % block_k or block_k % 32:
        raise ValueError(f"MXFP4 codes of shape {tuple(blocks.shape)}: rows {n} and K {k} must be multiples "
                         f"of the tile {block_n} x {block_k} (XTILE stores whole tiles)")
    tiled = blocks.reshape(*lead, n // block_n, block_n, k // block_k, block_k // 2).transpose(-3, -2)
    return tiled.contiguous().reshape(blocks.shape)


def norm_arena(consts: dict) -> str:
    """The arena that holds the RMSNorm gains for kernels built with `consts` (NORM_F32)."""
    return "f32" if consts.get("NORM_F32", TUNING_DEFAULTS["NORM_F32"]) else "w"

# What a GPU build adds (the interpreter keeps the smaller tiles: it pays per element): on an
# H100 (docs/PERF.md, version 2 sweep) 8 warps and 256-wide K steps put 32 KB of weights in
# flight per K step; the 2-layer flash DFlash step went 11.8 ms (4 warps, BLOCK_K 64) ->
# 10.5 (8 warps) -> 9.9 (BLOCK_K 128) -> 7.9 ms (BLOCK_K 256).
# BLOCK_KX is the expert loops' K step (MXFP4: BLOCK_KX / 2 bytes per row), separate from the
# bf16 kinds' BLOCK_K so each can be tuned alone.
# BLOCK_RN x BLOCK_KR: the split router's fp32 weight tile (v2: 64 x 16, 256 dependent K steps
# per task over 32 experts; its tasks took 453 us each, on every MoE layer's critical path;
# v3: 16 x 64 with a separate RMSNorm pass, 16 + 64 steps, 211 us per task). v4: one pass over
# x (the norm's sum of squares rides along the dot) in 256-wide steps: 16 dependent steps.
# v12 (session 13, H100): ROUTE_DOT 2 with 4 x 128 tiles (the FMA dot's 16 x 256 was bound by
# shared-memory bank conflicts, 60 us per task on small block 1; now 12 us): small block 1
# 1.875 -> 1.574 ms, flash 8L block 8 12.27 -> 11.64 ms, block 1 4.48 -> 3.76 ms (one call).
# MX_DOT 9 on a GPU (version 10, session 12, H200, same call: flash 8L block 8 11.60 ms against
# 12.86 at 3, block 1 4.44 against 4.50; expert_down 295 -> 251 us in the phases; the engine falls
# back to 3 for a checkpoint whose scales are outside 34..160). Before it, MX_DOT was 3 on a GPU
# too (TUNING_DEFAULTS; session 6, flash 2L block 8, `tilecomp bench
# --phases`, H100): expert_up_gate / expert_down phases 0.77 / 0.71 ms with 3, 1.10 / 1.00 ms
# with 0, 1.91 / 1.69 ms with 1, 2.75 / 2.15 ms with 2. All are bound by instructions and
# shared memory, far from the bytes (docs/PERF.md "Version 5").
# BLOCK_TA: attention rows per tile (query heads x block tokens): 32 packs 4 heads of a block
# of 8 (BLOCK_T's 16 packed 2: each K/V tile was read once per 2 heads); 64 spills ~2 KB in
# attn_partial alone (sm_90 build check), 32 does not.
# BLOCK_KX 128 (session 7, H200, flash 8L block 8, `--tile BLOCK_KX=...` in one call): 17.43 ms
# against 18.72 at 256 (the expert loops' raw + dequantized tiles spill at 256: ncu counted
# 2.8M local-memory requests in expert_down alone). L2PF 0: any depth made the step slower
# (flash 2L block 8: 5.71 ms off, 8.22 at 1, 8.19 at 4); docs/PERF.md version 6.
# BLOCK_NX 128 (session 8, H200, flash 2L block 8 --phases): expert_up_gate 586 -> 530 us,
# expert_down 423 -> 360 us against 64. MX_DOT 6's first form (8 dots of 16 columns per K step)
# measured slower than 3 despite ~27% fewer instructions (up_gate 677 us at NX 128): each small
# dot staged its operands through shared memory behind a barrier (32 bar.sync per K step); its
# join form (2 dots, 8 bar.sync, 1123 against 1413 instructions, no spills) is not yet measured.
# MX_DOT 5 (the weights as wgmma's left operand) 1287 us.
# XPIPE 1 (v13, session 14, H100, one call, 30 steps each): flash 8L block 8 11.36 -> 10.73 ms
# (STAGES_X 4: 10.68, within the spread), block 1 3.51 -> 3.40, small block 8 2.30 -> 2.27; small
# block 1 1.534 -> 1.559 (+1.6%). up_gate alone did not move (349 -> 343 us): the kinds are bound
# by instructions alone, and the pipeline helped inside the megakernel (up_gate 449 -> 386 us).
# WLEFT (MX_DOT 9): 1 puts the dequantized weights on the dots' left operand (rows = M = 128, the
# block tokens N = 16): Triton then issues wgmma with the tokens' tile in shared memory, and the
# sm_90 K loops lose the x tile's conversions and the weight tile's ldmatrix round trip
# (up_gate 496 -> 411 instructions per K step, expert_down 306 -> 243; whole kernel spills
# 508 / 1,024 -> 400 / 776 bytes). Measured (v14, session 14, H100, one call, each pair run
# back to back): flash 8L block 8 10.84 -> 10.64 ms, block 1 3.70 -> 3.49, small block 8 2.42 ->
# 2.29, small block 1 1.59 -> 1.57; tokens-tiny 0 unexplained divergences.
# STILE 1 (v15, session 15, H100, one call): flash 8L block 8 11.14 -> 10.73 ms, block 1 3.67 ->
# 3.47, small block 1 1.63 -> 1.58, small block 8 2.31 -> 2.35 (+1.8%); up_gate alone 353 -> 325 us.
# AFRAG 1 (v16, session 17, H100, one call, 30 steps each): flash 8L block 8 10.58 -> 9.11 ms
# AFRAG with the v17 operand buffers (passes/pipeline.py GPU_LOWER expert_operands) was slower
# inlined (9.36 ms: the whole kernel spills 828 / 1,504 bytes) and faster with NOINLINE 1 (second
# call, same machine: AFRAG 8.95, + NOINLINE 9.03, + UPLOOP 9.24, + operands + NOINLINE 8.86 ms;
# full bench 8.65 ms), so NOINLINE is 1 on a GPU, where the operand buffers are on.
# MMAV2 1 (v24, session 20, H100, interleaved A/B of 60 pairs on one engine, Triton 3.6 with the
# kWidth fix in _mxfp4.j2): flash 8L block 8 8.685 -> 8.579 ms, -0.105 ms, 95% interval [-0.117,
# -0.098]; expert phases alone 215 / 144 us (up_gate / down; 229 / 148 with wgmma in v19); full
# benches 8.57 / 3.02 / 2.09 / 1.39 ms; tokens-tiny 0 unexplained divergences. Measured and left
# off in the same call: XFLAT 1 (+0.44 ms), STAGES_C 8 + BLOCK_NC 128 (+0.006, noise), BLOCK_KR 256
# (+0.03), BLOCK_D 1024 (+0.02).
# COMB_GATHER 1, BLOCK_NC 128, QKV_LOOP 1 (v27 / v28, session 21, H100, interleaved A/Bs of 60 pairs,
# flash 8L block 8): COMB_GATHER -0.150 ms [-0.170, -0.130], with BLOCK_NC 128 -0.166 [-0.185,
# -0.139]; QKV_LOOP -0.259 [-0.267, -0.253]. The three together (full benches, same machine):
# flash 8L block 8 8.355 -> 7.976 ms, block 1 3.011 -> 2.909; tokens-tiny 0 unexplained. Measured
# and left off in the same call: BLOCK_N 128 + BLOCK_K 128 (+0.164), STAGES_X 4 (-0.015, [-0.031,
# -0.010]: below 0.2%).
# UPLOOP 1 and BLOCK_NH 128 (v37, session 25, H100, interleaved A/Bs of 60 pairs on one engine;
# session 17's separate 30-step runs had UPLOOP +0.3 ms, inside their spread): flash 8L block 8
# UPLOOP -0.190 ms [-0.204, -0.170], BLOCK_NH 128 (the LM head's row tile, 64 before: 256 KB per
# K-looped tile pass instead of two) -0.049 [-0.074, -0.028]; the two together -0.138 [-0.150,
# -0.127] at block 8, -0.089 [-0.097, -0.084] at block 1, small block 1 -0.056 [-0.060, -0.052];
# full benches 7.239 / 2.736 ms (flash 8L block 8 / 1), 1.754 / 1.290 ms (small); tokens-tiny and
# the shipped model's tokens 0 unexplained. Measured and left off in the same session: BLOCK_TA 128
# (+1.850), BLOCK_RN 2 (-0.011, noise), BLOCK_KR 256 (+0.035), --lower vocab_quantum=16 (+0.293),
# XTILE (-0.021 [-0.030, -0.010] on 4 layers: the memory-pattern reading is not what holds the
# experts), XEVEN at block 1 (+0.007 [+0.002, +0.017]; exact on the GPU: the small preset's tokens
# check gives the same deviations to the last bit with and without it, and with XTILE).
GPU_TUNING = {"BLOCK_K": 256, "BLOCK_KX": 128, "BLOCK_NX": 128, "BLOCK_RN": 4, "BLOCK_KR": 128, "L2PF": 0, "BLOCK_TA": 32,
              "BLOCK_TR": 32,
              "MX_DOT": 9,
              "PTX_ASM": 1, "ROUTE_DOT": 2, "XPIPE": 1, "WLEFT": 1, "STILE": 1, "AFRAG": 1,
              "NOINLINE": 1, "MMAV2": 1, "COMB_GATHER": 1, "BLOCK_NC": 128, "QKV_LOOP": 1,
              "UPLOOP": 1, "BLOCK_NH": 128}
# 16 warps (128 registers per thread, 164 / 376 bytes of spills) measured +23% on flash 8L block 8
# (session 24, H100: 9.133 against 7.420 ms, 30-step runs on one machine)
GPU_NUM_WARPS = 8

KIND_IDS = {name: k.id for name, k in KINDS.items()}


def inline_mask(*names: str) -> int:
    """INLINE's value that keeps the named kinds inlined under NOINLINE 1."""
    mask = 0
    for name in names:
        mask |= 1 << kind_abi(name).id
    return mask


# The step state: int32 words in arena_i32 (at the engine's `state` slot). The host
# writes them once per request; the accept task updates them at the end of each step.
STATE_FIELDS = (
    "pos",         # absolute position of block token 0 (the last committed token)
    "last",        # the last committed token
    "temp_bits",   # sampling temperature as fp32 bits (0 = greedy)
    "seed",        # sampling seed (uint32 bits)
    "n_ctx",       # draft: new context rows (taps of the tokens committed last step)
    "ctx_pos",     # draft: absolute position of the first new context row
    "acc",         # accepted draft tokens this step
    "n_out",       # tokens committed this step (out_tokens[:n_out])
    "top_p_bits",  # nucleus mass as fp32 bits (1.0 = no filtering)
)
STATE = {name: i for i, name in enumerate(STATE_FIELDS)}
STATE_WORDS = 16


def kind_abi(name: str) -> KindABI:
    if name not in KINDS:
        raise ScheduleError(f"task kind {name!r}: no codegen body; known kinds: {sorted(KINDS)}")
    return KINDS[name]


@dataclass
class TaskRecord:
    """One task as the kernel sees it (the runtime builds these from the tile IR)."""
    kind: str
    task: int
    args: dict[str, int] = field(default_factory=dict)
    waits: list[tuple[int, int, int]] = field(default_factory=list)  # (counter, target, per_step)
    signals: list[int | tuple[int, int]] = field(default_factory=list)  # counter or (counter, add)
    prefetch: list[tuple[int, int, int]] = field(default_factory=list)  # (arena, offset, bytes)


def encode_record(rec: TaskRecord) -> list[int]:
    """One record -> RECORD_WORDS ints. Unknown arg names and overflows raise ScheduleError."""
    abi = kind_abi(rec.kind)
    words = [0] * RECORD_WORDS
    words[F_KIND] = abi.id
    words[F_TASK] = rec.task
    words[F_NWAIT] = len(rec.waits)
    words[F_NSIGNAL] = len(rec.signals)
    for name, value in rec.args.items():
        if name not in abi.args:
            raise ScheduleError(f"task {rec.task} ({rec.kind}): unknown record arg {name!r}; "
                                f"expected one of {abi.args}")
        words[abi.arg_word(name)] = int(value)
    if len(rec.waits) > MAX_WAITS or len(rec.signals) > MAX_SIGNALS:
        raise ScheduleError(f"task {rec.task} ({rec.kind}): {len(rec.waits)} waits / "
                            f"{len(rec.signals)} signals; the record holds at most "
                            f"{MAX_WAITS} / {MAX_SIGNALS}")
    for i in range(MAX_WAITS):
        base = F_WAIT0 + i * WAIT_WORDS
        counter, target, per_step = rec.waits[i] if i < len(rec.waits) else (-1, 0, 0)
        if counter >= 0 and not 0 < target <= per_step:
            raise ScheduleError(f"task {rec.task} ({rec.kind}): wait on counter {counter} has "
                                f"target {target}, expected 1..{per_step} (signals per step)")
        words[base:base + WAIT_WORDS] = [counter, target, per_step]
    for i in range(MAX_SIGNALS):
        signal = rec.signals[i] if i < len(rec.signals) else (-1, 0)
        counter, add = (signal, 1) if isinstance(signal, int) else signal
        words[F_SIGNAL0 + i * SIGNAL_WORDS:F_SIGNAL0 + (i + 1) * SIGNAL_WORDS] = [counter, add]
    for i, (arena, offset, nbytes) in enumerate(rec.prefetch[:MAX_PF]):
        if not 0 <= arena < len(PF_ARENAS) or offset < 0 or nbytes % 16:
            raise ScheduleError(f"task {rec.task} ({rec.kind}): prefetch range {(arena, offset, nbytes)} "
                                f"needs an arena index below {len(PF_ARENAS)}, an offset >= 0 and "
                                f"whole 16-byte units")
        words[F_PF0 + i * PF_WORDS:F_PF0 + (i + 1) * PF_WORDS] = [arena, offset, nbytes]
    return words


# record args the WALIGN hint covers (element offsets / lengths of weight rows)
ALIGNED_ARGS = {"linear": ("w", "w_up", "k_dim", "k0", "k1"), "lm_head": ("w", "dim"),
                "embed": ("table", "mask_row", "dim", "d0", "d1"),
                "qkv_rope_kv": ("wq", "wk", "wv", "dim"), "moe_route": ("gate",)}


# record args whose alignment the attention templates have always assumed (flash-decoding
# partial accumulators and the merged output are rows of head_dim-padded fp32 slots)
FIXED_ALIGNED_ARGS = {"attn_partial": {"part_acc": 8, "out": 8}, "attn_reduce": {"part_acc": 8, "out": 8}}


def arg_hint(kind: str, arg: str):
    """What the frame states of a record arg when it loads it (tl.multiple_of): "AALIGN",
    "WALIGN", a fixed number, or None. The frame is the one place: a kind's compute function
    sees its args as function arguments, where a tl.multiple_of has no effect, and Triton passes
    it what it knows of the call's operands."""
    if arg in ACT_ALIGNED_ARGS.get(kind, ()):
        return "AALIGN"
    if arg in ALIGNED_ARGS.get(kind, ()):
        return "WALIGN"
    return FIXED_ALIGNED_ARGS.get(kind, {}).get(arg)


# record args the AALIGN hint covers (element offsets / row lengths of fp32 activations): the
# frame loads them as tl.multiple_of(arg, AALIGN)
ACT_ALIGNED_ARGS = {"linear": ("x", "x_stride", "res", "res_stride", "y", "y_stride"), "embed": ("out",),
                    "moe_combine": ("part", "res", "y", "dim", "n0", "n1"),
                    "linear_reduce": ("part", "split_stride", "n_dim", "n0", "n1", "res", "y", "y_stride"),
                    "lm_head": ("x", "x_stride"), "qkv_rope_kv": ("x", "x_stride"),
                    "moe_route": ("x", "dim"), "expert_up_gate": ("x", "dim", "act", "inter"),
                    "expert_down": ("act", "inter", "out", "dim")}


def _hinted_values(queues, table: dict):
    """(record, arg, value) of every arg `table` names for the record's kind that is present
    (absent args are None or < 0)."""
    for queue in queues:
        for rec in queue:
            for arg in table.get(rec.kind, ()):
                value = rec.args.get(arg, -1)
                if value is not None and value >= 0:
                    yield rec, arg, value


def act_alignment(queues, cap: int) -> int:
    """The largest power of 2 <= cap that divides every ACT_ALIGNED_ARGS arg of the records
    (absent args, < 0, are skipped): the AALIGN a kernel running these queues may be built with."""
    align = max(1, cap)
    for _, _, value in _hinted_values(queues, ACT_ALIGNED_ARGS):
        while value % align:
            align //= 2
    return align


def fit_act_alignment(consts: dict, queues) -> dict:
    """The launch constexprs for these queues: AALIGN (when the kernel has it) lowered to what
    their records allow."""
    if "AALIGN" not in consts:
        return consts
    return dict(consts, AALIGN=act_alignment(queues, consts["AALIGN"]))


def check_alignment(queues, walign: int, task_names: dict | None = None):
    """Every hinted weight offset / row length is a multiple of WALIGN (or < 0: absent); a
    kernel built with the hint would otherwise issue misaligned vector loads."""
    if walign <= 1:
        return
    for rec, arg, value in _hinted_values(queues, ALIGNED_ARGS):
        if value % walign:
            name = (task_names or {}).get(rec.task, f"task {rec.task}")
            raise ScheduleError(f"{rec.kind} {name}: arg {arg}={value} is not a multiple of "
                                f"WALIGN={walign} elements (weight rows must be 16-byte aligned)")


def pack_records(queues: list[list[TaskRecord]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program queues -> (records int64 [n, RECORD_WORDS], queue offsets int32 [P + 1])."""
    rows, offsets = [], [0]
    for queue in queues:
        rows.extend(encode_record(r) for r in queue)
        offsets.append(len(rows))
    records = torch.tensor(rows, dtype=RECORD_DTYPE).reshape(len(rows), RECORD_WORDS)
    return records.to(device), torch.tensor(offsets, dtype=torch.int32, device=device)


def float_bits(x: float) -> int:
    """An fp32 value as the int32 bit pattern stored in `*_bits` args."""
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())
