"""Graph IR verifier: SSA order, operand counts, attributes, dtypes and shapes.

One `Rule` per op kind: how many positional operands, which keyword operands
and attributes it takes, and a shape function that computes the output types
from the operand types (raising on a mismatch). `infer_types` is what the
tracer and the passes use to build ops; `verify_graph` checks that every op's
declared outputs equal the inferred ones. Messages name the line and the op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tilecomp.errors import IRError

from .graph import DType, Graph, Op, OpKind, TensorType

I32, F32 = DType.I32, DType.F32


class _Mismatch(Exception):
    """Raised by shape functions; turned into an IRError that names the op."""


def _want(cond: bool, msg: str):
    if not cond:
        raise _Mismatch(msg)


@dataclass
class _Ctx:
    op: Op
    args: list[TensorType]
    kwargs: dict[str, TensorType]

    def attr(self, key: str):
        return self.op.attrs[key]

    def kw(self, key: str) -> TensorType | None:
        return self.kwargs.get(key)


def _shape(t: TensorType, shape: tuple, what: str):
    _want(t.shape == tuple(shape), f"{what}: expected shape {list(shape)}, found {list(t.shape)}")


def _float(t: TensorType, what: str):
    _want(t.dtype.is_float, f"{what}: expected a float dtype, found {t.dtype.value}")


def _scalar_int(t: TensorType, what: str):
    _want(t.dtype.is_int and t.shape == (), f"{what}: expected an integer scalar, found {t}")


def _scalar_f32(t: TensorType, what: str):
    _want(t == TensorType(F32, ()), f"{what}: expected f32[], found {t}")


def _ndim(t: TensorType, n: int, what: str):
    _want(len(t.shape) == n, f"{what}: expected {n} dims, found {t}")


def _same(a: TensorType, b: TensorType, what: str):
    _want(a == b, f"{what}: expected {a}, found {b}")


def _norm_kw(c: _Ctx, width: int):
    norm = c.kw("norm")
    if norm is not None:
        _shape(norm, (width,), "norm weight")
        _want("eps" in c.op.attrs, "a norm= operand needs the attribute eps")


# ------------------------------------------------------- shape functions

def _embed(c):
    ids, table = c.args
    _want(ids.dtype.is_int and len(ids.shape) == 1, f"ids: expected an integer vector, found {ids}")
    _ndim(table, 2, "table")
    if c.kw("mask") is not None:
        _shape(c.kw("mask"), table.shape[1:], "mask embedding")
        _want("mask_token_id" in c.op.attrs, "a mask= operand needs the attribute mask_token_id")
    return (TensorType(table.dtype, (ids.shape[0], table.shape[1])),)


def _concat(c):
    axis, first = c.attr("axis"), c.args[0]
    _want(0 <= axis < len(first.shape), f"axis {axis} out of range for {first}")
    total = 0
    for i, t in enumerate(c.args):
        same_dims = t.shape[:axis] + t.shape[axis + 1:] == first.shape[:axis] + first.shape[axis + 1:]
        _want(t.dtype == first.dtype and len(t.shape) == len(first.shape) and same_dims,
              f"operand {i}: {t} does not concatenate with {first} along axis {axis}")
        total += t.shape[axis]
    return (TensorType(first.dtype, first.shape[:axis] + (total,) + first.shape[axis + 1:]),)


def _slice(c):
    (x,) = c.args
    axis, start, stop = c.attr("axis"), c.attr("start"), c.attr("stop")
    _want(0 <= axis < len(x.shape), f"axis {axis} out of range for {x}")
    _want(0 <= start < stop <= x.shape[axis], f"slice [{start}:{stop}] out of range for dim {x.shape[axis]}")
    return (TensorType(x.dtype, x.shape[:axis] + (stop - start,) + x.shape[axis + 1:]),)


def _cast(c):
    dtype = c.attr("dtype")
    _want(dtype in {d.value for d in DType} and dtype != "mxfp4", f"cast to unknown dtype {dtype!r}")
    return (TensorType(DType(dtype), c.args[0].shape),)


def _binary(c):
    a, b = c.args
    _same(a, b, "second operand")
    return (a,)


def _unary_float(c):
    _float(c.args[0], "operand")
    return (c.args[0],)


def _sigmoid(c):
    _float(c.args[0], "operand")
    return (TensorType(F32, c.args[0].shape),)


def _rmsnorm(c):
    x, w = c.args
    _float(x, "x")
    _shape(w, x.shape[-1:], "norm weight")
    return (x,)


def _linear(c):
    x, w = c.args
    _ndim(x, 2, "x")
    _ndim(w, 2, "weight")
    _float(x, "x")
    _want(w.shape[1] == x.shape[1], f"weight {w} does not take inputs of width {x.shape[1]}")
    _norm_kw(c, x.shape[1])
    out = TensorType(x.dtype, (x.shape[0], w.shape[0]))
    if c.kw("residual") is not None:
        _same(out, c.kw("residual"), "residual")
    return (out,)


def _lm_head(c):
    x, w = c.args
    _ndim(x, 2, "x")
    _shape(w, (w.shape[0], x.shape[1]), "lm_head weight")
    _norm_kw(c, x.shape[1])
    return (TensorType(F32, (x.shape[0], w.shape[0])),)


def _rope(c):
    x, pos = c.args
    heads, hd, rd = c.attr("n_heads"), c.attr("head_dim"), c.attr("rope_dim")
    _shape(x, (x.shape[0], heads * hd), "x")
    _want(rd % 2 == 0 and 0 <= rd <= hd, f"rope_dim {rd}: expected an even number <= head_dim {hd}")
    _scalar_int(pos, "pos")
    return (x,)


def _kv_write(c):
    cache, x, pos = c.args
    _ndim(cache, 3, "cache")
    heads, _, hd = cache.shape
    _shape(x, (x.shape[0], heads * hd), "new rows")
    _want(x.dtype == cache.dtype, f"new rows: expected dtype {cache.dtype.value}, found {x.dtype.value}")
    _scalar_int(pos, "pos")
    if c.kw("count") is not None:
        _scalar_int(c.kw("count"), "count")
    return (cache,)


def _attn_dims(c, q, k, v):
    hq, hkv = c.attr("n_heads"), c.attr("n_kv_heads")
    dqk, dv = c.attr("head_dim"), c.attr("v_head_dim")
    _want(hkv > 0 and hq % hkv == 0, f"n_heads {hq} is not a multiple of n_kv_heads {hkv}")
    _shape(q, (q.shape[0], hq * dqk), "q")
    _ndim(k, 3, "k cache")
    _shape(k, (hkv, k.shape[1], dqk), "k cache")
    _shape(v, (hkv, k.shape[1], dv), "v cache")
    return hq, dv


def _attention(c):
    q, k, v, pos = c.args
    hq, dv = _attn_dims(c, q, k, v)
    _scalar_int(pos, "pos")
    _want(c.attr("window") >= 0, "window must be >= 0 (0 = full attention)")
    if c.kw("sink") is not None:
        _same(TensorType(F32, (hq,)), c.kw("sink"), "sink")
    return (TensorType(q.dtype, (q.shape[0], hq * dv)),)


def _qkv_rope_kv(c):
    x, wq, wk, wv, k, v, pos = c.args
    hq, hkv = c.attr("n_heads"), c.attr("n_kv_heads")
    dqk, dv = c.attr("head_dim"), c.attr("v_head_dim")
    d = x.shape[1]
    _ndim(x, 2, "x")
    _shape(wq, (hq * dqk, d), "q weight")
    _shape(wk, (hkv * dqk, d), "k weight")
    _shape(wv, (hkv * dv, d), "v weight")
    q = TensorType(x.dtype, (x.shape[0], hq * dqk))
    _attn_dims(c, q, k, v)
    _scalar_int(pos, "pos")
    _norm_kw(c, d)
    return (q, k, v)


def _swiglu_mlp(c):
    x, wg, wu, wd = c.args
    _ndim(x, 2, "x")
    inter, d = wg.shape[0], x.shape[1]
    _shape(wg, (inter, d), "gate weight")
    _shape(wu, (inter, d), "up weight")
    _shape(wd, (d, inter), "down weight")
    _norm_kw(c, d)
    if c.kw("residual") is not None:
        _same(x, c.kw("residual"), "residual")
    return (x,)


def _route_topk(c):
    scores, bias = c.args
    _want(scores.dtype == F32 and len(scores.shape) == 2, f"scores: expected f32[T, E], found {scores}")
    _same(TensorType(F32, scores.shape[1:]), bias, "bias")
    k = c.attr("k")
    _want(0 < k <= scores.shape[1], f"k {k} out of range for {scores.shape[1]} experts")
    return (TensorType(I32, (scores.shape[0], k)), TensorType(F32, (scores.shape[0], k)))


def _route_normalize(c):
    (w,) = c.args
    _want(w.dtype == F32 and len(w.shape) == 2, f"weights: expected f32[T, k], found {w}")
    return (w,)


def _moe_route(c):
    x, gate, bias = c.args
    _ndim(x, 2, "x")
    _want(gate.dtype == F32 and gate.shape[1:] == x.shape[1:],
          f"router weight: expected f32[E, {x.shape[1]}], found {gate}")
    e, t, k = gate.shape[0], x.shape[0], c.attr("k")
    _same(TensorType(F32, (e,)), bias, "bias")
    _want(0 < k <= e, f"k {k} out of range for {e} experts")
    _norm_kw(c, x.shape[1])
    routing = (TensorType(I32, (t, k)), TensorType(F32, (t, k)), TensorType(I32, (min(e, t * k),)))
    return routing + ((x,) if c.kw("norm") is not None else ())


def _expert_weight(w: TensorType, what: str):
    _want(w.dtype == DType.MXFP4 and len(w.shape) == 3, f"{what}: expected mxfp4[E, N, K], found {w}")


def _expert_linear(c):
    x, w, ids = c.args
    _expert_weight(w, "expert weight")
    _want(ids.dtype == I32 and len(ids.shape) == 2, f"ids: expected i32[T, k], found {ids}")
    t, k = ids.shape
    _want(x.shape in ((t, w.shape[2]), (t, k, w.shape[2])),
          f"x: expected [{t}, {w.shape[2]}] or [{t}, {k}, {w.shape[2]}], found {list(x.shape)}")
    return (TensorType(x.dtype, (t, k, w.shape[1])),)


def _moe_combine(c):
    y, w = c.args
    _ndim(y, 3, "expert outputs")
    _same(TensorType(F32, y.shape[:2]), w, "weights")
    out = TensorType(y.dtype, (y.shape[0], y.shape[2]))
    if c.kw("residual") is not None:
        _same(out, c.kw("residual"), "residual")
    return (out,)


def _moe_experts(c):
    x, ids, w, wg, wu, wd = c.args
    _ndim(x, 2, "x")
    _want(ids.dtype == I32 and len(ids.shape) == 2 and ids.shape[0] == x.shape[0],
          f"ids: expected i32[{x.shape[0]}, k], found {ids}")
    _same(TensorType(F32, ids.shape), w, "weights")
    for t, what in ((wg, "gate"), (wu, "up"), (wd, "down")):
        _expert_weight(t, f"{what} experts")
    e, inter, d = wg.shape
    _want(wg.shape == wu.shape == (e, inter, x.shape[1]) and wd.shape == (e, x.shape[1], inter),
          f"expert shapes gate {list(wg.shape)}, up {list(wu.shape)}, down {list(wd.shape)} do not fit x {x}")
    if c.kw("plan") is not None:
        _want(c.kw("plan").dtype == I32 and len(c.kw("plan").shape) == 1,
              f"plan: expected i32[S], found {c.kw('plan')}")
    if c.kw("residual") is not None:
        _same(x, c.kw("residual"), "residual")
    return (x,)


def _sample(c):
    logits, pos, seed, temperature, top_p = c.args
    _want(logits.dtype == F32 and len(logits.shape) == 2, f"logits: expected f32[T, V], found {logits}")
    _scalar_int(pos, "pos")
    _scalar_int(seed, "seed")
    _scalar_f32(temperature, "temperature")
    _scalar_f32(top_p, "top_p")
    return (TensorType(I32, logits.shape[:1]),)


def _accept(c):
    block, posterior = c.args
    _want(block.dtype.is_int and len(block.shape) == 1, f"block: expected an integer vector, found {block}")
    _shape(posterior, block.shape, "posterior")
    return (TensorType(I32, ()), TensorType(I32, block.shape), TensorType(I32, block.shape))


def _kv_commit(c):
    pos, acc = c.args
    _scalar_int(pos, "pos")
    _scalar_int(acc, "acc")
    return (TensorType(I32, ()), TensorType(I32, ()))


@dataclass(frozen=True)
class Rule:
    """Operand count (-1: one or more), keyword operands, attributes, shape function."""

    nargs: int
    infer: Callable[[_Ctx], tuple]
    kwargs: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    optional_attrs: tuple[str, ...] = ()


_ATTN = ("n_heads", "n_kv_heads", "head_dim", "v_head_dim")
RULES: dict[OpKind, Rule] = {
    OpKind.EMBED: Rule(2, _embed, ("mask",), (), ("mask_token_id",)),
    OpKind.CONCAT: Rule(-1, _concat, (), ("axis",)),
    OpKind.SLICE: Rule(1, _slice, (), ("axis", "start", "stop")),
    OpKind.CAST: Rule(1, _cast, (), ("dtype",)),
    OpKind.ADD: Rule(2, _binary),
    OpKind.SUB: Rule(2, _binary),
    OpKind.MUL: Rule(2, _binary),
    OpKind.SILU: Rule(1, _unary_float),
    OpKind.SIGMOID: Rule(1, _sigmoid),
    OpKind.RMSNORM: Rule(2, _rmsnorm, (), ("eps",)),
    OpKind.LINEAR: Rule(2, _linear, ("norm", "residual"), (), ("eps",)),
    OpKind.LM_HEAD: Rule(2, _lm_head, ("norm",), (), ("eps",)),
    OpKind.ROPE: Rule(2, _rope, (), ("n_heads", "head_dim", "rope_dim", "theta")),
    OpKind.KV_WRITE: Rule(3, _kv_write, ("count",), (), ("value_scale",)),
    OpKind.ATTENTION: Rule(4, _attention, ("sink",), _ATTN + ("window", "causal", "scale")),
    OpKind.QKV_ROPE_KV: Rule(7, _qkv_rope_kv, ("norm",), _ATTN + ("rope_dim", "theta"), ("eps", "value_scale")),
    OpKind.SWIGLU_MLP: Rule(4, _swiglu_mlp, ("norm", "residual"), (), ("eps",)),
    OpKind.ROUTE_TOPK: Rule(2, _route_topk, (), ("k",)),
    OpKind.ROUTE_NORMALIZE: Rule(1, _route_normalize, (), ("renorm", "scale")),
    OpKind.MOE_ROUTE: Rule(3, _moe_route, ("norm",), ("k", "renorm", "scale"), ("eps",)),
    OpKind.EXPERT_LINEAR: Rule(3, _expert_linear),
    OpKind.MOE_COMBINE: Rule(2, _moe_combine, ("residual",)),
    OpKind.MOE_EXPERTS: Rule(6, _moe_experts, ("plan", "residual")),
    OpKind.SAMPLE: Rule(5, _sample, (), ("offset",)),
    OpKind.ACCEPT: Rule(2, _accept, (), ("mask_token_id",)),
    OpKind.KV_COMMIT: Rule(2, _kv_commit),
}


def _describe(op: Op) -> str:
    outs = ", ".join(v.name for v in op.outputs) or "(no outputs)"
    return f"op {op.kind.value} -> {outs}"


def _check_signature(op: Op, rule: Rule):
    if rule.nargs >= 0:
        _want(len(op.args) == rule.nargs, f"expected {rule.nargs} operands, found {len(op.args)}")
    else:
        _want(len(op.args) >= 1, "expected at least one operand")
    for key, _ in op.kwargs:
        _want(key in rule.kwargs, f"unknown keyword operand {key}= (allowed: {', '.join(rule.kwargs) or 'none'})")
    keys = [k for k, _ in op.kwargs]
    _want(len(keys) == len(set(keys)), f"repeated keyword operand in {keys}")
    for name in rule.attrs:
        _want(name in op.attrs, f"missing attribute {name}")
    for name in op.attrs:
        _want(name in rule.attrs or name in rule.optional_attrs, f"unknown attribute {name}")


def infer_types(op: Op, types: dict) -> tuple[TensorType, ...]:
    """Output types of `op` given name -> TensorType of its operands. Raises IRError."""
    try:
        rule = RULES[op.kind]
        _check_signature(op, rule)
        ctx = _Ctx(op, [types[a] for a in op.args], {k: types[n] for k, n in op.kwargs})
        return tuple(rule.infer(ctx))
    except _Mismatch as err:
        raise IRError(f"{_describe(op)}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise IRError(f"{_describe(op)}: malformed op ({type(err).__name__}: {err})") from None


def verify_graph(graph: Graph, source: str = "graph") -> Graph:
    """Check SSA order, signatures, dtypes and shapes. Returns the graph; raises IRError."""
    defined: dict[str, TensorType] = {}
    def_line: dict[str, int] = {}
    decls = [("input", "%", v) for v in graph.inputs] + [("param", "@", v) for v in graph.params]
    for what, sigil, v in decls:
        if not v.name.startswith(sigil) or v.name in defined:
            raise IRError(f"{source}: {what} {v.name} is malformed (sigil {sigil}) or defined twice")
        defined[v.name] = v.type
    later = {v.name: graph.op_line(i) for i, op in enumerate(graph.ops) for v in op.outputs}
    for i, op in enumerate(graph.ops):
        where = f"{source}:{graph.op_line(i)}"
        if not isinstance(op.kind, OpKind):
            raise IRError(f"{where}: unknown op kind {op.kind!r}")
        for name in op.operands():
            if name not in defined:
                if name in later:
                    raise IRError(f"{where}: {_describe(op)} uses {name} before its definition on line {later[name]}")
                raise IRError(f"{where}: {_describe(op)} uses undefined value {name}")
        try:
            inferred = infer_types(op, defined)
        except IRError as err:
            raise IRError(f"{where}: {err}") from None
        declared = tuple(v.type for v in op.outputs)
        if declared != inferred:
            raise IRError(f"{where}: {_describe(op)}: declared result types "
                          f"{', '.join(map(str, declared))}, expected {', '.join(map(str, inferred))}")
        for v in op.outputs:
            if not v.name.startswith("%") or v.name in defined:
                prev = def_line.get(v.name, "an input or param")
                raise IRError(f"{where}: {_describe(op)} redefines {v.name} (first defined on line {prev})")
            defined[v.name] = v.type
            def_line[v.name] = graph.op_line(i)
    for name in graph.outputs:
        if name not in defined:
            raise IRError(f"{source}: return of undefined value {name}")
    return graph
