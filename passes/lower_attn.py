"""Lowering of attention: QKV projection + RoPE + KV write per KV head, the draft's
context K/V (linear [+ rope] + kv_write pairs), and flash-decoding attention.

Shape legend: T rows, D hidden, Hq query heads, Hkv KV heads (G = Hq / Hkv per
group), Dqk / Dv head dims, C cache slots (ring), Ck KV positions per chunk.
"""
from __future__ import annotations

from tilecomp.errors import IRError
from tilecomp.ir.graph import Op, OpKind

from .lower import Lowering, _cdiv

# kv_chunk 0: chunk lengths are multiples of this many keys (a run-time split's record carries
# chunk_len = -KV_CHUNK_MIN: attn_partial rounds its run-time length up to a multiple of it)
KV_CHUNK_MIN = 32


def _producer(lw: Lowering, value: str) -> Op | None:
    return lw.defs.get(value)


def _only_user(lw: Lowering, value: str, kind: OpKind) -> Op | None:
    users = lw.consumers.get(value, [])
    return users[0] if len(users) == 1 and users[0].kind is kind else None


def is_ctx_projection(lw: Lowering, op: Op) -> bool:
    """linear -> [rope ->] kv_write: the draft's context K/V, lowered at the kv_write."""
    out = op.out.name
    rope = _only_user(lw, out, OpKind.ROPE)
    if rope is not None:
        return _only_user(lw, rope.out.name, OpKind.KV_WRITE) is not None
    write = _only_user(lw, out, OpKind.KV_WRITE)
    return write is not None and write.args[1] == out


def defer_to_kv_write(lw: Lowering, op: Op):
    if _only_user(lw, op.out.name, OpKind.KV_WRITE) is None:
        raise IRError(f"lowering: rope {op.out.name} is only lowered in front of a kv_write")


def _ctx_source(lw: Lowering, write: Op) -> tuple[Op, Op | None]:
    x = write.args[1]
    src = _producer(lw, x)
    rope = src if src is not None and src.kind is OpKind.ROPE else None
    lin = _producer(lw, rope.args[0]) if rope else src
    if lin is None or lin.kind is not OpKind.LINEAR:
        raise IRError(f"lowering: kv_write {write.out.name} writes {x}, expected a linear (+ rope) output")
    return lin, rope


def lower_kv_write(lw: Lowering, op: Op):
    """Pair the K write (roped) with the V write of the same projection input; emit both."""
    lin, rope = _ctx_source(lw, op)
    key = (lin.args[0], lin.kwarg("norm"), op.args[2], op.kwarg("count"))
    queue = lw.pending_kv.setdefault(key, [])
    partner = next((p for p in queue if (p[1] is None) != (rope is None)), None)
    if partner is None:
        queue.append((op, rope, lin))
        return
    queue.remove(partner)
    k_write, k_rope, k_lin = (op, rope, lin) if rope is not None else partner
    v_write, _, v_lin = partner if rope is not None else (op, rope, lin)
    _emit_ctx_kv(lw, k_write, k_rope, k_lin, v_write, v_lin)


def _kv_part(lw: Lowering, which: str, g: int, wk: str, wv: str, kc: str, vc: str, T: int,
             k_rows: tuple[int, int] | None = None):
    """(reads, writes, record args) of the k and / or v projection ("k" / "v" in `which`) of KV
    head g: weight rows and cache rows of the block's T positions; k_rows limits k to those rows
    of the head (its rotary rows or the others), or, for a v-only part, v to those rows."""
    hd, vd = lw.tp.buffers[kc].shape[2], lw.tp.buffers[vc].shape[2]
    r0, r1 = k_rows or (0, hd)
    v0, v1 = (r0, r1) if which == "v" and k_rows else (0, vd)     # a v-only part's rows
    reads, writes, args = [], [], dict(wk=None, wv=None, k_cache=None, v_cache=None)
    if "k" in which:
        reads.append(lw.region(wk, (g * hd + r0, g * hd + r1)))
        writes.append(lw.region(kc, (g, g + 1), (0, T, "pos"), (r0, r1)))
        args.update(wk=wk, k_cache=kc)
    if "v" in which:
        reads.append(lw.region(wv, (g * vd + v0, g * vd + v1)))
        writes.append(lw.region(vc, (g, g + 1), (0, T, "pos"), (v0, v1)))
        args.update(wv=wv, v_cache=vc)
    return reads, writes, args


def _emit_ctx_kv(lw: Lowering, kw: Op, rope: Op, klin: Op, vw: Op, vlin: Op):
    x = klin.args[0]
    T = lw.shape(x)[0]
    kc, vc = lw.buf[kw.args[0]], lw.buf[vw.args[0]]
    n_kv, _, hd = lw.tp.buffers[kc].shape
    vd = lw.tp.buffers[vc].shape[2]
    wk, wv = lw.weight(klin.args[1]), lw.weight(vlin.args[1])
    norm = klin.kwarg("norm") and lw.weight(klin.kwarg("norm"))
    pos, pos_regions = lw.scalar_reads(kw.args[2])
    rows, count_regions = lw.scalar_reads(kw.kwarg("count")) if kw.kwarg("count") else (None, [])
    D = lw.shape(x)[1]
    ring = lw.tp.buffers[kc].shape[1]
    signal = f"c.{kw.out.name[1:]}"
    split = bool(lw.options.qkv_split_kv and lw.options.qkv_q_heads)
    tasks = [(g, part, which) for g in range(n_kv) for part, which in enumerate(("k", "v") if split else ("kv",))]
    for g, part, which in tasks:
        kv_reads, writes, kv_args = _kv_part(lw, which, g, wk, wv, kc, vc, T)
        reads = [lw.region(x)] + kv_reads + ([lw.region(norm)] if norm else []) + pos_regions + count_regions
        coords = {"kv_head": g, "part": part} if split else {"kv_head": g}
        lw.task("qkv_rope_kv", coords, reads, writes, signal,
                dict(op=kw.out.name[1:], x=lw.buf[x], x_stride=D, norm=norm, eps=klin.attrs.get("eps"),
                     **kv_args, head=g, n_heads_q=0, n_kv_heads=n_kv, head_dim=hd,
                     v_head_dim=vd, rope_dim=rope.attrs["rope_dim"], theta=float(rope.attrs["theta"]),
                     v_scale=float(vw.attrs.get("value_scale", 1.0)), dim=D, pos=pos, ring=ring, rows=rows,
                     n_rows=T))
        for r in writes:
            lw.produce(r, signal)
    for o in (kw, vw, rope, klin, vlin):
        lw.done.add(id(o))


def _qkv_parts(G: int, per_task: int | None, split_kv: bool = False) -> list[tuple[int, int, str]]:
    """(first query head in the group, query heads, which of "kv" it writes) of each task of one
    KV head: the whole group in one task, or query heads per_task at a time plus a k/v task
    (split_kv: a k task and a v task, so no task streams more than one head's rows)."""
    if not per_task or per_task >= G:
        return [(0, G, "kv")]
    return [(h, min(per_task, G - h), "") for h in range(0, G, per_task)] + \
        ([(0, 0, "k"), (0, 0, "v")] if split_kv else [(0, 0, "kv")])


def _qkv_row_parts(G: int, hd: int, vd: int, rope: int, options) -> list[tuple]:
    """(first query head, query heads, "k" / "v" / "kv" / "", rope_part, (row0, row1), ranged) of
    each task of one KV head. qkv_split_rope: the rotary rows of each q / k head (rope_part 1)
    apart from the others (2). qkv_rows (with one query head per task and k / v split): besides,
    the other rows of each q / k head and the rows of v in chunks of at most qkv_rows rows
    (`ranged`: the task's row0 / row1 name them), so the phase is tasks of about one size that the
    scheduler can spread evenly over the programs."""
    base = _qkv_parts(G, options.qkv_q_heads, bool(options.qkv_split_kv))
    step = options.qkv_rows
    if step > 0 and options.qkv_q_heads == 1 and options.qkv_split_kv:
        out = []
        for h0, nq, kv in base:
            n = vd if kv == "v" else hd
            lo = 0 if kv == "v" else rope
            if kv != "v" and 0 < rope:
                out.append((h0, nq, kv, 1, (0, rope), False))
            out += [(h0, nq, kv, 2, (c, min(n, c + step)), True) for c in range(lo, n, step)]
        return out
    if options.qkv_split_rope and options.qkv_q_heads == 1 and 0 < rope < hd:
        # the rotary rows and the others of each q head and k head as tasks of their own; a
        # combined k / v task's v goes with k's other rows (projected and written once)
        return [(h0, nq, "k" if kv == "kv" and rp == 1 else kv, rp, (0, rope) if rp == 1 else (rope, hd), False)
                for h0, nq, kv in base for rp in ((1, 2) if nq or "k" in kv else (0,))]
    return [(h0, nq, kv, 0, (0, hd), False) for h0, nq, kv in base]


def span_cuts(lo: int, hi: int, span: int, hd: int, rd: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of a matrix whose heads of hd rows lie end to end, each head led by rd rotary
    rows, as ranges of at most `span` rows that never cut a head's rotary rows (a range that
    would ends before them; one that starts at them and is shorter takes them whole)."""
    out, start = [], lo
    while start < hi:
        end = min(hi, start + span)
        i = end % hd
        if end < hi and 0 < i < rd:
            end = end - i if end - i > start else end - i + rd
        out.append((start, end))
        start = end
    return out


def _qkv_span_tasks(lw: Lowering, g: int, common: dict, ws: tuple, G: int, q: str, kc: str, vc: str,
                    reads0: list, signal: str):
    """LowerOptions.qkv_span: KV group g's k rows, v rows and G query heads' rows, each cut by
    `span_cuts` into tasks of one matrix (rope_part 3, rows row0 .. row1 of the matrix): a flash
    q head of 192 rows is 1.5 tasks of 128 instead of two K-loop passes (a 64-row rotary chunk
    and a 128-row one). ws: the q, k and v weights."""
    wq, wk, wv = ws
    hd, vd, rope, T = common["head_dim"], common["v_head_dim"], common["rope_dim"], common["n_rows"]
    mats = [("k", wk, g * hd, (g + 1) * hd, hd, rope), ("v", wv, g * vd, (g + 1) * vd, vd, 0),
            ("q", wq, g * G * hd, (g + 1) * G * hd, hd, rope)]
    part = 0
    for which, w, lo, hi, n, rd in mats:
        for r0, r1 in span_cuts(lo, hi, lw.options.qkv_span, n, rd):
            if which == "q":
                writes, args = [lw.region(q, None, (r0, r1))], dict(wq=w, q_out=q)
            elif which == "k":
                writes, args = [lw.region(kc, (g, g + 1), (0, T, "pos"), (r0 - lo, r1 - lo))], dict(wk=w, k_cache=kc)
            else:
                writes, args = [lw.region(vc, (g, g + 1), (0, T, "pos"), (r0 - lo, r1 - lo))], dict(wv=w, v_cache=vc)
            lw.task("qkv_rope_kv", {"kv_head": g, "part": part}, [lw.region(common["x"]), lw.region(w, (r0, r1))] + reads0,
                    writes, signal, dict(common, **args, head=g, rope_part=3, row0=r0, row1=r1))
            part += 1


def lower_qkv(lw: Lowering, op: Op):
    """Per KV head: its G query heads, k and v rows, partial RoPE, cache write. With
    `qkv_q_heads` set, the query heads go in groups of that many per task and one more
    task does k/v + the cache write (finer tasks for big heads; all signal one counter);
    with `qkv_span`, tasks of one matrix's rows across heads (`_qkv_span_tasks`)."""
    x, wq, wk, wv, k_in, v_in, pos_v = op.args
    a = op.attrs
    hq, hkv, hd, vd = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["v_head_dim"]
    G = hq // hkv
    T = lw.shape(x)[0]
    q = lw.value_buffer(op.outputs[0].name)
    kc, vc = lw.buf[k_in], lw.buf[v_in]
    norm = op.kwarg("norm") and lw.weight(op.kwarg("norm"))
    pos, pos_regions = lw.scalar_reads(pos_v)
    rope = a["rope_dim"]
    common = dict(op=q, x=lw.buf[x], x_stride=lw.shape(x)[1], norm=norm, eps=a.get("eps"), n_heads_q=hq,
                  n_kv_heads=hkv, head_dim=hd, v_head_dim=vd, rope_dim=rope, theta=float(a["theta"]),
                  v_scale=float(a.get("value_scale", 1.0)), dim=lw.shape(x)[1], pos=pos,
                  ring=lw.tp.buffers[kc].shape[1], n_rows=T)
    reads0 = ([lw.region(norm)] if norm else []) + pos_regions
    ws = (lw.weight(wq), lw.weight(wk), lw.weight(wv))
    parts = None if lw.options.qkv_span > 0 else _qkv_row_parts(G, hd, vd, rope, lw.options)
    for g in range(hkv):
        signal = f"c.{q}.h{g}"
        if parts is None:
            _qkv_span_tasks(lw, g, common, ws, G, q, kc, vc, reads0, signal)
        for part, (h0, nq, kv, rp, (r0, r1), ranged) in enumerate(parts or []):
            cols = ((g * G + h0) * hd + r0, (g * G + h0 + nq - 1) * hd + r1) if nq else None
            kv_rows = (r0, r1) if kv != "v" or ranged else None      # v: only a ranged part's rows
            kv_reads, kv_writes, kv_args = _kv_part(lw, kv, g, ws[1], ws[2], kc, vc, T, kv_rows)
            reads = [lw.region(x)] + ([lw.region(ws[0], cols)] if nq else []) + kv_reads + reads0
            writes = ([lw.region(q, None, cols)] if nq else []) + kv_writes
            coords = {"kv_head": g, "part": part} if len(parts) > 1 else {"kv_head": g}
            lw.task("qkv_rope_kv", coords, reads, writes, signal,
                    dict(common, wq=ws[0] if nq else None, q_out=q if nq else None, **kv_args, head=g, q_head0=h0,
                         q_heads=nq, rope_part=rp, **(dict(row0=r0, row1=r1) if ranged else {})))
        for r in (lw.region(q, None, (g * G * hd, (g + 1) * G * hd)), lw.region(kc, (g, g + 1), (0, T, "pos")),
                  lw.region(vc, (g, g + 1), (0, T, "pos"))):
            lw.produce(r, signal)


def lower_attention(lw: Lowering, op: Op):
    """Flash decoding: attn_partial per (KV head, chunk) over the keys a query can see
    (the window only, for sliding-window attention), attn_reduce per KV head."""
    q, k, v, pos_v = op.args
    a = op.attrs
    hq, hkv, hd, vd = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["v_head_dim"]
    G, window = hq // hkv, a.get("window") or 0
    T = lw.shape(q)[0]
    kc, vc = lw.buf[k], lw.buf[v]
    C = lw.tp.buffers[kc].shape[1]
    ring_window = 0 < window and window + T < C       # keys live at a runtime offset in a big ring
    span = window + T if ring_window else C
    ck = lw.options.kv_chunk
    dynamic = False         # chunk length chosen at run time from the keys in view (chunk_len < 0)
    if ck <= 0:     # sized so the KV heads' chunks fill the programs (32-key multiples, at least 32)
        per_head = max(1, (lw.programs or 1) // hkv)
        ck = max(KV_CHUNK_MIN, _cdiv(_cdiv(span, per_head), KV_CHUNK_MIN) * KV_CHUNK_MIN)
        # the span is the most keys a query may see (a full layer's: the cache's capacity,
        # max_len, not the context), so the step splits the keys in view (lo .. pos + rows) over
        # these chunks at run time: as many tasks, each at most ck keys, balanced at any context
        dynamic = ck < span
    ck = min(ck, span)
    n_chunks = -(-span // ck)
    out = lw.value_buffer(op.out.name)
    m = lw.add_buffer(f"{out}.part_m", "fp32", (n_chunks, hq, T), "scratch")
    l_ = lw.add_buffer(f"{out}.part_l", "fp32", (n_chunks, hq, T), "scratch")
    acc = lw.add_buffer(f"{out}.part_acc", "fp32", (n_chunks, hq, T, vd), "scratch")
    pos, pos_regions = lw.scalar_reads(pos_v)
    common = dict(op=out, q=lw.buf[q], k_cache=kc, v_cache=vc, part_m=m, part_l=l_, part_acc=acc,
                  chunk_len=-KV_CHUNK_MIN if dynamic else ck, n_chunks=n_chunks, n_heads_q=hq,
                  n_kv_heads=hkv, head_dim=hd, v_head_dim=vd, window=window, causal=bool(a.get("causal", True)),
                  scale=float(a["scale"]), pos=pos, ring=C, n_rows=T)
    for g in range(hkv):
        heads = (g * G, (g + 1) * G)
        for c in range(n_chunks):
            if dynamic:     # where the chunk lies is known at run time only: ck keys at most
                keys = (0, ck, "kv_split")
            else:
                keys = (c * ck, min(span, (c + 1) * ck)) + (("window_start",) if ring_window else ())
            reads = [lw.region(q, None, (g * G * hd, (g + 1) * G * hd)),
                     lw.region(kc, (g, g + 1), keys), lw.region(vc, (g, g + 1), keys)] + pos_regions
            writes = [lw.region(m, (c, c + 1), heads), lw.region(l_, (c, c + 1), heads),
                      lw.region(acc, (c, c + 1), heads)]
            lw.task("attn_partial", {"kv_head": g, "chunk": c}, reads, writes, f"c.{out}.part.h{g}",
                    dict(common, head=g, chunk=c))
        for r in (lw.region(m, None, heads), lw.region(l_, None, heads), lw.region(acc, None, heads)):
            lw.produce(r, f"c.{out}.part.h{g}")
    sink = op.kwarg("sink") and lw.weight(op.kwarg("sink"))
    # query heads per reduce task: a group's merge reads n_chunks partials of every head, one row
    # tile of heads after another, so one task per group is a long loop on the step's chain
    # (LowerOptions.reduce_rows; with fold_reduce the merge goes into the last partial to arrive,
    # one per group)
    rows = lw.options.reduce_rows
    per = min(G, max(1, rows // T)) if rows > 0 and not lw.options.fold_reduce else G
    for g in range(hkv):
        for h0 in range(0, G, per):
            h1 = min(G, h0 + per)
            heads = (g * G + h0, g * G + h1)
            reads = [lw.region(m, None, heads), lw.region(l_, None, heads), lw.region(acc, None, heads)]
            reads += [lw.region(sink, heads)] if sink else []
            key = {"kv_head": g} if per == G else {"kv_head": g, "heads": h0}
            lw.task("attn_reduce", key, reads, [lw.region(out, None, (heads[0] * vd, heads[1] * vd))],
                    f"c.{out}", dict(common, sink=sink, out=out, head=g, h0=h0, h1=h1))
    lw.produce(lw.region(out), f"c.{out}")
