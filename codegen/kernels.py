"""The step kernels of a model: which task kinds, which tile sizes, where the sources live.

One kernel per step kind (STEP_KINDS: decode_step, prefill_chunk), each holding a
dispatch branch for every kind the engine's step programs use. The sources are
written by `tilecomp compile --out OUT` to OUT/kernels/<step>.py and cached under
`~/.cache/tilecomp/<key>/kernels/` with key = hash(model config, draft config,
options, tilecomp version); the engine loads them from either place.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tilecomp
from tilecomp.errors import TilecompError

from . import layout as L
from .triton_gen import STEP_KINDS, generate_kernel

ENGINE_KINDS = ("embed", "linear", "linear_reduce", "qkv_rope_kv", "attn_partial", "attn_reduce",
                "moe_route", "expert_up_gate", "expert_down", "moe_combine", "lm_head",
                "sample_reduce", "accept")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def weight_alignment(cfg, dcfg) -> int:
    """8 (16-byte bf16 loads) when every weight row length the linear/qkv/lm_head kinds walk
    is a multiple of 8 elements, else 1 (no alignment hint)."""
    dims = [cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size]
    dims += [cfg.attn(i).n_heads * cfg.attn(i).v_head_dim for i in range(cfg.num_hidden_layers)]
    if dcfg is not None:
        dims += [dcfg.hidden_size, dcfg.intermediate_size, dcfg.num_attention_heads * dcfg.head_dim,
                 dcfg.hidden_size * len(dcfg.target_layer_ids)]
    return 8 if all(d % 8 == 0 for d in dims) else 1


def scale_alignment(cfg, cap: int = 8) -> int:
    """SALIGN: a power of 2 (<= cap) that divides every expert matrix's row of E8M0 scales
    (K / 32 bytes, K = hidden or expert width): the scale rows then start SALIGN-aligned, and
    a K step's scales (BLOCK_KX / 32 bytes) load as SALIGN-byte vectors. 8-byte vectors let the
    tl.dot_scaled loop copy them asynchronously like the nibbles; 1 is no hint."""
    align = cap
    for k in (cfg.hidden_size, cfg.moe_intermediate_size):
        while align > 1 and (k // 32) % align:
            align //= 2
    return align


def constexprs_for(cfg, dcfg, rows: int) -> dict:
    """Tile sizes for steps of up to `rows` rows: few big tiles (the interpreter pays per task)."""
    head_dims = [cfg.attn(i).head_dim for i in range(cfg.num_hidden_layers)]
    v_dims = [cfg.attn(i).v_head_dim for i in range(cfg.num_hidden_layers)]
    rope_dims = [cfg.attn(i).rope_dim for i in range(cfg.num_hidden_layers)]
    if dcfg is not None:
        head_dims.append(dcfg.head_dim)
        v_dims.append(dcfg.head_dim)
        rope_dims.append(dcfg.head_dim)
    return dict(BLOCK_T=max(16, _pow2(rows)), BLOCK_D=min(128, _pow2(cfg.hidden_size)),
                BLOCK_N=64, BLOCK_NC=64, BLOCK_NX=64, BLOCK_NH=64, BLOCK_K=64, BLOCK_KX=64, BLOCK_RN=32, BLOCK_KR=64,
                BLOCK_HD=max(16, _pow2(max(head_dims))), BLOCK_HV=max(16, _pow2(max(v_dims))),
                BLOCK_TA=max(16, _pow2(rows)), BLOCK_TR=max(16, _pow2(rows)), BLOCK_S=32,
                BLOCK_E=max(16, _pow2(cfg.n_routed_experts)), BLOCK_V=16,
                BLOCK_R=max(16, _pow2(max(rope_dims))),
                **dict(L.TUNING_DEFAULTS, WALIGN=weight_alignment(cfg, dcfg), SALIGN=scale_alignment(cfg),
                       **_routing_tiles(cfg, rows)))


def _routing_tiles(cfg, rows: int) -> dict:
    """moe_combine's gather tiles: the experts per token (BLOCK_KS) and the plan's slots,
    min(E, rows * k) (BLOCK_SL), as powers of two."""
    k = cfg.num_experts_per_tok
    slots = min(cfg.n_routed_experts, max(1, rows) * k)
    return dict(BLOCK_KS=max(2, _pow2(k)), BLOCK_SL=max(16, _pow2(slots)))


# constexprs the compiled tile program sets (runtime/compiled.py tile_constexprs), never a tile override
PROGRAM_CONSTEXPRS = ("ARRIVE", "XACT", "XQUEUE")


def check_tile_names(names, known) -> None:
    """Refuse tile overrides `names` that are not among the kernels' constexprs `known`
    (constexprs_for's keys), or that the compiled tile program sets itself."""
    unknown = set(names) - set(known)
    if unknown:
        raise TilecompError(f"tiles: unknown tile size(s) {sorted(unknown)}; expected some of "
                            f"{sorted(set(known) - set(PROGRAM_CONSTEXPRS))}")
    derived = sorted(set(names) & set(PROGRAM_CONSTEXPRS))
    if derived:
        raise TilecompError(f"tiles: {', '.join(derived)} follow the compiled tile program (ARRIVE: "
                            f"--lower fold_reduce=1; XACT: --lower expert_operands=1; XQUEUE: "
                            f"--lower expert_queue=1), not --tile")


def step_rows(dcfg) -> int:
    """Rows of a step: the DFlash block (prefill chunks use the same)."""
    return dcfg.block_size if dcfg is not None else 8


def kernel_sources(cfg, dcfg) -> dict[str, str]:
    consts = constexprs_for(cfg, dcfg, step_rows(dcfg))
    return {name: generate_kernel(ENGINE_KINDS, name=name, constexprs=consts) for name in STEP_KINDS}


def _codegen_digest() -> str:
    """Hash of the templates and the record layout (a template edit must not hit a stale cache)."""
    here = Path(__file__).parent
    files = sorted((here / "templates").rglob("*.j2")) + [here / f for f in ("layout.py", "triton_gen.py", "mxfp4_ptx.py")]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def artifact_key(cfg, dcfg, options: dict | None = None) -> str:
    blob = json.dumps({"config": cfg.to_dict(), "draft": dcfg.to_dict() if dcfg else None,
                       "options": options or {}, "version": tilecomp.__version__,
                       "codegen": _codegen_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_kernels(cfg, dcfg, out_dir) -> list[Path]:
    """Write OUT/kernels/<step>.py for every step kind; return the paths."""
    kernels = Path(out_dir) / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, source in kernel_sources(cfg, dcfg).items():
        path = kernels / f"{name}.py"
        path.write_text(source)
        paths.append(path)
    return paths


def kernel_files(cfg, dcfg, artifacts=None, cache_dir=None) -> dict[str, Path]:
    """Paths of the step kernels: from `artifacts` (a `tilecomp compile --out` dir), else the cache
    (written on first use). Artifacts compiled for another config are refused."""
    if artifacts is not None:
        paths = {n: Path(artifacts) / "kernels" / f"{n}.py" for n in STEP_KINDS}
        expected = constexprs_for(cfg, dcfg, step_rows(dcfg))
        for name, path in paths.items():
            if not path.is_file():
                raise TilecompError(f"{path}: missing; run `tilecomp compile --out {artifacts}`")
            found = _recorded_constexprs(path)
            if found != expected:
                raise TilecompError(f"{path}: compiled for tile sizes {found}, this model needs "
                                    f"{expected}; recompile with `tilecomp compile`")
        return paths
    root = Path(cache_dir or os.environ.get("TILECOMP_CACHE", Path.home() / ".cache" / "tilecomp"))
    out = root / artifact_key(cfg, dcfg)
    paths = {n: out / "kernels" / f"{n}.py" for n in STEP_KINDS}
    if not all(p.is_file() for p in paths.values()):
        write_kernels(cfg, dcfg, out)
    return paths


def _recorded_constexprs(path: Path) -> dict:
    for line in path.read_text().splitlines():
        if line.startswith("CONSTEXPRS = "):
            import ast
            return ast.literal_eval(line[len("CONSTEXPRS = "):])
    raise TilecompError(f"{path}: not a generated megakernel (no CONSTEXPRS line)")
