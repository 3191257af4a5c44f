"""Trace the `models/` modules into graph IR: one DFlash decode step, one plain decode step,
one prefill chunk.

The tracer walks the module tree (built on the meta device from the config:
no weights needed) and maps each module type to graph ops, so the graph reads
like the model: one `attention` op per attention, one `expert_linear` per
MXFP4 expert projection, one `sample` per sampling. Parameters are named by
their checkpoint tensor names; draft tensors (stored in `dflash/model.safetensors`)
get the prefix `dflash.`.

Runtime scalars are graph inputs: %pos (the context length: positions already
in the target's KV cache, which is also the position of block[0]), %n_new (the
accepted count of the previous step + 1: context rows not yet in the draft's
cache), %seed, %temperature and %top_p.

Decode step (greedy or sampled), S = block size, p = %pos:
  draft:   context rows %taps (target taps of the %n_new tokens committed last
           step, at positions p - n_new ..) -> fc -> hidden_norm -> per-layer K/V
           written to the draft cache; block %block = [last token, MASK x (S-1)]
           at positions p..p+S-1 -> draft layers -> lm_head -> sample (row j at p + j)
  verify:  block [block[0], draft[1:]] through the target at p.. (KV written),
           taps of the target_layer_ids -> lm_head -> sample (row j at p + j + 1)
  accept:  acc, committed tokens, next block; kv_commit -> new length, count
Plain step (no draft): block %block = [last] at p through the target -> lm_head
  -> sample (row 0 at p + 1) -> the same accept with S = 1 (acc = 0: commits
  posterior[0]) and kv_commit (new length p + 1).
Prefill chunk: T tokens at %pos through the target, draft context K/V for
them, and the sampled next token for every row (row t at pos + t + 1).
A target without a draft has only the plain step and the prefill chunk (no
draft context); its block size (SWA ring slack, chunk rows) is TraceOptions.block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tilecomp.errors import TilecompError
from tilecomp.ir.graph import DType, Graph, OpKind, TensorType
from tilecomp.ir.graph_build import GraphBuilder
from tilecomp.models import dflash as dfl
from tilecomp.models import mimo
from tilecomp.models.cache import ring_slots
from tilecomp.models.config import DFlashConfig, MiMoConfig

DRAFT_PREFIX = "dflash."
_DTYPES = {torch.bfloat16: DType.BF16, torch.float16: DType.F16, torch.float32: DType.F32,
           torch.int32: DType.I32, torch.int64: DType.I64, torch.uint8: DType.U8}
TORCH_DTYPES = {v.value: k for k, v in _DTYPES.items()}
I32 = TensorType(DType.I32, ())
F32 = TensorType(DType.F32, ())


@dataclass(frozen=True)
class TraceOptions:
    """dtype: weights / activations / KV dtype; max_len: cache positions; prefill_chunk: T;
    block: the block size of a target traced without a draft (with one: the draft's)."""

    dtype: str = "bf16"
    max_len: int = 4096
    prefill_chunk: int | None = None      # default: the block size
    block: int | None = None


COMPUTE_DTYPES = ("bf16", "f16", "f32")


def build_modules(cfg: MiMoConfig, dcfg: DFlashConfig | None, dtype: str = "bf16"):
    """Target and draft (None without a config) on the meta device (shapes only, no weights)."""
    if dtype not in COMPUTE_DTYPES:
        raise TilecompError(f"dtype: expected one of {', '.join(COMPUTE_DTYPES)}, found {dtype!r}")
    torch_dtype = TORCH_DTYPES[dtype]
    with torch.device("meta"):
        target = mimo.MiMoForCausalLM(cfg, dtype=torch_dtype, experts="mxfp4")
        draft = None if dcfg is None else dfl.DFlashDraft(dcfg, cfg).to(torch_dtype)
    return target, draft


class Tracer:
    """Emits graph ops for one module at a time into a GraphBuilder."""

    def __init__(self, b: GraphBuilder, target: nn.Module, draft: nn.Module | None):
        self.b = b
        self.target, self.draft = target, draft
        self.names: dict[int, str] = {}
        for prefix, module in (("", target), (DRAFT_PREFIX, draft)):
            if module is None:
                continue
            for name, t in module.state_dict(keep_vars=True).items():
                self.names.setdefault(id(t), prefix + name)

    def param(self, tensor: torch.Tensor) -> str:
        return self.b.param(self.names[id(tensor)], TensorType(_DTYPES[tensor.dtype], tuple(tensor.shape)))

    def mxfp4_param(self, experts: mimo.MXFP4Experts, proj: str) -> str:
        """`@...{proj}` of logical shape [E, N, K], stored as `_blocks` / `_scales`."""
        blocks = getattr(experts, f"{proj}_blocks")
        name = self.names[id(blocks)][: -len("_blocks")]
        e, n, kb, _ = blocks.shape
        return self.b.param(name, TensorType(DType.MXFP4, (e, n, kb * 32)))

    def op(self, kind, args, hint, kwargs=None, **attrs):
        return self.b.op(kind, args, hint, kwargs, **attrs)

    # ------------------------------------------------------ leaf modules
    def rmsnorm(self, mod, x, hint):
        return self.op(OpKind.RMSNORM, [x, self.param(mod.weight)], hint, eps=mod.eps)

    def linear(self, mod: nn.Linear, x, hint):
        return self.op(OpKind.LINEAR, [x, self.param(mod.weight)], hint)

    def rope(self, x, pos, heads, head_dim, rope_dim, theta, hint):
        if rope_dim == 0:
            return x
        return self.op(OpKind.ROPE, [x, pos], hint, n_heads=heads, head_dim=head_dim,
                       rope_dim=rope_dim, theta=float(theta))

    def swiglu(self, mlp, x, hint):
        """Dense SwiGLU MLP (MiMo `MLP` or `DFlashMLP`): gate, up, silu, mul, down."""
        g = self.linear(mlp.gate_proj, x, f"{hint}.gate")
        u = self.linear(mlp.up_proj, x, f"{hint}.up")
        a = self.op(OpKind.SILU, [g], f"{hint}.act")
        return self.linear(mlp.down_proj, self.op(OpKind.MUL, [a, u], f"{hint}.gated"), f"{hint}.out")

    def moe(self, moe: mimo.MoE, x, hint):
        """Router (fp32 matmul, sigmoid, biased top-k, normalise) then MXFP4 SwiGLU experts."""
        router, experts = moe.gate, moe.experts
        if not isinstance(experts, mimo.MXFP4Experts):
            raise TilecompError(f"{hint}: the compiler needs MXFP4 experts, found {type(experts).__name__}")
        xf = self.op(OpKind.CAST, [x], f"{hint}.x_f32", dtype="f32")
        logits = self.op(OpKind.LINEAR, [xf, self.param(router.weight)], f"{hint}.router")
        scores = self.op(OpKind.SIGMOID, [logits], f"{hint}.scores")
        ids, w = self.op(OpKind.ROUTE_TOPK, [scores, self.param(router.e_score_correction_bias)],
                         (f"{hint}.ids", f"{hint}.topw"), k=router.top_k)
        w = self.op(OpKind.ROUTE_NORMALIZE, [w], f"{hint}.weights", renorm=bool(router.norm_topk_prob),
                    scale=float(router.routed_scaling_factor))
        g = self.op(OpKind.EXPERT_LINEAR, [x, self.mxfp4_param(experts, "gate_proj"), ids], f"{hint}.gate")
        u = self.op(OpKind.EXPERT_LINEAR, [x, self.mxfp4_param(experts, "up_proj"), ids], f"{hint}.up")
        a = self.op(OpKind.SILU, [g], f"{hint}.act")
        m = self.op(OpKind.MUL, [a, u], f"{hint}.gated")
        d = self.op(OpKind.EXPERT_LINEAR, [m, self.mxfp4_param(experts, "down_proj"), ids], f"{hint}.down")
        return self.op(OpKind.MOE_COMBINE, [d, w], f"{hint}.out")

    def mlp(self, mod, x, hint):
        if isinstance(mod, mimo.MoE):
            return self.moe(mod, x, hint)
        return self.swiglu(mod, x, hint)

    # ------------------------------------------------------ target
    def target_attention(self, attn: mimo.Attention, x, pos, caches, hint):
        s = attn.spec
        q = self.linear(attn.q_proj, x, f"{hint}.q")
        k = self.linear(attn.k_proj, x, f"{hint}.k")
        v = self.linear(attn.v_proj, x, f"{hint}.v")
        q = self.rope(q, pos, s.n_heads, s.head_dim, s.rope_dim, s.rope_theta, f"{hint}.q_rot")
        k = self.rope(k, pos, s.n_kv_heads, s.head_dim, s.rope_dim, s.rope_theta, f"{hint}.k_rot")
        i = attn.layer_idx
        kc, vc = caches[i]
        kc = self.op(OpKind.KV_WRITE, [kc, k, pos], f"cache.k.{i}")
        vc = self.op(OpKind.KV_WRITE, [vc, v, pos], f"cache.v.{i}", value_scale=float(attn.value_scale))
        caches[i] = (kc, vc)
        sink = None if attn.attention_sink_bias is None else self.param(attn.attention_sink_bias)
        o = self.op(OpKind.ATTENTION, [q, kc, vc, pos], f"{hint}.attn", {"sink": sink},
                    n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
                    v_head_dim=s.v_head_dim, window=s.window or 0, causal=True,
                    scale=float(s.head_dim ** -0.5))
        return self.linear(attn.o_proj, o, f"{hint}.o")

    def target_forward(self, ids, pos, caches, taps_at):
        """Embedding, blocks, final norm. Returns (normed hidden, list of tap values)."""
        model = self.target.model
        x = self.op(OpKind.EMBED, [ids, self.param(model.embed_tokens.weight)], "embed")
        outputs = {}
        for i, block in enumerate(model.layers):
            hint = f"L{i}"
            h = self.rmsnorm(block.input_layernorm, x, f"{hint}.attn_in")
            x = self.op(OpKind.ADD, [x, self.target_attention(block.self_attn, h, pos, caches, hint)], f"{hint}.x")
            h = self.rmsnorm(block.post_attention_layernorm, x, f"{hint}.mlp_in")
            x = self.op(OpKind.ADD, [x, self.mlp(block.mlp, h, f"{hint}.mlp")], f"{hint}.out")
            outputs[i] = x
        return self.rmsnorm(model.norm, x, "final_norm"), [outputs[i] for i in taps_at]

    def logits(self, x, hint):
        return self.op(OpKind.LM_HEAD, [x, self.param(self.target.lm_head.weight)], hint)

    # ------------------------------------------------------ draft
    def draft_context(self, taps, ctx_pos, caches, count=None):
        """fc + hidden_norm over target taps, then each draft layer's context K/V into its cache."""
        d = self.draft
        ctx = self.rmsnorm(d.hidden_norm, self.linear(d.fc, taps, "draft.fc"), "draft.ctx")
        for j, layer in enumerate(d.layers):
            a = layer.self_attn
            k = self.linear(a.k_proj, ctx, f"D{j}.ctx_k")
            k = self.rope(k, ctx_pos, a.n_kv_heads, a.head_dim, a.head_dim, d.config.rope_theta, f"D{j}.ctx_k_rot")
            v = self.linear(a.v_proj, ctx, f"D{j}.ctx_v")
            kc, vc = caches[j]
            kwargs = {"count": count}
            caches[j] = (self.op(OpKind.KV_WRITE, [kc, k, ctx_pos], f"draft_cache.k.{j}", kwargs),
                         self.op(OpKind.KV_WRITE, [vc, v, ctx_pos], f"draft_cache.v.{j}", kwargs))

    def draft_attention(self, a: dfl.DFlashAttention, x, pos, caches, j):
        hint, theta = f"D{j}", self.draft.config.rope_theta
        q = self.rope(self.linear(a.q_proj, x, f"{hint}.q"), pos, a.n_heads, a.head_dim, a.head_dim,
                      theta, f"{hint}.q_rot")
        k = self.rope(self.linear(a.k_proj, x, f"{hint}.k"), pos, a.n_kv_heads, a.head_dim, a.head_dim, theta,
                      f"{hint}.k_rot")
        v = self.linear(a.v_proj, x, f"{hint}.v")
        kc, vc = caches[j]
        kc = self.op(OpKind.KV_WRITE, [kc, k, pos], f"draft_cache.k.{j}")
        vc = self.op(OpKind.KV_WRITE, [vc, v, pos], f"draft_cache.v.{j}")
        caches[j] = (kc, vc)
        o = self.op(OpKind.ATTENTION, [q, kc, vc, pos], f"{hint}.attn", n_heads=a.n_heads,
                    n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, v_head_dim=a.head_dim,
                    window=a.window, causal=False, scale=float(a.head_dim ** -0.5))
        return self.linear(a.o_proj, o, f"{hint}.o")

    def draft_block(self, block, pos, caches):
        """The draft's forward over the block (context already in the caches) -> logits."""
        d = self.draft
        table = self.param(self.target.model.embed_tokens.weight)
        x = self.op(OpKind.EMBED, [block, table], "draft.embed", {"mask": self.param(d.mask_embedding)},
                    mask_token_id=d.config.mask_token_id)
        for j, layer in enumerate(d.layers):
            h = self.rmsnorm(layer.input_layernorm, x, f"D{j}.attn_in")
            x = self.op(OpKind.ADD, [x, self.draft_attention(layer.self_attn, h, pos, caches, j)], f"D{j}.x")
            h = self.rmsnorm(layer.post_attention_layernorm, x, f"D{j}.mlp_in")
            x = self.op(OpKind.ADD, [x, self.swiglu(layer.mlp, h, f"D{j}.mlp")], f"D{j}.out")
        return self.logits(self.rmsnorm(d.norm, x, "draft.final_norm"), "draft.logits")


# ---------------------------------------------------------------- steps

def _declare_caches(b: GraphBuilder, target, draft, options: TraceOptions, block: int):
    """Target caches (SWA layers: rings of window + block slots), then the draft's (None: none)."""
    if options.max_len < 2 * block:
        raise TilecompError(f"max_len: expected at least two blocks ({2 * block} positions), found {options.max_len}")
    dt = DType(options.dtype)
    target_caches, draft_caches = [], []
    cfg = target.config
    for i in range(cfg.num_hidden_layers):
        s = cfg.attn(i)
        slots = ring_slots(s.window, options.max_len, block)
        target_caches.append((b.input(f"cache.k.{i}", TensorType(dt, (s.n_kv_heads, slots, s.head_dim))),
                              b.input(f"cache.v.{i}", TensorType(dt, (s.n_kv_heads, slots, s.v_head_dim)))))
    dc = draft.config if draft is not None else None
    for j in range(dc.num_hidden_layers if dc is not None else 0):
        shape = (dc.num_key_value_heads, options.max_len, dc.head_dim)
        draft_caches.append((b.input(f"draft_cache.k.{j}", TensorType(dt, shape)),
                             b.input(f"draft_cache.v.{j}", TensorType(dt, shape))))
    return target_caches, draft_caches


def block_size(draft, options: TraceOptions) -> int:
    """The step's block size: the draft's, or `options.block` for a target without a draft."""
    if draft is None:
        if options.block is None or options.block < 1:
            raise TilecompError(f"block: a target without a draft needs a positive block size "
                                f"(TraceOptions.block), found {options.block}")
        return options.block
    if options.block not in (None, draft.config.block_size):
        raise TilecompError(f"block: the draft's block size is {draft.config.block_size}, "
                            f"found {options.block}")
    return draft.config.block_size


def _flat(caches):
    return [name for pair in caches for name in pair]


def _sampling_inputs(b: GraphBuilder):
    return b.input("seed", I32), b.input("temperature", F32), b.input("top_p", F32)


def trace_decode_step(target, draft, options: TraceOptions = TraceOptions()) -> Graph:
    """One whole DFlash decode step: draft, verify, sample, accept, KV commit, next inputs."""
    dc = draft.config
    s, width = dc.block_size, len(dc.target_layer_ids) * dc.hidden_size
    b = GraphBuilder("decode_step")
    block = b.input("block", TensorType(DType.I32, (s,)))
    pos = b.input("pos", I32)
    n_new = b.input("n_new", I32)
    taps = b.input("taps", TensorType(DType(options.dtype), (s, width)))
    seed, temperature, top_p = _sampling_inputs(b)
    target_caches, draft_caches = _declare_caches(b, target, draft, options, s)
    tr = Tracer(b, target, draft)

    ctx_pos = tr.op(OpKind.SUB, [pos, n_new], "ctx_pos")
    tr.draft_context(taps, ctx_pos, draft_caches, count=n_new)
    draft_logits = tr.draft_block(block, pos, draft_caches)
    drafted = tr.op(OpKind.SAMPLE, [draft_logits, pos, seed, temperature, top_p], "drafted", offset=0)
    head = tr.op(OpKind.SLICE, [block], "block.head", axis=0, start=0, stop=1)
    guesses = tr.op(OpKind.SLICE, [drafted], "drafted.tail", axis=0, start=1, stop=s)
    verify = tr.op(OpKind.CONCAT, [head, guesses], "verify_block", axis=0)

    hidden, tap_values = tr.target_forward(verify, pos, target_caches, dc.target_layer_ids)
    next_taps = tr.op(OpKind.CONCAT, tap_values, "next_taps", axis=1)
    logits = tr.logits(hidden, "logits")
    posterior = tr.op(OpKind.SAMPLE, [logits, pos, seed, temperature, top_p], "posterior", offset=1)
    acc, tokens, next_block = tr.op(OpKind.ACCEPT, [verify, posterior], ("acc", "tokens", "next_block"),
                                    mask_token_id=dc.mask_token_id)
    new_pos, count = tr.op(OpKind.KV_COMMIT, [pos, acc], ("next_pos", "next_n_new"))
    return b.ret(tokens, acc, next_block, new_pos, count, next_taps,
                 *_flat(target_caches), *_flat(draft_caches))


def trace_plain_step(target, draft, options: TraceOptions = TraceOptions()) -> Graph:
    """One plain (no draft) decode step: the last token through the target, sample, commit.
    The target's caches are laid out as in the DFlash step (rings of window + block size), so
    the plain step, the DFlash step and the prefill chunk share them (draft: None is allowed)."""
    s = block_size(draft, options)
    b = GraphBuilder("plain_step")
    block = b.input("block", TensorType(DType.I32, (1,)))
    pos = b.input("pos", I32)
    seed, temperature, top_p = _sampling_inputs(b)
    target_caches, _ = _declare_caches(b, target, None, options, s)
    tr = Tracer(b, target, None)
    hidden, _ = tr.target_forward(block, pos, target_caches, [])
    logits = tr.logits(hidden, "logits")
    posterior = tr.op(OpKind.SAMPLE, [logits, pos, seed, temperature, top_p], "posterior", offset=1)
    acc, tokens, next_block = tr.op(OpKind.ACCEPT, [block, posterior], ("acc", "tokens", "next_block"),
                                    mask_token_id=-1)       # no MASK refill: the next block is [last]
    new_pos, count = tr.op(OpKind.KV_COMMIT, [pos, acc], ("next_pos", "next_n_new"))
    return b.ret(tokens, acc, next_block, new_pos, count, *_flat(target_caches))


def trace_prefill_step(target, draft, options: TraceOptions = TraceOptions()) -> Graph:
    """A prefill chunk: T prompt tokens through the target, draft context K/V (with a draft),
    next tokens."""
    block = block_size(draft, options)
    t = block if options.prefill_chunk is None else options.prefill_chunk
    if not 1 <= t <= block:
        raise TilecompError(f"prefill_chunk: expected 1..{block} (the SWA ring holds window + block), found {t}")
    b = GraphBuilder("prefill_step")
    ids = b.input("ids", TensorType(DType.I32, (t,)))
    pos = b.input("pos", I32)
    seed, temperature, top_p = _sampling_inputs(b)
    target_caches, draft_caches = _declare_caches(b, target, draft, options, block)
    tr = Tracer(b, target, draft)
    taps_at = draft.config.target_layer_ids if draft is not None else []
    hidden, tap_values = tr.target_forward(ids, pos, target_caches, taps_at)
    if draft is not None:
        tr.draft_context(tr.op(OpKind.CONCAT, tap_values, "taps", axis=1), pos, draft_caches)
    logits = tr.logits(hidden, "logits")
    next_tokens = tr.op(OpKind.SAMPLE, [logits, pos, seed, temperature, top_p], "next_tokens", offset=1)
    return b.ret(next_tokens, *_flat(target_caches), *_flat(draft_caches))
