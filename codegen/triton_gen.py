"""Render ONE persistent `@triton.jit` kernel per step kind from the task kinds it runs.

The frame (templates/megakernel.py.j2) walks the program's queue and
dispatches on the task kind; each kind's body comes from
templates/tasks/<kind>.j2, which defines two macros:
  prefetch()  loads that depend on no other task (weights), issued before the wait
  compute()   everything after the wait: activation loads, math, stores
  imports()   optional: import lines for @triton.jit device functions the body calls
              (from tilecomp.codegen.tasks...); the step stays ONE kernel
The snippet API (names a body may use) is documented in codegen/README.md.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import jinja2

import tilecomp
from tilecomp.errors import ScheduleError

from . import layout as L
from . import mxfp4_ptx

TEMPLATES = Path(__file__).parent / "templates"
STEP_KINDS = ("decode_step", "prefill_chunk")


def _f32_arg(name: str) -> str:
    """A `*_bits` record arg as an fp32 scalar."""
    return f"r_{name}.to(tl.int32).to(tl.float32, bitcast=True)"


def _act_load(ptr: str, mask: str = "None", other: str = "0.0") -> str:
    """A load of data another task wrote in this launch: bypass L1 (not coherent across SMs)."""
    return f'tl.load({ptr}, mask={mask}, other={other}, cache_modifier=".cg")'


def _norm_gain(out: str, kk: str, kmask: str, t: str) -> str:
    """The RMSNorm weight of K columns `kk` (slot `r_norm`; 1.0 when r_norm < 0) as a fp32 tile
    that broadcasts over the [BLOCK_T, BLOCK_K] x tile of a pipelined K loop (a masked load, not a
    branch: a load under `if` is not pipelined).
    NORM_F32 (gains in arena_f32, layout.norm_arena): a [1, BLOCK_K] row, 4 bytes per thread, which
    an async copy takes, and BLOCK_K * 4 bytes per K step.
    Else (bf16 gains in arena_w): a [BLOCK_T, BLOCK_K] tile, each row the same (stride 0), because
    a [BLOCK_K] bf16 vector is 2 bytes per thread, too narrow for an async copy (a synchronous load
    would stall every K step). That tile costs BLOCK_T times the bytes, and as a load of x's shape
    that shares x's offsets it gave the fp32 x copies its 8 elements per thread (Triton's
    coalescing takes the widest vector of such a group): two strided 16-byte halves per thread."""
    return "\n".join([
        "if NORM_F32:",
        f"    {out} = tl.load(arena_f32 + tl.multiple_of(tl.maximum(r_norm, 0), WALIGN) + ({kk}),",
        f"        mask=({kmask}) & (r_norm >= 0), other=1.0)[None, :]",
        "else:",
        f"    {out} = tl.load(arena_w + tl.multiple_of(tl.maximum(r_norm, 0), WALIGN) + ({kk})[None, :]"
        f" + {t}[:, None] * 0,",
        f"        mask=(({kmask}) & (r_norm >= 0))[None, :] & ({t} >= 0)[:, None], other=1.0).to(tl.float32)"])


# Hopper's bulk L2 prefetch (PTX ISA 8.0, sm_90): one instruction moves a contiguous run of a
# multiple of 16 bytes, 16-byte aligned, from HBM into L2 with no register or shared-memory
# destination; sizes <= 0 are skipped (the predicate). An elementwise asm: each element of the
# operand tensors is one prefetch (the threads holding copies of an element repeat it: harmless).
_L2_ASM = ("{ .reg .pred p; setp.gt.s32 p, $2, 0; "
           "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")


def _wpf_asm(evict_last: bool) -> str:
    """WPF's prefetch: thread 0 of the program only (a scalar operand is held by every thread),
    sizes <= 0 skipped; evict_last (WPFL 1): the lines marked evict_last (a createpolicy per
    prefetch: once per 32 KB)."""
    policy = (".reg .b64 pol; ", "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; ",
              ".L2::cache_hint", ", pol") if evict_last else ("", "", "", "")
    return ("{ .reg .pred p, q; .reg .b32 t; %smov.u32 t, %%tid.x; setp.eq.u32 q, t, 0; "
            "setp.gt.and.s32 p, $2, 0, q; %s@p cp.async.bulk.prefetch.L2.global%s [$1], $2%s; "
            "mov.u32 $0, 0; }") % policy


def _l2_rows(ptr: str, rows: str, row_ok: str, row_len: str, col0: str, ncols: str, esize: str) -> str:
    """A statement that prefetches into L2 elements [col0, col0 + ncols) (clipped to the row) of
    rows `rows` (a tensor; `row_ok` masks it) of the row-major matrix at `ptr` (typed pointer,
    rows of `row_len` elements of `esize` bytes). The caller guarantees 16-byte alignment (and
    guards it with `if L2PF > 0`: the interpreter has no inline asm)."""
    size = (f"tl.where({row_ok}, tl.minimum({ncols}, {row_len} - ({col0})) * {esize}, 0).to(tl.int32)")
    return (f'tl.inline_asm_elementwise("{_L2_ASM}", "=r,l,r", '
            f"[{ptr} + ({rows}) * ({row_len}) + ({col0}), {size}], dtype=tl.int32, is_pure=False, pack=1)")


def _l2_ahead(p: str, bases: list[str], rows: str, row_end: str, kb: str, k1: str, row_len: str,
              step: str, esize: str, k0: str = "0", per_elem: int = 1, block_n: str = "BLOCK_N") -> str:
    """Statements (locals `<p>_pc`, `<p>_pw`, `<p>_pr`) that prefetch into L2, for each matrix in
    `bases`, the K tile L2PF steps of `step` ahead of `kb` in the K range [k0, k1) of the row
    sub-tile `rows`; past k1 it is the next sub-tile's first tile (rows + block_n, rows below
    `row_end`), so sub-tiles start warm. K is counted in elements; `per_elem` elements share one
    stored element (2 for MXFP4 nibbles, whose rows are `row_len` bytes). Guard as `_l2_rows`."""
    div = f" // {per_elem}" if per_elem != 1 else ""
    lines = [f"{p}_pc = {kb} + L2PF * {step}",
             f"{p}_pw = {p}_pc >= {k1}",
             f"{p}_pc = tl.where({p}_pw, {p}_pc - ({k1}" + (f" - {k0}" if k0 != "0" else "") + f"), {p}_pc)",
             f"{p}_pr = tl.where({p}_pw, {rows} + {block_n}, {rows})"]
    lines += [_l2_rows(base, f"{p}_pr", f"{p}_pr < {row_end}", row_len, f"{p}_pc{div}",
                       f"tl.minimum({step}, {k1} - {p}_pc){div}", esize) for base in bases]
    return "\n".join(lines)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(L=L, f32_arg=_f32_arg, act_load=_act_load, norm_gain=_norm_gain, l2_rows=_l2_rows,
                       l2_ahead=_l2_ahead, mxfp4_bf16_asm=repr(mxfp4_ptx.ptx()),
                       mxfp4_bf16_constraints=mxfp4_ptx.CONSTRAINTS,
                       mxfp4_word_asm=repr(mxfp4_ptx.ptx(mxfp4_ptx.WORD_PROGRAM, mxfp4_ptx.WORD_LOCALS)),
                       mxfp4_word_constraints=mxfp4_ptx.WORD_CONSTRAINTS, mxfp4_word_shift=mxfp4_ptx.WORD_SHIFT,
                       mxfp4_word_routes=mxfp4_ptx.ROUTES)
    return env


@dataclass(frozen=True)
class Body:
    prefetch: str
    compute: str
    imports: tuple[str, ...] = ()


def render_body(env: jinja2.Environment, kind: str) -> Body:
    """The two parts of one kind's body, rendered, with leading/trailing blank lines stripped."""
    path = f"tasks/{kind}.j2"
    try:
        module = env.get_template(path).module
    except jinja2.TemplateNotFound:
        raise ScheduleError(f"task kind {kind!r}: no body template codegen/templates/{path}")
    compute = str(module.compute()).strip("\n")
    prefetch = str(module.prefetch()).strip("\n") if hasattr(module, "prefetch") else ""
    if not compute.strip():
        raise ScheduleError(f"codegen/templates/{path}: compute() renders nothing")
    imports = str(module.imports()).split("\n") if hasattr(module, "imports") else []
    return Body(prefetch, compute, tuple(line.strip() for line in imports if line.strip()))


def kernel_constexprs(kinds: list[str]) -> list[str]:
    """Sorted union of the constexpr parameters the given kinds' bodies use, plus the frame's."""
    names = set(L.FRAME_CONSTEXPRS)
    for kind in kinds:
        names.update(L.kind_abi(kind).constexprs)
    return sorted(names)


_NOT_PARAMS = frozenset(dir(builtins)) | {"tl", "triton"}
# kernel parameters a body may read: the arenas, and the scoreboard with the step number (a body
# that counts arrivals itself, e.g. attn_partial's last-arriver merge)
FRAME_VALUES = ("arena_w", "arena_f32", "arena_u8", "arena_i32", "counters", "epoch")


def _names(src: str) -> tuple[set[str], set[str]]:
    """(names read, names assigned) anywhere in a rendered body part."""
    tree = ast.parse(textwrap.dedent(src) or "pass")
    loads, stores = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else stores).add(node.id)
    return loads, stores


def _functions(abi: L.KindABI, body: Body, imports) -> dict:
    """The source of a kind's compute function(s), with signatures and call arguments.
    `body`: called inlined (NOINLINE 0) after the frame ran the prefetch before the wait; it takes
    the prefetch's tensors. A noinline device function (NOINLINE 1) takes scalars only (Triton),
    so a kind with a prefetch gets a second function, `own`, that runs its prefetch itself; a
    kind without one uses `body` for both. A device function knows of its arguments what Triton
    propagates from its one call site (the kernel's 16-byte pointers, the frame's AALIGN / WALIGN
    hints on record args); a tl.multiple_of on an argument inside it has no effect."""
    def function(prefetch: str, src: str) -> dict:
        values, consts = body_params(abi, Body(prefetch, src), imports)
        return dict(source=src, signature=", ".join(values + [f"{c}: tl.constexpr" for c in consts]),
                    call=", ".join(values + consts))

    inlined = function(body.prefetch, body.compute)
    own = function("", f"{body.prefetch}\n{body.compute}") if body.prefetch else None
    return {"body": inlined, "own": own, "noinline": own or inlined, "returns": returns_status(body.compute)}


def returns_status(compute: str) -> bool:
    """Whether a kind's compute ends with `return <status>`: an int64 that is 0, or an in-body
    wait that timed out, (slot + 1) << 40 | value << 20 | target (expert_down's per-slot wait
    under XQUEUE); the frame then reports it as a timed-out wait (counter -2 - slot)."""
    tree = ast.parse(textwrap.dedent(compute) or "pass")
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    if returns and (len(returns) > 1 or tree.body[-1] is not returns[0] or returns[0].value is None):
        raise ScheduleError("a task body returns only as its last statement, with a status value")
    return bool(returns)


def body_params(abi: L.KindABI, body: Body, imports=()) -> tuple[list[str], list[str]]:
    """The parameters of one kind's compute function, (values, constexprs), in a fixed order: the
    arenas and record args it reads, then the prefetch locals it reads (its prefetch ran in the
    frame before the wait), then the constexprs. Any other free name is an error: a body sees
    nothing else of the frame."""
    loads, stores = _names(body.compute)
    _, pre = _names(body.prefetch)
    free = {n for n in loads if n not in stores or n in pre} - _NOT_PARAMS
    free -= {line.split()[-1] for line in imports}                 # module-level helpers
    arenas = [a for a in FRAME_VALUES if a in free]
    args = [f"r_{a}" for a in abi.args if f"r_{a}" in free]
    local = sorted(n for n in free if n in pre)
    consts = [c for c in ("ESIZE", "SPIN_LIMIT") + abi.constexprs if c in free]
    unknown = free - set(arenas) - set(args) - set(local) - set(consts)
    if unknown:
        raise ScheduleError(f"task kind {abi.name!r}: its compute body reads {sorted(unknown)}, which "
                            f"are neither arenas, the counters and epoch, record args, prefetch locals "
                            f"nor its constexprs")
    return arenas + args + local, consts


def generate_kernel(kinds, name: str = "decode_step", constexprs: dict | None = None) -> str:
    """Python source of one persistent kernel running the given task kinds.

    kinds: task kind names (any order; the dispatch follows layout.KINDS order).
    constexprs: values of the kernel's constexpr parameters, recorded in the
      module's CONSTEXPRS dict (launch and build use it); must cover every name
      the kinds need.
    """
    if name not in STEP_KINDS and not name.isidentifier():
        raise ScheduleError(f"kernel name {name!r} is not an identifier")
    abis = sorted({L.kind_abi(k) for k in kinds}, key=lambda a: a.id)
    names = kernel_constexprs([a.name for a in abis])
    values = dict(constexprs or {})
    if constexprs is not None:
        values = {**L.TUNING_DEFAULTS, **values}   # tuning knobs have defaults, tile sizes do not
        for derived, source in L.DERIVED_TILES.items():
            if derived not in values and source in values:
                values[derived] = values[source]
        values = {k: v for k, v in values.items() if k in names or k in constexprs}
    missing = [n for n in names if n not in values]
    if constexprs is not None and missing:
        raise ScheduleError(f"kernel {name}: constexpr values missing for {missing}")
    env = environment()
    bodies = {a.name: render_body(env, a.name) for a in abis}
    wait_block = env.get_template("wait.j2").render().strip("\n")
    recorded = {n: values[n] for n in names if n in values}
    imports = sorted({line for b in bodies.values() for line in b.imports})
    functions = {a.name: _functions(a, bodies[a.name], imports) for a in abis}
    return env.get_template("megakernel.py.j2").render(
        version=tilecomp.__version__, kernel_name=name, kinds=abis, bodies=bodies, functions=functions,
        wait_block=wait_block, wpf_asm=repr(_wpf_asm(False)), wpfl_asm=repr(_wpf_asm(True)), imports=imports, constexpr_names=names, constexpr_values=repr(recorded),
    )


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def load_kernel_module(source: str, directory: str | os.PathLike | None = None):
    """Write the source to `directory/<name>_<hash>.py` and import it (Triton needs a file)."""
    directory = Path(directory or os.environ.get("TILECOMP_CACHE",
                                                 Path.home() / ".cache" / "tilecomp")) / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    module_name = f"tilecomp_mk_{source_hash(source)}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = directory / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    return _import_file(module_name, path)


def load_kernel_file(path) -> object:
    """Import a generated kernel file where it lies (Triton reads the source from the file)."""
    path = Path(path)
    module_name = f"tilecomp_mk_{source_hash(path.read_text())}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    return _import_file(module_name, path)


def _import_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def kernel_of(module):
    """The one @triton.jit function of a generated module."""
    return getattr(module, module.KERNEL_NAME)
