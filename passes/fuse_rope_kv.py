"""fuse_rope_kv: q/k/v projections + RoPE + KV-cache writes feeding one attention
-> qkv_rope_kv (norm prologue, three projections, partial RoPE, KV-cache write epilogue).

    %q = linear(%x, @wq, norm=@n);  %k = linear(%x, @wk, norm=@n);  %v = linear(%x, @wv, norm=@n)
    %qr = rope(%q, %pos);  %kr = rope(%k, %pos)
    %kc2 = kv_write(%kc, %kr, %pos);  %vc2 = kv_write(%vc, %v, %pos) {value_scale}
    %o = attention(%qr, %kc2, %vc2, %pos) ...
becomes
    %qr, %kc2, %vc2 = qkv_rope_kv(%x, @wq, @wk, @wv, %kc, %vc, %pos, norm=@n) {...}
"""
from __future__ import annotations

from tilecomp.ir.graph import Graph, Op, OpKind

from .rewrite import Rewriter, Uses, graph_pass, make_op


def _match(uses: Uses, attn: Op):
    """The 7 ops of the pattern feeding `attn`, or None."""
    q_rope = uses.op(attn.args[0], OpKind.ROPE)
    k_write, v_write = uses.op(attn.args[1], OpKind.KV_WRITE), uses.op(attn.args[2], OpKind.KV_WRITE)
    if q_rope is None or k_write is None or v_write is None or k_write.kwargs or v_write.kwargs:
        return None
    k_rope = uses.op(k_write.args[1], OpKind.ROPE)
    q = uses.op(q_rope.args[0], OpKind.LINEAR)
    k = uses.op(k_rope.args[0], OpKind.LINEAR) if k_rope is not None else None
    v = uses.op(v_write.args[1], OpKind.LINEAR)
    if q is None or k is None or v is None or "value_scale" in k_write.attrs:
        return None
    pos = attn.args[3]
    same_input = q.args[0] == k.args[0] == v.args[0] and q.kwargs == k.kwargs == v.kwargs
    no_residual = all(op.kwarg("residual") is None for op in (q, k, v))
    same_pos = q_rope.args[1] == k_rope.args[1] == k_write.args[2] == v_write.args[2] == pos
    geometry = ("head_dim", "rope_dim", "theta")
    same_rope = all(q_rope.attrs[a] == k_rope.attrs[a] for a in geometry)
    if not (same_input and no_residual and same_pos and same_rope):
        return None
    single = [(q, q_rope), (k, k_rope), (k_rope, k_write), (v, v_write)]
    if not all(uses.only_user(a.out.name, b) for a, b in single):
        return None
    return q, k, v, q_rope, k_rope, k_write, v_write


@graph_pass
def fuse_rope_kv(graph: Graph) -> Graph:
    rw = Rewriter(graph)
    types = graph.types()
    for attn in graph.ops:
        if attn.kind is not OpKind.ATTENTION:
            continue
        match = _match(rw.uses, attn)
        if match is None:
            continue
        q, k, v, q_rope, k_rope, k_write, v_write = match
        fused = make_op(
            OpKind.QKV_ROPE_KV,
            [q.args[0], q.args[1], k.args[1], v.args[1], k_write.args[0], v_write.args[0], attn.args[3]],
            [q_rope.out.name, k_write.out.name, v_write.out.name], types, {"norm": q.kwarg("norm")},
            n_heads=attn.attrs["n_heads"], n_kv_heads=attn.attrs["n_kv_heads"],
            head_dim=attn.attrs["head_dim"], v_head_dim=attn.attrs["v_head_dim"],
            rope_dim=q_rope.attrs["rope_dim"], theta=q_rope.attrs["theta"],
            eps=q.attrs.get("eps"), value_scale=v_write.attrs.get("value_scale"))
        rw.claim(list(match), fused)
    return rw.result()
