"""Lowering of projections, dense MLPs, embedding, LM head + sampling, concat and acceptance.

Shape legend: T rows of the step, K input dim, N output dim, I intermediate,
V vocab, S split-K partials.
"""
from __future__ import annotations

from tilecomp.errors import IRError
from tilecomp.ir.graph import Op, OpKind

from .lower import Lowering, _cdiv, balance


def _split_k(lw: Lowering, n_tiles: int, k: int) -> int:
    o = lw.options
    if n_tiles >= o.min_n_tiles:
        return 1
    return max(1, min(o.max_split_k, _cdiv(o.min_n_tiles, n_tiles), k // o.split_k_min))


def emit_linear(lw: Lowering, x: str, w: str, y: str, *, norm: str | None = None, w_up: str | None = None,
                res: str | None = None, eps: float | None = None, op: str):
    """y[T, N] = norm?(x) @ W^T (SwiGLU with w_up) (+ res): N tiles, split-K when N is small."""
    T, K = lw.shape(x)
    N = lw.tp.buffers[w].shape[0]
    o = lw.options
    if lw.programs:     # width and K splits balanced over the programs (one wave where it fits)
        bn, splits = balance(N, lw.programs, K * 2 * (2 if w_up else 1), k=K,
                             max_split=1 if w_up else o.max_split_k, split_k_min=o.split_k_min)
    else:
        bn = o.block_n
        splits = 1 if w_up else _split_k(lw, _cdiv(N, bn), K)
    n_tiles = _cdiv(N, bn)
    k_step = _cdiv(_cdiv(K, splits), 64) * 64
    splits = _cdiv(K, k_step)
    yb = lw.value_buffer(y)
    part = lw.add_buffer(f"{yb}.part", "fp32", (splits, T, N), "scratch") if splits > 1 else None
    counter = f"c.{yb}.part" if part else f"c.{yb}"
    base = dict(op=op, x=lw.buf[x], x_stride=K, w=w, w_up=w_up, norm=norm, eps=eps, k_dim=K, n_dim=N,
                n_rows=T)
    for n in range(n_tiles):
        n0, n1 = n * bn, min(N, (n + 1) * bn)
        for s in range(splits):
            k0, k1 = s * k_step, min(K, (s + 1) * k_step)
            reads = [lw.region(x, None, None if norm else (k0, k1)), lw.region(w, (n0, n1), (k0, k1))]
            reads += [lw.region(w_up, (n0, n1), (k0, k1))] if w_up else []
            reads += [lw.region(norm)] if norm else []
            if part:
                writes = [lw.region(part, (s, s + 1), None, (n0, n1))]
            else:
                reads += [lw.region(res, None, (n0, n1))] if res else []
                writes = [lw.region(yb, None, (n0, n1))]
            coords = {"n": n, "k": s} if part else {"n": n}
            lw.task("linear", coords, reads, writes, counter,
                    dict(base, y=part or yb, y_offset=s * T * N if part else None, y_stride=N,
                         res=None if part else (res and lw.buf[res]), res_stride=N if res and not part else None,
                         n0=n0, n1=n1, k0=k0, k1=k1, split=s if part else None))
    if not part:
        lw.produce(lw.region(yb), counter)
        return
    lw.produce(lw.region(part), counter)
    for n in range(n_tiles):
        n0, n1 = n * bn, min(N, (n + 1) * bn)
        reads = [lw.region(part, None, None, (n0, n1))] + ([lw.region(res, None, (n0, n1))] if res else [])
        lw.task("linear_reduce", {"n": n}, reads, [lw.region(yb, None, (n0, n1))], f"c.{yb}",
                dict(op=op, part=part, n_split=splits, split_stride=T * N, res=res and lw.buf[res], y=yb,
                     y_stride=N, n0=n0, n1=n1, n_dim=N, n_rows=T))
    lw.produce(lw.region(yb), f"c.{yb}")


def lower_linear(lw: Lowering, op: Op):
    from .lower_attn import is_ctx_projection
    if is_ctx_projection(lw, op):
        return                        # lowered with its kv_write (qkv_rope_kv without q)
    emit_linear(lw, op.args[0], lw.weight(op.args[1]), op.out.name, norm=op.kwarg("norm") and
                lw.weight(op.kwarg("norm")), res=op.kwarg("residual"), eps=op.attrs.get("eps"),
                op=op.out.name[1:])


def lower_swiglu(lw: Lowering, op: Op):
    """gate/up (+ norm prologue, SwiGLU epilogue) N tiles over I, then down (+ residual)."""
    x, wg, wu, wd = op.args
    T = lw.shape(x)[0]
    inter = lw.types[wg].shape[0]
    act = "%" + op.out.name[1:] + ".act"
    lw.types[act] = type(lw.types[x])(lw.types[x].dtype, (T, inter))
    lw.value_buffer(act)
    norm = op.kwarg("norm") and lw.weight(op.kwarg("norm"))
    emit_linear(lw, x, lw.weight(wg), act, w_up=lw.weight(wu), norm=norm, eps=op.attrs.get("eps"),
                op=op.out.name[1:] + ".gate_up")
    emit_linear(lw, act, lw.weight(wd), op.out.name, res=op.kwarg("residual"),
                op=op.out.name[1:] + ".down")


def lower_embed(lw: Lowering, op: Op):
    """The token rows' embedding: one task, or (LowerOptions.embed_cols > 0) one task per
    embed_cols columns of the rows, so that no program walks a whole row on the step's chain."""
    ids, table = op.args
    T, D = op.out.type.shape
    cols = lw.options.embed_cols
    cols = D if cols <= 0 else cols
    mask = op.kwarg("mask")
    out = lw.value_buffer(op.out.name)
    for j, d0 in enumerate(range(0, D, cols)):
        d1 = min(D, d0 + cols)
        reads = [lw.region(ids), lw.region(lw.weight(table), (0, T, "ids"), (d0, d1))]
        reads += [lw.region(lw.weight(mask), (d0, d1))] if mask else []
        lw.task("embed", {"row": 0} if cols >= D else {"row": 0, "d": j}, reads,
                [lw.region(out, None, (d0, d1))], f"c.{out}",
                dict(op=out, ids=lw.buf[ids], table=lw.weight(table), mask_row=mask and lw.weight(mask),
                     mask_id=op.attrs.get("mask_token_id"), out=out, n_rows=T, dim=D, row0=0, d0=d0, d1=d1))
    lw.produce(lw.region(out), f"c.{out}")


def lower_concat(lw: Lowering, op: Op):
    """Concat along columns (the taps): linear_reduce copies of N tiles into the destination."""
    if op.attrs.get("axis") != 1:
        raise IRError(f"lowering: concat {op.out.name} along axis {op.attrs.get('axis')}: only column "
                      f"concat (axis=1) or the in-place block assembly is lowered")
    dst = lw.value_buffer(op.out.name)
    T = op.out.type.shape[0]
    off, bn = 0, lw.options.block_n
    for j, src in enumerate(op.args):
        width = lw.shape(src)[1]
        for n in range(_cdiv(width, bn)):
            n0, n1 = n * bn, min(width, (n + 1) * bn)
            lw.task("linear_reduce", {"part": j, "n": n}, [lw.region(src, None, (n0, n1))],
                    [lw.region(dst, None, (off + n0, off + n1))], f"c.{dst}",
                    dict(op=dst, part=lw.buf[src], n_split=1, split_stride=0, y=dst, y_offset=off,
                         y_stride=op.out.type.shape[1], n0=n0, n1=n1, n_dim=width, n_rows=T))
        off += width
    lw.produce(lw.region(dst), f"c.{dst}")


def plan_block_assembly(lw: Lowering):
    """concat(slice(state, 0:a), slice(y, a:b), ...) on axis 0 -> in place in the state buffer.

    The result aliases the state input; the producer of each later piece writes its
    rows straight into that buffer (lw.redirect), and the slices/concat vanish.
    """
    for op in lw.graph.ops:
        if op.kind is not OpKind.CONCAT or op.attrs.get("axis") != 0:
            continue
        pieces, off = [], 0
        for a in op.args:
            src = next((s for s in lw.graph.ops if a in (v.name for v in s.outputs)), None)
            if src is None or src.kind is not OpKind.SLICE or src.attrs.get("start") != off:
                break
            pieces.append((src, src.args[0], off, src.attrs["stop"]))
            off = src.attrs["stop"]
        else:
            first = pieces[0][1] if pieces else None
            if first in lw.buf and lw.tp.buffers[lw.buf[first]].kind == "state" and \
                    lw.types[first] == op.out.type:
                lw.buf[op.out.name] = lw.buf[first]
                for sl, src, start, stop in pieces[1:]:
                    lw.redirect[src] = (lw.buf[first], start, stop)
                for sl, *_ in pieces:
                    lw.done.add(id(sl))
                lw.done.add(id(op))


def lower_slice(lw: Lowering, op: Op):
    raise IRError(f"lowering: slice {op.out.name} is only lowered as part of an in-place block "
                  f"assembly (concat of row slices into a state input)")


def lower_lm_head(lw: Lowering, op: Op):
    users = lw.consumers.get(op.out.name, [])
    if len(users) != 1 or users[0].kind is not OpKind.SAMPLE:
        raise IRError(f"lowering: lm_head {op.out.name} must feed exactly one sample op")


def lower_sample(lw: Lowering, op: Op):
    """LM head tiles over the vocabulary (per-tile best key) + one sample_reduce."""
    logits = op.args[0]
    head = next(o for o in lw.graph.ops if o.outputs[0].name == logits)
    if head.kind is not OpKind.LM_HEAD:
        raise IRError(f"lowering: sample {op.out.name} reads {logits}, expected an lm_head output")
    x, w = head.args[0], lw.weight(head.args[1])
    D = lw.shape(x)[1]
    norm = head.kwarg("norm") and lw.weight(head.kwarg("norm"))
    T, V = lw.shape(logits)
    dst, r0, r1 = lw.redirect.get(op.out.name, (None, 0, T))
    vb = (balance(V, lw.programs, D * 2, quantum=lw.options.vocab_quantum)[0] if lw.programs
          else lw.options.vocab_block)
    n_tiles = _cdiv(V, vb)
    lb = lw.value_buffer(logits)
    key = lw.add_buffer(f"{lb}.tile_key", "fp32", (T, n_tiles), "scratch")
    arg = lw.add_buffer(f"{lb}.tile_arg", "int32", (T, n_tiles), "scratch")
    scalars = {}
    scalar_regions = []
    for role, v in zip(("pos", "seed", "temperature", "top_p"), op.args[1:]):
        scalars[role], regions = lw.scalar_reads(v)
        scalar_regions += regions
    for t in range(n_tiles):
        n0, n1 = t * vb, min(V, (t + 1) * vb)
        reads = [lw.region(x, (r0, r1)), lw.region(w, (n0, n1))] + ([lw.region(norm)] if norm else [])
        writes = [lw.region(lb, (r0, r1), (n0, n1)), lw.region(key, (r0, r1), (t, t + 1)),
                  lw.region(arg, (r0, r1), (t, t + 1))]
        lw.task("lm_head", {"tile": t}, reads + scalar_regions, writes, f"c.{lb}",
                dict(op=lb, x=lw.buf[x], x_offset=r0 * D, x_stride=D, w=w, norm=norm, eps=head.attrs.get("eps"),
                     dim=D, logits=lb, logits_offset=r0 * V, tile_key=key, tile_arg=arg,
                     tile_key_offset=r0 * n_tiles, tile_arg_offset=r0 * n_tiles, tile=t, n0=n0, n1=n1,
                     vocab=V, n_tiles=n_tiles, row0=r0, n_rows=r1 - r0,
                     pos_shift=op.attrs.get("offset", 0) + r0, **scalars))
    for region in (lw.region(lb), lw.region(key), lw.region(arg)):
        lw.produce(region, f"c.{lb}")
    out = dst or lw.value_buffer(op.out.name)
    # top-p sampling re-reads the rows' logits (position state.pos + row + pos_shift)
    lw.task("sample_reduce", {"block": 0},
            [lw.region(key, (r0, r1)), lw.region(arg, (r0, r1)), lw.region(lb, (r0, r1))] + scalar_regions,
            [lw.region(out, (r0, r1))], f"c.{op.out.name[1:]}",
            dict(op=op.out.name[1:], tile_key=key, tile_key_offset=r0 * n_tiles, tile_arg=arg,
                 tile_arg_offset=r0 * n_tiles, n_tiles=n_tiles, out=out, out_offset=r0, row0=r0,
                 n_rows=r1 - r0, logits=lb, logits_offset=r0 * V, vocab=V,
                 pos_shift=op.attrs.get("offset", 0) + r0, **scalars))
    lw.produce(lw.region(out, (r0, r1)), f"c.{op.out.name[1:]}")
    lw.done.add(id(head))


def folded_into_accept(lw: Lowering, op: Op):
    raise IRError(f"lowering: kv_commit {op.out.name} must follow the accept op that makes its count")


def lower_accept(lw: Lowering, op: Op):
    """DFlash acceptance + KV commit + next-step inputs: one task."""
    block, posterior = op.args
    acc, tokens, next_block = (v.name for v in op.outputs)
    commit = next((o for o in lw.consumers.get(acc, []) if o.kind is OpKind.KV_COMMIT), None)
    reads = [lw.region(block), lw.region(posterior)]
    writes = [lw.region(lw.value_buffer(v)) for v in (acc, tokens, next_block)]
    attrs = dict(op="accept", block=lw.buf[block], draft_tok=lw.buf[block], post_tok=lw.buf[posterior],
                 acc=lw.buf[acc], out_tokens=lw.buf[tokens], next_block=lw.buf[next_block],
                 mask_id=op.attrs.get("mask_token_id"), n_block=lw.shape(block)[0])
    if commit is not None:
        pos_expr, pos_regions = lw.scalar_reads(commit.args[0])
        reads += pos_regions
        writes += [lw.region(lw.value_buffer(v.name)) for v in commit.outputs]
        attrs.update(pos=pos_expr, next_pos=lw.buf[commit.outputs[0].name],
                     next_n_new=lw.buf[commit.outputs[1].name])
        lw.done.add(id(commit))
    lw.task("accept", {"step": 0}, reads, writes, "c.accept", attrs)
    for r in writes:
        lw.produce(r, "c.accept")
