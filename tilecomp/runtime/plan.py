"""The engine's direct lowering: model config -> task records of one step, in stages.

A stage is a set of independent tasks (the heads of one projection, the
chunks of one attention, the tiles of the LM head). Every task of stage s
waits until stage s-1 has fully signalled, so stages form one barrier chain:
each program's queue follows the global stage order (no deadlock when all
programs are co-resident) and with one program every wait points to an
earlier task (the interpreter order). Activations are fp32 rows in the f32
arena; the step state (layout.STATE_FIELDS) is in the i32 arena.

Shape legend: T rows of the step (block size S for decode, chunk for prefill),
D hidden, V vocab, H query heads, G kv heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tilecomp.codegen.layout import STATE, TaskRecord, float_bits

from .buffers import ArenaBuilder


@dataclass
class Stages:
    names: list[str] = field(default_factory=list)
    tasks: list[list[TaskRecord]] = field(default_factory=list)

    def add(self, name: str, records: list[TaskRecord]):
        if records:
            self.names.append(name)
            self.tasks.append(records)

    def queues(self, programs: int) -> tuple[list[list[TaskRecord]], list[str], dict[int, str]]:
        """Barrier chain + round-robin placement -> (queues, counter names, task names)."""
        queues: list[list[TaskRecord]] = [[] for _ in range(programs)]
        task_names, task_id = {}, 0
        for s, records in enumerate(self.tasks):
            for i, rec in enumerate(records):
                rec.task = task_id
                task_names[task_id] = f"{rec.kind} [{self.names[s]} #{i}]"
                task_id += 1
                rec.waits = [(s - 1, len(self.tasks[s - 1]), len(self.tasks[s - 1]))] if s else []
                rec.signals = [s]
                queues[i % programs].append(rec)
        return queues, list(self.names), task_names


class StepPlanner:
    """Records of one step over the arena slots of `b` (weights already added)."""

    def __init__(self, b: ArenaBuilder, cfg, dcfg, rows: int, ring_rows: int, max_len: int,
                 consts: dict, chunk_len: int | None = None, qkv_q_heads: int | None = None):
        self.b, self.cfg, self.dcfg, self.T, self.max_len = b, cfg, dcfg, rows, max_len
        self.qkv_q_heads = qkv_q_heads
        self.ring_rows = ring_rows
        self.BN, self.chunk_len = consts["BLOCK_N"], chunk_len
        self.D, self.eps = cfg.hidden_size, float_bits(cfg.layernorm_epsilon)
        self.st = b.offset("state")
        self.stages = Stages()

    def o(self, name: str) -> int:
        return self.b.offset(name)

    # -- building blocks ---------------------------------------------------------------------
    def linear(self, name, x, w, n_dim, k_dim, y, *, x_stride=None, norm=-1, res=-1, w_up=-1,
               rows_n=None, rows=-1, y_stride=None, eps=None):
        recs = [TaskRecord("linear", 0, dict(
            x=x, x_stride=x_stride or k_dim, w=w, w_up=w_up, k_dim=k_dim, n_dim=n_dim, n0=n0,
            k0=0, k1=k_dim, norm=norm, eps_bits=self.eps if eps is None else eps, bias=-1,
            res=res, res_stride=y_stride or n_dim, y=y, y_stride=y_stride or n_dim,
            n_rows=self.T if rows_n is None else rows_n, rows=rows))
            for n0 in range(0, n_dim, self.BN)]
        self.stages.add(name, recs)

    def qkv(self, name, x, spec, wq, wk, wv, q_out, kc, vc, ring, *, norm, eps, theta, v_scale,
            pos, rows_n=None, rows=-1, x_stride=None):
        """Per KV head one task (its query heads, k, v); with `qkv_q_heads` set, one task for
        k/v and one per `qkv_q_heads` query heads (more, smaller tasks to spread over the SMs)."""
        args = dict(x=x, x_stride=x_stride or self.D, norm=norm, eps_bits=eps, wq=wq, wk=wk, wv=wv,
                    q_out=q_out, k_cache=kc, v_cache=vc, n_heads_q=spec[0], n_kv_heads=spec[1],
                    head_dim=spec[2], v_head_dim=spec[3], rope_dim=spec[4],
                    theta_bits=float_bits(theta), v_scale_bits=float_bits(v_scale), dim=self.D,
                    pos=pos, ring=ring, n_rows=self.T if rows_n is None else rows_n, rows=rows,
                    q_head0=0, q_heads=0)
        G, n = spec[0] // spec[1], self.qkv_q_heads
        recs = []
        for g in range(spec[1]):
            if not n or n >= G or wq < 0:
                recs.append(TaskRecord("qkv_rope_kv", 0, dict(args, head=g)))
                continue
            if wk >= 0:                                       # k/v and the cache write
                recs.append(TaskRecord("qkv_rope_kv", 0, dict(args, head=g, wq=-1)))
            recs += [TaskRecord("qkv_rope_kv", 0, dict(args, head=g, wk=-1, wv=-1, q_head0=h0,
                                                       q_heads=min(n, G - h0)))
                     for h0 in range(0, G, n)]
        self.stages.add(name, recs)

    def attention(self, name, q, spec, kc, vc, ring, out, *, window, causal, sink, scale, span):
        H, G, hd, vd = spec[:4]
        chunk_len = self.chunk_len or span          # None: one chunk over the whole span
        n_chunks = -(-span // chunk_len)
        args = dict(q=q, k_cache=kc, v_cache=vc, part_m=self.o("part_m"), part_l=self.o("part_l"),
                    part_acc=self.o("part_acc"), chunk_len=chunk_len, n_heads_q=H,
                    n_kv_heads=G, head_dim=hd, v_head_dim=vd, window=window or 0,
                    causal=int(causal), pos=self.st + STATE["pos"], ring=ring,
                    scale_bits=float_bits(scale), n_rows=self.T)
        self.stages.add(name + ".partial", [TaskRecord("attn_partial", 0, dict(args, head=g, chunk=c))
                                            for g in range(G) for c in range(n_chunks)])
        self.stages.add(name + ".reduce", [TaskRecord("attn_reduce", 0, dict(
            part_m=self.o("part_m"), part_l=self.o("part_l"), part_acc=self.o("part_acc"),
            sink=sink, out=out, head=g, n_chunks=n_chunks, n_heads_q=H, n_kv_heads=G,
            v_head_dim=vd, n_rows=self.T)) for g in range(G)])

    def moe(self, name, i, x, res, y):
        cfg, p = self.cfg, f"model.layers.{i}.mlp."
        E, F_, slots = cfg.n_routed_experts, cfg.moe_intermediate_size, self.n_slots()
        rsf = cfg.routed_scaling_factor
        self.stages.add(name + ".route", [TaskRecord("moe_route", 0, dict(
            x=x, norm=self.o(f"model.layers.{i}.post_attention_layernorm.weight"), eps_bits=self.eps,
            gate=self.o(p + "gate.weight"), bias=self.o(p + "gate.e_score_correction_bias"),
            xn=self.o("xn"), plan=self.o("plan"), weights=self.o("route_w"), n_experts=E,
            top_k=cfg.num_experts_per_tok, scale_bits=float_bits(1.0 if rsf is None else rsf),
            norm_topk=int(cfg.norm_topk_prob), dim=self.D, n_rows=self.T))])
        ex = p + "experts."
        self.stages.add(name + ".up_gate", [TaskRecord("expert_up_gate", 0, dict(
            x=self.o("xn"), plan=self.o("plan"), gate_blocks=self.o(ex + "gate_proj_blocks"),
            gate_scales=self.o(ex + "gate_proj_scales"), up_blocks=self.o(ex + "up_proj_blocks"),
            up_scales=self.o(ex + "up_proj_scales"), act=self.o("expert_act"), slot=s, n0=n0,
            inter=F_, dim=self.D, n_rows=self.T)) for s in range(slots) for n0 in range(0, F_, self.BN)])
        self.stages.add(name + ".down", [TaskRecord("expert_down", 0, dict(
            act=self.o("expert_act"), plan=self.o("plan"), weights=self.o("route_w"),
            blocks=self.o(ex + "down_proj_blocks"), scales=self.o(ex + "down_proj_scales"),
            out=self.o("expert_out"), slot=s, n0=n0, inter=F_, dim=self.D, n_rows=self.T))
            for s in range(slots) for n0 in range(0, self.D, self.BN)])
        self.stages.add(name + ".combine", [TaskRecord("moe_combine", 0, dict(
            part=self.o("expert_out"), plan=self.o("plan"), n_slots=slots, res=res, y=y, n0=n0,
            dim=self.D, n_rows=self.T)) for n0 in range(0, self.D, self.BN)])

    def n_slots(self) -> int:
        return min(self.cfg.n_routed_experts, self.T * self.cfg.num_experts_per_tok)

    def head(self, name, x, norm, out, *, pos_shift, rows_n, eps):
        V = self.cfg.vocab_size
        n_tiles = -(-V // self.BN)
        self.stages.add(name, [TaskRecord("lm_head", 0, dict(
            x=x, x_stride=self.D, norm=norm, eps_bits=eps, w=self.o("lm_head.weight"), dim=self.D,
            vocab=V, n0=t * self.BN, logits=self.o("logits"), tile_key=self.o("tile_key"),
            tile_arg=self.o("tile_arg"), tile=t, n_tiles=n_tiles, state=self.st,
            pos_shift=pos_shift, n_rows=rows_n, rows=-1)) for t in range(n_tiles)])
        self.stages.add(name + ".sample", [TaskRecord("sample_reduce", 0, dict(
            tile_key=self.o("tile_key"), tile_arg=self.o("tile_arg"), n_tiles=n_tiles, out=out,
            n_rows=rows_n, logits=self.o("logits"), vocab=V, state=self.st, pos_shift=pos_shift))])

    # -- the target forward over T rows --------------------------------------------------------
    def target_forward(self, ids, *, taps: bool):
        cfg, D = self.cfg, self.D
        self.stages.add("embed", [TaskRecord("embed", 0, dict(
            ids=ids, table=self.o("model.embed_tokens.weight"), mask_row=-1, mask_id=-1,
            out=self.o("h0"), n_rows=self.T, dim=D, row0=0))])
        h, other = "h0", "h1"
        tap_ids = list(self.dcfg.target_layer_ids) if taps else []
        for i in range(cfg.num_hidden_layers):
            s, p = cfg.attn(i), f"model.layers.{i}."
            spec = (s.n_heads, s.n_kv_heads, s.head_dim, s.v_head_dim, s.rope_dim)
            ring = self.ring(s.window)
            kc, vc = self.o(f"kv.{i}.k"), self.o(f"kv.{i}.v")
            self.qkv(f"L{i}.qkv", self.o(h), spec, *(self.o(p + f"self_attn.{n}_proj.weight")
                                                    for n in "qkv"),
                     self.o("q"), kc, vc, ring, norm=self.o(p + "input_layernorm.weight"),
                     eps=self.eps, theta=s.rope_theta, pos=self.st + STATE["pos"],
                     v_scale=1.0 if cfg.attention_value_scale is None else cfg.attention_value_scale)
            sink = self.o(p + "self_attn.attention_sink_bias") if s.has_sink else -1
            span = self.max_len if s.window is None else s.window + self.ring_rows
            self.attention(f"L{i}.attn", self.o("q"), spec, kc, vc, ring, self.o("attn"),
                           window=s.window, causal=True, sink=sink, scale=s.head_dim ** -0.5,
                           span=span)
            self.linear(f"L{i}.o_proj", self.o("attn"), self.o(p + "self_attn.o_proj.weight"), D,
                        s.n_heads * s.v_head_dim, self.o("h_mid"), res=self.o(h))
            if cfg.is_moe(i):
                self.moe(f"L{i}.moe", i, self.o("h_mid"), self.o("h_mid"), self.o(other))
            else:
                self.linear(f"L{i}.mlp.gate_up", self.o("h_mid"), self.o(p + "mlp.gate_proj.weight"),
                            cfg.intermediate_size, D, self.o("mlp_act"),
                            w_up=self.o(p + "mlp.up_proj.weight"),
                            norm=self.o(p + "post_attention_layernorm.weight"))
                self.linear(f"L{i}.mlp.down", self.o("mlp_act"), self.o(p + "mlp.down_proj.weight"),
                            D, cfg.intermediate_size, self.o(other), res=self.o("h_mid"))
            if i in tap_ids:
                j = tap_ids.index(i)
                self.stages.add(f"L{i}.tap", [TaskRecord("linear_reduce", 0, dict(
                    part=self.o(other), n_split=1, split_stride=0, n_dim=D, n0=n0, res=-1,
                    y=self.o("taps") + j * D, y_stride=len(tap_ids) * D, n_rows=self.T, rows=-1))
                    for n0 in range(0, D, self.BN)])
            h, other = other, h
        return h

    def ring(self, window) -> int:
        return self.max_len if window is None else min(self.max_len, window + self.ring_rows)

    # -- the draft -----------------------------------------------------------------------------
    def draft_context(self, *, rows_n=None, rows=-1, pos_field="ctx_pos"):
        """New context rows (taps) -> fc -> hidden_norm -> k/v of every draft layer."""
        d, D = self.dcfg, self.D
        n_taps = len(d.target_layer_ids)
        eps = float_bits(d.layernorm_epsilon)
        self.linear("draft.fc", self.o("taps"), self.o("draft.fc.weight"), D, n_taps * D,
                    self.o("ctx"), rows_n=rows_n, rows=rows)
        spec = (d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.head_dim, d.head_dim)
        for j in range(d.num_hidden_layers):
            p = f"draft.layers.{j}.self_attn."
            self.qkv(f"draft.L{j}.ctx_kv", self.o("ctx"), spec, -1, self.o(p + "k_proj.weight"),
                     self.o(p + "v_proj.weight"), -1, self.o(f"dkv.{j}.k"), self.o(f"dkv.{j}.v"),
                     self.max_len, norm=self.o("draft.hidden_norm.weight"), eps=eps,
                     theta=d.rope_theta, v_scale=1.0, pos=self.st + STATE[pos_field],
                     rows_n=rows_n, rows=rows)

    def draft_block(self):
        """Draft forward over [last, MASK x (S-1)] -> block[1:] sampled (rows 1..S-1)."""
        d, D = self.dcfg, self.D
        eps = float_bits(d.layernorm_epsilon)
        self.stages.add("draft.embed", [TaskRecord("embed", 0, dict(
            ids=self.o("draft_block"), table=self.o("model.embed_tokens.weight"),
            mask_row=self.o("draft.mask_embedding"), mask_id=d.mask_token_id, out=self.o("h0"),
            n_rows=self.T, dim=D, row0=0))])
        spec = (d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.head_dim, d.head_dim)
        h, other = "h0", "h1"
        for j in range(d.num_hidden_layers):
            p = f"draft.layers.{j}."
            kc, vc = self.o(f"dkv.{j}.k"), self.o(f"dkv.{j}.v")
            self.qkv(f"draft.L{j}.qkv", self.o(h), spec,
                     *(self.o(p + f"self_attn.{n}_proj.weight") for n in "qkv"), self.o("q"), kc,
                     vc, self.max_len, norm=self.o(p + "input_layernorm.weight"), eps=eps,
                     theta=d.rope_theta, v_scale=1.0, pos=self.st + STATE["pos"])
            self.attention(f"draft.L{j}.attn", self.o("q"), spec, kc, vc, self.max_len,
                           self.o("attn"), window=d.sliding_window, causal=False, sink=-1,
                           scale=d.head_dim ** -0.5, span=d.sliding_window + self.T)
            self.linear(f"draft.L{j}.o_proj", self.o("attn"), self.o(p + "self_attn.o_proj.weight"),
                        D, d.num_attention_heads * d.head_dim, self.o("h_mid"), res=self.o(h))
            self.linear(f"draft.L{j}.mlp.gate_up", self.o("h_mid"), self.o(p + "mlp.gate_proj.weight"),
                        d.intermediate_size, D, self.o("mlp_act"), w_up=self.o(p + "mlp.up_proj.weight"),
                        norm=self.o(p + "post_attention_layernorm.weight"), eps=eps)
            self.linear(f"draft.L{j}.mlp.down", self.o("mlp_act"), self.o(p + "mlp.down_proj.weight"),
                        D, d.intermediate_size, self.o(other), res=self.o("h_mid"))
            h, other = other, h
        self.head("draft.lm_head", self.o(h) + D, self.o("draft.norm.weight"), self.o("block") + 1,
                  pos_shift=1, rows_n=self.T - 1, eps=eps)


def reserve_activations(b: ArenaBuilder, cfg, dcfg, rows: int, max_len: int, block: int,
                        chunk_len: int | None):
    """Activation, scratch, KV and state slots shared by every step program."""
    D, V, T = cfg.hidden_size, cfg.vocab_size, rows
    heads = [cfg.attn(i) for i in range(cfg.num_hidden_layers)]
    H = max([s.n_heads for s in heads] + ([dcfg.num_attention_heads] if dcfg else []))
    hd = max([s.head_dim for s in heads] + ([dcfg.head_dim] if dcfg else []))
    inter = max(cfg.intermediate_size, dcfg.intermediate_size if dcfg else 0)
    slots = min(cfg.n_routed_experts, T * cfg.num_experts_per_tok)
    chunks = -(-max_len // chunk_len) if chunk_len else 1
    for name, shape in (("h0", (T, D)), ("h1", (T, D)), ("h_mid", (T, D)), ("q", (T, H * hd)),
                        ("attn", (T, H * hd)), ("mlp_act", (T, inter)), ("xn", (T, D)),
                        ("route_w", (slots, T)), ("expert_act", (slots, T, cfg.moe_intermediate_size)),
                        ("expert_out", (slots, T, D)), ("logits", (T, V)),
                        ("tile_key", (T, -(-V // 16))), ("part_m", (chunks, H, T)),
                        ("part_l", (chunks, H, T)), ("part_acc", (chunks, H, T, hd)),
                        ("ctx", (T, D))):
        b.reserve(name, shape, "f32")
    b.reserve("tile_arg", (T, -(-V // 16)), "i32")
    for name, shape in (("plan", (1 + slots,)), ("block", (block,)), ("draft_block", (block,)),
                        ("post_tok", (T,)), ("out_tokens", (block,)), ("prompt", (T,)),
                        ("state", (16,))):
        b.reserve(name, shape, "i32")
    n_taps = len(dcfg.target_layer_ids) if dcfg else 0
    b.reserve("taps", (T, max(n_taps, 1) * D), "f32")
    for i, s in enumerate(heads):
        ring = max_len if s.window is None else min(max_len, s.window + T)
        b.reserve(f"kv.{i}.k", (s.n_kv_heads, ring, s.head_dim), "w")
        b.reserve(f"kv.{i}.v", (s.n_kv_heads, ring, s.v_head_dim), "w")
    for j in range(dcfg.num_hidden_layers if dcfg else 0):
        b.reserve(f"dkv.{j}.k", (dcfg.num_key_value_heads, max_len, dcfg.head_dim), "w")
        b.reserve(f"dkv.{j}.v", (dcfg.num_key_value_heads, max_len, dcfg.head_dim), "w")
