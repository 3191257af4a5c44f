"""Graph IR: SSA ops on whole tensors with static shapes.

A `Graph` is a straight list of `Op`s. Every value is defined once: graph
inputs (runtime tensors and scalars such as the position, the context length,
the accepted count and the seed) and op outputs are `%name`; parameters
(weights) are `@name`, named exactly as the checkpoint tensor. An `mxfp4`
parameter `@X` of logical shape [E, N, K] is stored as the checkpoint pair
`X_blocks` (uint8 [E, N, K/32, 16]) and `X_scales` (uint8 [E, N, K/32]).

Text form (see graph_text.py)::

    graph decode_step {
      input %pos: i32[]
      param @model.norm.weight: bf16[4096]
      %h: bf16[8, 4096] = rmsnorm(%x, @model.norm.weight) {eps=1e-05}
      return %h
    }

Shape legend used in the op docstrings: T tokens, D hidden, K input dim,
N output dim, V vocab, H heads (Hq query, Hkv key/value), Dqk / Dv head dims,
C cache slots, E experts, k experts per token, I expert intermediate,
S slots of the unique-expert plan (min(E, T * k)).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union


class DType(enum.Enum):
    """Element types. `mxfp4` is a packed 4-bit type (E2M1 + one E8M0 scale per 32)."""

    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"
    I32 = "i32"
    I64 = "i64"
    U8 = "u8"
    MXFP4 = "mxfp4"

    @property
    def is_int(self) -> bool:
        return self in (DType.I32, DType.I64, DType.U8)

    @property
    def is_float(self) -> bool:
        return self in (DType.BF16, DType.F16, DType.F32)

    def nbytes(self, numel: int) -> int:
        """Bytes that `numel` elements occupy in memory (mxfp4: nibbles + scales)."""
        if self is DType.MXFP4:
            return numel // 2 + numel // 32
        return numel * _ITEMSIZE[self]


_ITEMSIZE = {DType.BF16: 2, DType.F16: 2, DType.F32: 4, DType.I32: 4, DType.I64: 8, DType.U8: 1}


@dataclass(frozen=True)
class TensorType:
    """dtype plus a static shape; shape () is a scalar."""

    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.numel)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Value:
    """A named SSA value. `name` carries its sigil: `%x` (value) or `@w` (parameter)."""

    name: str
    type: TensorType


class OpKind(enum.Enum):
    """Every graph op kind, grouped by family. Shapes per kind:

    data movement
      embed(ids i[T], table[V, D]; mask=[D]) {mask_token_id} -> [T, D]
          rows whose id is mask_token_id take the `mask` vector instead
      concat(x0, x1, ...) {axis} -> shapes joined along axis
      slice(x) {axis, start, stop} -> x with axis cut to [start, stop)
      cast(x) {dtype} -> x converted to dtype
    elementwise
      add(a, b) -> a;  sub(a, b) -> a;  mul(a, b) -> a  (same types; scalars too)
      silu(x) -> x;  sigmoid(x) -> f32 x
    normalisation
      rmsnorm(x[T, D], w[D]) {eps} -> x
    projections
      linear(x[T, K], w[N, K]; norm=[K], residual=[T, N]) {eps} -> [T, N] (x dtype)
          `norm` = RMSNorm prologue on x, `residual` = epilogue add
      lm_head(x[T, D], w[V, D]; norm=[D]) {eps} -> f32[T, V]
    attention
      rope(x[T, H*Dh], pos i32[]) {n_heads, head_dim, rope_dim, theta} -> x
          neox rotation of the first rope_dim dims of each head; row t at pos + t
      kv_write(cache[H, C, Dh], x[T, H*Dh], pos i32[]; count=i32[]) {value_scale} -> cache
          row t (times value_scale) goes to slot (pos + t) % C; with `count`, only rows t < count
      attention(q[T, Hq*Dqk], k[Hkv, C, Dqk], v[Hkv, C, Dv], pos i32[]; sink=f32[Hq])
          {n_heads, n_kv_heads, head_dim, v_head_dim, window, causal, scale} -> [T, Hq*Dv]
          query t sits at pos + t and sees key j when j >= pos + t - window (window 0: no
          limit) and, if causal, j <= pos + t; if not causal, every key of the block
          [pos, pos + T) is visible. A slot of a ring cache holds the latest position
          < pos + T that maps to it.
      qkv_rope_kv(x[T, D], wq[Hq*Dqk, D], wk[Hkv*Dqk, D], wv[Hkv*Dv, D], k[Hkv, C, Dqk],
          v[Hkv, C, Dv], pos; norm=[D]) {eps, n_heads, n_kv_heads, head_dim, v_head_dim,
          rope_dim, theta, value_scale} -> (q[T, Hq*Dqk] roped, k cache, v cache)
    MLP and mixture of experts
      swiglu_mlp(x[T, D], wg[I, D], wu[I, D], wd[D, I]; norm=[D], residual=[T, D]) {eps} -> [T, D]
      route_topk(scores f32[T, E], bias f32[E]) {k} -> (ids i32[T, k], weights f32[T, k])
          top-k of scores + bias; weights are the unbiased scores
      route_normalize(w f32[T, k]) {renorm, scale} -> f32[T, k]
      moe_route(x[T, D], gate f32[E, D], bias f32[E]; norm=[D]) {k, eps, renorm, scale}
          -> (ids i32[T, k], weights f32[T, k], plan i32[S] (, xn[T, D] with norm=))
          plan = the unique experts, -1 padded; xn = the normed x, which the experts read
      expert_linear(x[T, K] | [T, k, K], w mxfp4[E, N, K], ids i32[T, k]) -> [T, k, N]
      moe_combine(y[T, k, D], weights f32[T, k]; residual=[T, D]) -> [T, D]
      moe_experts(x[T, D], ids, weights, wg mxfp4[E, I, D], wu mxfp4[E, I, D],
          wd mxfp4[E, D, I]; plan=i32[S], residual=[T, D]) -> [T, D]
    sampling and the DFlash step
      sample(logits f32[T, V], pos i32[], seed i32[], temperature f32[], top_p f32[]) {offset}
          -> i32[T]  row t is keyed on absolute position pos + offset + t
      accept(block i32[S], posterior i32[S]) {mask_token_id} -> (acc i32[], tokens i32[S],
          next_block i32[S])  acc = longest prefix with block[1+j] == posterior[j];
          tokens = block[1:acc+1] ++ posterior[acc], padded with -1;
          next_block = [posterior[acc], mask_token_id x (S-1)]
      kv_commit(pos i32[], acc i32[]) -> (length i32[], count i32[])
          length = pos + acc + 1 committed positions; count = acc + 1 new ones
    """

    # data movement
    EMBED = "embed"
    CONCAT = "concat"
    SLICE = "slice"
    CAST = "cast"
    # elementwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    SILU = "silu"
    SIGMOID = "sigmoid"
    # normalisation
    RMSNORM = "rmsnorm"
    # projections
    LINEAR = "linear"
    LM_HEAD = "lm_head"
    # attention
    ROPE = "rope"
    KV_WRITE = "kv_write"
    ATTENTION = "attention"
    QKV_ROPE_KV = "qkv_rope_kv"
    # MLP and mixture of experts
    SWIGLU_MLP = "swiglu_mlp"
    ROUTE_TOPK = "route_topk"
    ROUTE_NORMALIZE = "route_normalize"
    MOE_ROUTE = "moe_route"
    EXPERT_LINEAR = "expert_linear"
    MOE_COMBINE = "moe_combine"
    MOE_EXPERTS = "moe_experts"
    # sampling and the DFlash step
    SAMPLE = "sample"
    ACCEPT = "accept"
    KV_COMMIT = "kv_commit"


AttrValue = Union[int, float, bool, str, None, tuple]


@dataclass
class Op:
    """One op: `outputs = kind(args..., key=kwarg...) {attrs}`.

    `args` and `kwargs` hold operand names with their sigil (`%x`, `@w`);
    `kwargs` are the optional operands (norm=, residual=, sink=, ...), in the
    order written. `line` is where the op was parsed (not compared).
    """

    kind: OpKind
    args: tuple[str, ...]
    outputs: tuple[Value, ...]
    kwargs: tuple[tuple[str, str], ...] = ()
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False, repr=False)

    def kwarg(self, key: str) -> str | None:
        for k, name in self.kwargs:
            if k == key:
                return name
        return None

    def operands(self) -> list[str]:
        """Every operand name, positional first, then keyword."""
        return list(self.args) + [name for _, name in self.kwargs]

    @property
    def out(self) -> Value:
        return self.outputs[0]


@dataclass
class Graph:
    """A whole step: runtime inputs, parameters by checkpoint name, ops, outputs."""

    name: str
    inputs: list[Value] = field(default_factory=list)
    params: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def types(self) -> dict[str, TensorType]:
        """Name -> type for every input, parameter and op output."""
        env = {v.name: v.type for v in self.inputs}
        env.update((v.name, v.type) for v in self.params)
        for op in self.ops:
            env.update((v.name, v.type) for v in op.outputs)
        return env

    def op_line(self, index: int) -> int:
        """Line of ops[index]: where it was parsed, else where print_graph puts it."""
        op = self.ops[index]
        if op.line is not None:
            return op.line
        return 2 + len(self.inputs) + len(self.params) + index

    def param_bytes(self) -> int:
        return sum(p.type.nbytes for p in self.params)


# The text form and the verifier live in their own files; re-exported here so
# `from tilecomp.ir.graph import print_graph, parse_graph, verify_graph` works.
from .graph_text import parse_graph, print_graph  # noqa: E402
from .graph_verify import infer_types, verify_graph  # noqa: E402

__all__ = [
    "DType", "TensorType", "Value", "OpKind", "Op", "Graph",
    "print_graph", "parse_graph", "verify_graph", "infer_types",
]
