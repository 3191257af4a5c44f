"""Run the compiler's scheduled tile programs (schedule.ir) as the engine's step programs.

Task attrs carry the record args by name (layout.KINDS): a string names a tile
buffer (element offset of its arena slot, plus `<arg>_offset`), a float goes to
`<arg>_bits`, runtime scalars are state buffers (`pos`, `n_new`, `seed`,
`temperature`, `top_p`, and `pos - n_new`) that live in the engine's step-state
block. Buffers the engine already owns (KV caches, taps, block, state) alias its
slots, so the compiled prefill chunk and the compiled step share them.
"""
from __future__ import annotations

from tilecomp.codegen import layout as L
from tilecomp.errors import ScheduleError
from tilecomp.models.cache import ring_slots

from .buffers import ArenaBuilder

# runtime scalars of the tile program -> words of the step state
STATE_OF = {"pos": "pos", "n_new": "n_ctx", "seed": "seed", "temperature": "temp_bits",
            "top_p": "top_p_bits", "pos - n_new": "ctx_pos", "acc": "acc"}
# tile buffers the engine owns -> its slot names
ALIASES = {"block": "block", "taps": "taps", "tokens": "out_tokens", "posterior": "post_tok"}
# record args a body treats as absent when < 0; any other missing arg is 0
OPTIONAL_ARGS = {"norm", "bias", "res", "w_up", "rows", "wq", "wk", "wv", "q_out", "k_cache",
                 "v_cache", "sink", "mask_row", "mask_id", "logits", "draft_block", "xn", "gate",
                 "arrive", "sync"}
# record args that name a counter (its index in the counter array)
COUNTER_ARGS = {"arrive"}
FLOAT_ARGS = {"eps_bits": "eps", "theta_bits": "theta", "v_scale_bits": "v_scale",
              "scale_bits": "scale"}


def slot_of(name: str) -> str | None:
    """The engine slot a tile buffer aliases (None: the buffer gets its own slot)."""
    if name in ALIASES:
        return ALIASES[name]
    for prefix, slot in (("cache.k.", "kv.{}.k"), ("cache.v.", "kv.{}.v"),
                         ("draft_cache.k.", "dkv.{}.k"), ("draft_cache.v.", "dkv.{}.v")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return slot.format(name[len(prefix):])
    return None


def weight_slot(param: str) -> str:
    return "draft." + param[len("dflash."):] if param.startswith("dflash.") else param


def reserve_engine_slots(b: ArenaBuilder, cfg, dcfg, max_len: int, block: int):
    """The slots the engine owns (ALIASES and the KV caches the programs alias, the step state):
    every step program shares them, so the prompt's K/V, the taps and the state carry over.
    SWA caches are rings of window + block slots, as the traced programs lay them out."""
    b.reserve("state", (L.STATE_WORDS,), "i32")
    for name in ("block", "post_tok", "out_tokens"):
        b.reserve(name, (block,), "i32")
    if dcfg is not None:
        b.reserve("taps", (block, len(dcfg.target_layer_ids) * cfg.hidden_size), "f32")
    for i in range(cfg.num_hidden_layers):
        s = cfg.attn(i)
        ring = ring_slots(s.window, max_len, block)
        b.reserve(f"kv.{i}.k", (s.n_kv_heads, ring, s.head_dim), "w")
        b.reserve(f"kv.{i}.v", (s.n_kv_heads, ring, s.v_head_dim), "w")
    for j in range(dcfg.num_hidden_layers if dcfg is not None else 0):
        b.reserve(f"dkv.{j}.k", (dcfg.num_key_value_heads, max_len, dcfg.head_dim), "w")
        b.reserve(f"dkv.{j}.v", (dcfg.num_key_value_heads, max_len, dcfg.head_dim), "w")


def reserve_buffers(b: ArenaBuilder, *programs):
    """Slots for the tile programs' own activations and scratch (before the arenas are built).
    Programs never run at the same time, so a buffer name they share gets one slot, sized for
    the largest."""
    largest: dict[str, tuple[tuple[int, ...], str]] = {}
    for tp in programs:
        for buf in tp.buffers.values():
            if buf.kind == "weight" or buf.name in STATE_OF or slot_of(buf.name):
                continue
            # operand buffers are stored in the weights' dtype (ir/tile.py BUFFER_KINDS)
            arena = "i32" if buf.dtype in ("int32", "int64") else "w" if buf.kind == "operand" else "f32"
            seen = largest.get(buf.name)
            if seen is not None and seen[1] != arena:
                raise ScheduleError(f"buffer {buf.name}: {buf.dtype} in one program, {seen[1]} arena "
                                    f"in another")
            if seen is None or _numel(seen[0]) < _numel(buf.shape):
                largest[buf.name] = (tuple(buf.shape), arena)
    for name, (shape, arena) in largest.items():
        b.reserve(f"tile.{name}", shape, arena)


class RecordBuilder:
    def __init__(self, b: ArenaBuilder, tp, norm_arena: str | None = None):
        """norm_arena: the arena the kernels read RMSNorm gains from (layout.norm_arena); every
        record's `norm` slot is checked against it (None: not checked)."""
        self.b, self.tp, self.norm_arena = b, tp, norm_arena
        self.counter_index = {name: i for i, name in enumerate(tp.counters)}
        self.state = b.offset("state")

    def offset(self, name: str, task) -> int:
        if name in STATE_OF:
            return self.state + L.STATE[STATE_OF[name]]
        buf = self.tp.buffers.get(name)
        if buf is None:
            raise ScheduleError(f"task {task.name} ({task.kind}): {name!r} is neither a buffer "
                                f"nor a runtime scalar ({sorted(STATE_OF)})")
        slot_name = self.slot_name(name)
        slot = self.b.slots[slot_name]
        if buf.kind != "weight" and slot_of(name) is not None and slot.numel < _numel(buf.shape):
            raise ScheduleError(f"buffer {name} {list(buf.shape)} is larger than the engine's "
                                f"{slot_name} {list(slot.shape)} (compile with the engine's max_len)")
        return slot.offset

    def slot_name(self, name: str) -> str:
        """The arena slot a tile buffer lives in: a weight's checkpoint slot, the engine slot it
        aliases, or its own `tile.<name>`."""
        buf = self.tp.buffers[name]
        if buf.kind == "weight":
            return weight_slot(buf.param or buf.name)
        return slot_of(name) or f"tile.{name}"

    def record(self, task) -> L.TaskRecord:
        abi = L.kind_abi(task.kind)
        attrs, args = task.attrs, {}
        for arg in abi.args:
            if arg in FLOAT_ARGS and FLOAT_ARGS[arg] in attrs:
                args[arg] = L.float_bits(float(attrs[FLOAT_ARGS[arg]]))
            elif arg == "state":
                args[arg] = self.state
            elif arg in COUNTER_ARGS and arg in attrs:
                if attrs[arg] not in self.counter_index:
                    raise ScheduleError(f"task {task.name} ({task.kind}): {arg} names counter "
                                        f"{attrs[arg]!r}, which the program does not have")
                args[arg] = self.counter_index[attrs[arg]]
            elif arg in attrs:
                value = attrs[arg]
                if isinstance(value, str):
                    value = self.offset(value, task) + int(attrs.get(f"{arg}_offset", 0))
                    if arg == "norm":
                        self._check_norm(attrs[arg], task)
                args[arg] = int(value)
            else:
                args[arg] = -1 if arg in OPTIONAL_ARGS else 0
        if task.kind == "accept":
            # the compiled accept reads the drafted tokens as block[1:] and rewrites the block
            args.update(draft_tok=args["block"] + 1, draft_block=-1)
        waits = [(self.counter_index[c], target, self.tp.counters[c].expected)
                 for c, target in task.waits]
        signals = [(self.counter_index[c], inc) for c, inc in task.signals]
        return L.TaskRecord(task.kind, task.id, args, waits, signals, self.prefetch_ranges(task))

    def prefetch_ranges(self, task) -> list[tuple[int, int, int]]:
        """The task's weight reads that are one contiguous run of an arena the kernel can prefetch
        (layout.PF_ARENAS) as (arena index, element offset, bytes), 16-byte aligned inwards, the
        largest layout.MAX_PF of them (WPF moves them into L2 before the task's wait). A region with
        a runtime index (embedding rows), a partial inner dimension (a split-K slice) or a slot whose
        shape is not the buffer's (a repacked tensor) gives none."""
        ranges = []
        for region in task.reads:
            buf = self.tp.buffers.get(region.buffer)
            if buf is None or buf.kind != "weight" or any(d.index is not None for d in region.dims):
                continue
            slot = self.b.slots.get(self.slot_name(region.buffer))
            if slot is None or slot.arena not in L.PF_ARENAS or tuple(slot.shape) != tuple(buf.shape):
                continue
            dims, shape = region.dims, buf.shape
            outer = next((i for i, d in enumerate(dims) if d.extent > 1), len(dims))
            if any((d.lo, d.hi) != (0, s) for d, s in zip(dims[outer + 1:], shape[outer + 1:])):
                continue                        # not one contiguous run
            start, stride = 0, 1
            for d, s in zip(reversed(dims), reversed(shape)):
                start += d.lo * stride
                stride *= s
            esize = self.b.dtype(slot.arena).itemsize
            lo = -(-((slot.offset + start) * esize) // 16) * 16
            hi = ((slot.offset + start + region.elements()) * esize) // 16 * 16
            if hi - lo >= L.PF_MIN_BYTES:
                ranges.append((L.PF_ARENAS.index(slot.arena), lo // esize, hi - lo))
        return sorted(ranges, key=lambda r: -r[2])[:L.MAX_PF]

    def _check_norm(self, name: str, task):
        if self.norm_arena is None:
            return
        slot = self.slot_name(name)
        arena = self.b.slots[slot].arena
        if arena != self.norm_arena:
            raise ScheduleError(f"task {task.name} ({task.kind}): RMSNorm gain {slot} is in the "
                                f"{arena!r} arena, the kernels read gains from {self.norm_arena!r} "
                                f"(NORM_F32; weights.add_weights places them)")

    def queues(self) -> list[list[L.TaskRecord]]:
        if self.tp.programs is None:
            raise ScheduleError("tile program has no schedule (programs); run the schedule pass")
        by_id = {t.id: t for t in self.tp.tasks}
        return [[self.record(by_id[i]) for i in queue] for queue in self.tp.programs]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# the buffers each kind reads or writes in the experts' operand form (kernel constexpr XACT)
_EXPERT_OPERANDS = {"moe_route": ("xn",), "expert_up_gate": ("x", "act"), "expert_down": ("act",)}


def expert_operands(tp) -> int:
    """XACT of a tile program: 1 when its experts' inputs are "operand" buffers (stored in the
    weights' dtype, LowerOptions.expert_operands), 0 when they are fp32 activations. The kernels
    read every such buffer of every layer one way, so a program that mixes the two is refused."""
    forms = {}      # is an operand -> the first (task, arg, buffer) stored that way
    for t in tp.tasks:
        for arg in _EXPERT_OPERANDS.get(t.kind, ()):
            name = t.attrs.get(arg)
            if isinstance(name, str) and name in tp.buffers:
                forms.setdefault(tp.buffers[name].kind == "operand", (t, arg, name))
    if len(forms) > 1:
        t, arg, name = forms[True]
        u, uarg, uname = forms[False]
        raise ScheduleError(f"task {t.name} ({t.kind}) {arg}={name} is an operand buffer but task {u.name} "
                            f"({u.kind}) {uarg}={uname} is not: the experts' inputs are all stored one way "
                            f"(LowerOptions.expert_operands)")
    return int(True in forms)


def _expert_tasks(tp) -> list:
    return [t for t in tp.tasks if t.kind in ("expert_up_gate", "expert_down")]


def expert_queue(tp) -> int:
    """1 when the program's expert parts take their units from a run-time queue
    (LowerOptions.expert_queue; the kernel's XQUEUE), 0 when none does. XQUEUE is one value for
    the whole kernel, so a program where some expert tasks have a queue and others not is refused."""
    experts = _expert_tasks(tp)
    queued = [t for t in experts if "sync" in t.attrs]
    if queued and len(queued) != len(experts):
        plain = next(t for t in experts if "sync" not in t.attrs)
        raise ScheduleError(f"task {plain.name} ({plain.kind}) has no expert queue (sync) while "
                            f"{queued[0].name} has one: the kernel's XQUEUE is one value for all")
    return int(bool(queued))


def expert_tiles_whole(tp, consts: dict) -> int:
    """1 when every MXFP4 tile the expert tasks load lies inside its matrix (what the kernel's
    XEVEN, when the tiles allow it, needs to drop the bounds masks of the weight loads and of
    the K of their input's loads; tile_constexprs launches 0 otherwise): rows and K of both
    expert matrices multiples of BLOCK_NX and BLOCK_KX, per-slot tasks' column ranges on whole
    tiles, and a K loop that loads only the tile it uses (XPIPE 1, or MX_DOT 1's pipelined
    dot_scaled); the register-prefetch loops (XPIPE 0, MX_DOT 2 and 4) read one tile past the
    row end on their last step, which the mask keeps in bounds."""
    nx, kx = consts.get("BLOCK_NX"), consts.get("BLOCK_KX")
    experts = _expert_tasks(tp)
    if not experts or not nx or not kx:
        return 0
    mx_dot = consts.get("MX_DOT", 0)
    if mx_dot in (2, 4) or (mx_dot != 1 and not consts.get("XPIPE", 0)):
        return 0
    for t in experts:
        inter, dim = t.attrs["inter"], t.attrs["dim"]
        rows = inter if t.kind == "expert_up_gate" else dim
        if rows % nx or inter % kx or dim % kx:
            return 0
        n0, n1 = t.attrs.get("n0", 0), t.attrs.get("n1", 0)
        if not t.attrs.get("parts") and (n0 % nx or (n1 > n0 and n1 < rows and n1 % nx)):
            return 0
    return 1


def tile_constexprs(tp, base: dict, widen: bool = True) -> dict:
    """The engine's tile sizes; with `widen`, BLOCK_N (and the experts' BLOCK_NX, the LM head's BLOCK_NH) grow to the widest task of the schedule
    so every task is one tile (fewer tile operations: the interpreter's choice). Without it the
    linear / lm_head / linear_reduce / expert tasks loop over BLOCK_N sub-tiles (a GPU keeps
    small register tiles, and the cached kernel of the engine's own tile sizes fits)."""
    arrive = int(any("arrive" in t.attrs for t in tp.tasks))   # passes/fold_reduce.py's merge
    xact = expert_operands(tp)
    consts = dict(base, ARRIVE=arrive, XACT=xact, XQUEUE=expert_queue(tp))
    def pow2(n):
        return 1 << max(0, int(n - 1).bit_length())
    widths = [t.attrs["n1"] - t.attrs["n0"] for t in tp.tasks if "n1" in t.attrs and "n0" in t.attrs]
    if widen and widths:
        consts["BLOCK_N"] = max(consts["BLOCK_N"], pow2(max(widths)))
        if not consts.get("XTILE"):     # (XTILE: the arena's codes are stored in BLOCK_NX tiles)
            consts["BLOCK_NX"] = max(consts.get("BLOCK_NX", 0), consts["BLOCK_N"])     # the experts' rows
        consts["BLOCK_NH"] = max(consts.get("BLOCK_NH", 0), consts["BLOCK_N"])     # the LM head's rows
        consts["BLOCK_NC"] = max(consts.get("BLOCK_NC", 0), consts["BLOCK_N"])     # moe_combine's columns
    consts["XEVEN"] = int(bool(consts.get("XEVEN")) and expert_tiles_whole(tp, consts))   # on the final tiles
    return consts
