"""Reference interpreter for graph IR: `run_graph(graph, params, inputs)`.

Each op kind runs the models' own reference math (RMSNorm, RoPE, sampling,
MXFP4 dequantization); fused kinds run as the composition of the unfused ones,
so executing the fused graph checks the passes. Tensors carry no batch dim.
`params` maps checkpoint names to tensors; an mxfp4 parameter `X` is read as
`X_blocks` / `X_scales`. Use `model_params(target, draft)` to collect them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tilecomp.errors import IRError
from tilecomp.ir.graph import DType, Graph, Op, OpKind
from tilecomp.models import mimo
from tilecomp.models.mxfp4 import dequantize_mxfp4
from tilecomp.models.sampling import sample as sample_tokens
from tilecomp.runtime.reference import accepted_length

from .trace import DRAFT_PREFIX, TORCH_DTYPES


def model_params(target, draft=None) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for the target and (prefixed `dflash.`) the draft."""
    params = dict(target.state_dict())
    if draft is not None:
        params.update((DRAFT_PREFIX + k, v) for k, v in draft.state_dict().items())
    return params


# ------------------------------------------------------------- op bodies

def linear(x, w, norm=None, residual=None, eps=None):
    if norm is not None:
        x = mimo.rms_norm(x, norm, eps)
    y = F.linear(x, w.to(x.dtype))
    return y if residual is None else residual + y


def rope(x, pos, n_heads, head_dim, rope_dim, theta):
    t = x.shape[0]
    heads = x.view(t, n_heads, head_dim).transpose(0, 1)                 # [H, T, Dh]
    positions = pos + torch.arange(t)
    return mimo.apply_rope(heads, positions, rope_dim, theta).transpose(0, 1).reshape(t, -1)


def kv_write(cache, x, pos, count=None, value_scale=None):
    heads, slots, hd = cache.shape
    rows = x.view(x.shape[0], heads, hd).transpose(0, 1)                  # [H, T, Dh]
    if value_scale is not None:
        rows = rows * value_scale
    n = x.shape[0] if count is None else int(count)
    out = cache.clone()
    out[:, (int(pos) + torch.arange(n)) % slots] = rows[:, :n].to(cache.dtype)
    return out


def slot_positions(slots: int, end: int) -> torch.Tensor:
    """Position held by each slot of a ring of `slots` after writing positions < end (-1: none)."""
    s = torch.arange(slots)
    p = s + slots * torch.div(end - 1 - s, slots, rounding_mode="floor")
    return torch.where(p >= 0, p, -1)


def attention(q, k, v, pos, sink=None, *, n_heads, n_kv_heads, head_dim, v_head_dim, window, causal, scale):
    t, pos = q.shape[0], int(pos)
    kpos = slot_positions(k.shape[1], pos + t)                            # [C]
    qpos = pos + torch.arange(t)                                          # [T]
    visible = (kpos >= 0)[None, :].expand(t, -1).clone()                # [T, C]
    if window:
        in_window = kpos[None, :] >= qpos[:, None] - window
        visible &= in_window if causal else in_window | (kpos[None, :] >= pos)
    if causal:
        visible &= kpos[None, :] <= qpos[:, None]
    group = n_heads // n_kv_heads
    qh = q.float().view(t, n_heads, head_dim).transpose(0, 1)                        # [H, T, Dk]
    kh = k.float().repeat_interleave(group, dim=0)                                   # [H, C, Dk]
    vh = v.float().repeat_interleave(group, dim=0)                                   # [H, C, Dv]
    scores = (qh @ kh.transpose(-1, -2)) * scale                                     # [H, T, C]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = mimo.softmax_with_sink(scores, sink)                                     # [H, T, C]
    return (probs @ vh).transpose(0, 1).reshape(t, n_heads * v_head_dim).to(q.dtype)


def route_topk(scores, bias, k):
    ids, weights = mimo.route_topk(scores, bias, k)
    return ids.to(torch.int32), weights


def expert_linear(x, w, ids):
    """x [T, K] or [T, k, K]; w = (blocks, scales) of [E, N, K]; ids [T, k] -> [T, k, N]."""
    blocks, scales = w
    t, k = ids.shape
    out = torch.empty(t, k, blocks.shape[1], dtype=x.dtype)
    for e in ids.unique().tolist():
        we = dequantize_mxfp4(blocks[e], scales[e], x.dtype)              # [N, K]
        tok, slot = torch.where(ids == e)
        rows = x[tok] if x.dim() == 2 else x[tok, slot]
        out[tok, slot] = F.linear(rows, we)
    return out


def moe_combine(y, w, residual=None):
    out = (y.float() * w[..., None]).sum(dim=1).to(y.dtype)
    return out if residual is None else residual + out


def unique_plan(ids, slots):
    experts = ids.unique().to(torch.int32)
    return torch.cat([experts, torch.full((slots - len(experts),), -1, dtype=torch.int32)])


def accept(block, posterior, mask_token_id):
    s = block.shape[0]
    acc = accepted_length(block[1:].long(), posterior[:-1].long())
    tokens = torch.full((s,), -1, dtype=torch.int32)
    tokens[:acc] = block[1:acc + 1].to(torch.int32)
    tokens[acc] = posterior[acc]
    next_block = torch.full((s,), mask_token_id, dtype=torch.int32)
    next_block[0] = posterior[acc]
    return torch.tensor(acc, dtype=torch.int32), tokens, next_block


# ------------------------------------------------------------- dispatch

def _run_op(op: Op, a: list, kw: dict, at: dict):
    K = OpKind
    kind = op.kind
    if kind is K.EMBED:
        x = a[1][a[0].long()]
        if "mask" in kw:
            x = torch.where((a[0] == at["mask_token_id"])[:, None], kw["mask"].to(x.dtype), x)
        return x
    if kind is K.CONCAT:
        return torch.cat(a, dim=at["axis"])
    if kind is K.SLICE:
        return a[0].narrow(at["axis"], at["start"], at["stop"] - at["start"])
    if kind is K.CAST:
        return a[0].to(TORCH_DTYPES[at["dtype"]])
    if kind in (K.ADD, K.SUB, K.MUL):
        fn = {K.ADD: torch.add, K.SUB: torch.sub, K.MUL: torch.mul}[kind]
        return fn(a[0], a[1])
    if kind is K.SILU:
        return F.silu(a[0])
    if kind is K.SIGMOID:
        return a[0].float().sigmoid()
    if kind is K.RMSNORM:
        return mimo.rms_norm(a[0], a[1], at["eps"])
    if kind is K.LINEAR:
        return linear(a[0], a[1], kw.get("norm"), kw.get("residual"), at.get("eps"))
    if kind is K.LM_HEAD:
        return linear(a[0], a[1], kw.get("norm"), None, at.get("eps")).float()
    if kind is K.ROPE:
        return rope(a[0], int(a[1]), at["n_heads"], at["head_dim"], at["rope_dim"], at["theta"])
    if kind is K.KV_WRITE:
        return kv_write(a[0], a[1], a[2], kw.get("count"), at.get("value_scale"))
    if kind is K.ATTENTION:
        return attention(*a, kw.get("sink"), **at)
    if kind is K.QKV_ROPE_KV:
        return _qkv_rope_kv(a, kw, at)
    if kind is K.SWIGLU_MLP:
        x, wg, wu, wd = a
        h = mimo.rms_norm(x, kw["norm"], at["eps"]) if "norm" in kw else x
        return linear(F.silu(linear(h, wg)) * linear(h, wu), wd, residual=kw.get("residual"))
    if kind is K.ROUTE_TOPK:
        return route_topk(a[0], a[1], at["k"])
    if kind is K.ROUTE_NORMALIZE:
        return mimo.route_normalize(a[0], at["renorm"], at["scale"])
    if kind is K.MOE_ROUTE:
        x = mimo.rms_norm(a[0], kw["norm"], at["eps"]) if "norm" in kw else a[0]
        ids, w = route_topk(F.linear(x.float(), a[1].float()).sigmoid(), a[2], at["k"])
        weights = mimo.route_normalize(w, at["renorm"], at["scale"])
        routing = ids, weights, unique_plan(ids, op.outputs[2].type.shape[0])
        return routing + ((x,) if "norm" in kw else ())
    if kind is K.EXPERT_LINEAR:
        return expert_linear(*a)
    if kind is K.MOE_COMBINE:
        return moe_combine(a[0], a[1], kw.get("residual"))
    if kind is K.MOE_EXPERTS:
        x, ids, w, wg, wu, wd = a
        act = F.silu(expert_linear(x, wg, ids)) * expert_linear(x, wu, ids)
        return moe_combine(expert_linear(act, wd, ids), w, kw.get("residual"))
    if kind is K.SAMPLE:
        logits, pos, seed, temperature, top_p = a
        positions = int(pos) + at["offset"] + torch.arange(logits.shape[0])
        ids = sample_tokens(logits, positions, float(temperature), float(top_p), int(seed))
        return ids.to(torch.int32)
    if kind is K.ACCEPT:
        return accept(a[0], a[1], at["mask_token_id"])
    if kind is K.KV_COMMIT:
        pos, acc = int(a[0]), int(a[1])
        return torch.tensor(pos + acc + 1, dtype=torch.int32), torch.tensor(acc + 1, dtype=torch.int32)
    raise IRError(f"run_graph: no reference body for op kind {kind.value}")


def _qkv_rope_kv(a, kw, at):
    x, wq, wk, wv, kc, vc, pos = a
    h = mimo.rms_norm(x, kw["norm"], at["eps"]) if "norm" in kw else x
    geometry = dict(head_dim=at["head_dim"], rope_dim=at["rope_dim"], theta=at["theta"])
    q = rope(linear(h, wq), int(pos), at["n_heads"], **geometry)
    k = rope(linear(h, wk), int(pos), at["n_kv_heads"], **geometry)
    return q, kv_write(kc, k, pos), kv_write(vc, linear(h, wv), pos, value_scale=at.get("value_scale"))


def _param(graph_name: str, dtype: DType, params) -> object:
    name = graph_name[1:]
    try:
        if dtype is DType.MXFP4:
            return params[name + "_blocks"], params[name + "_scales"]
        return params[name]
    except KeyError as err:
        raise IRError(f"run_graph: no tensor {err.args[0]!r} for parameter {graph_name}") from None


def run_graph(graph: Graph, params, inputs, return_all: bool = False) -> dict[str, torch.Tensor]:
    """Execute `graph`; `inputs` maps input names (with or without `%`) to tensors.

    Returns the outputs by name (every value when `return_all`).
    """
    env: dict[str, object] = {}
    given = {("%" + k.lstrip("%")): v for k, v in inputs.items()}
    for v in graph.inputs:
        if v.name not in given:
            raise IRError(f"run_graph: missing input {v.name} ({v.type})")
        env[v.name] = torch.as_tensor(given[v.name])
    for p in graph.params:
        env[p.name] = _param(p.name, p.type.dtype, params)
    for op in graph.ops:
        args = [env[n] for n in op.args]
        kwargs = {k: env[n] for k, n in op.kwargs}
        result = _run_op(op, args, kwargs, op.attrs)
        results = result if isinstance(result, tuple) else (result,)
        env.update((v.name, r) for v, r in zip(op.outputs, results))
    if return_all:
        return env
    return {name: env[name] for name in graph.outputs}
