"""Per-loop sm_90 SASS op counts of task kinds under tile variants, built on a CPU (no GPU).

    python3 bench/sass_loops.py expert_up_gate [--variant ''] [--variant AFRAG=0] [--preset mimo-v2-flash]

For each variant (comma-separated NAME=N tile overrides on top of codegen/layout.py GPU_TUNING)
it generates a kernel of the named kinds with the preset's tile sizes, compiles it for sm_90
(Triton's bundled ptxas), and prints the registers, spills and shared memory, then every loop
(a backward branch) that holds a tensor-core instruction: its instruction count and its memory,
barrier and MMA ops. This is how the expert K loops' shared-memory round trip (STS.128 + LDSM
per K step) was found and checked gone (docs/PERF.md, version 16).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

MEM_OPS = re.compile(r"(LD|ST|HGMMA|HMMA|BAR|WARPGROUP|DEPBAR|LDGDEPBAR)")


def cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: Triton's bundled cuobjdump not found (needs the nvidia backend)")
    return path


def parse_tiles(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"--variant {text!r}: expected NAME=N[,NAME=N...], found {item!r}")
        out[name.strip()] = int(value)
    return out


def instructions(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def mma_loops(ins: list[tuple[int, str]], any_loop: bool = False) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, op counts) of each backward-branch region with an HGMMA / HMMA in it (every
    backward-branch region with any_loop)."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            body = ins[index[target]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body)
            if any_loop or any(k.startswith(("HGMMA", "HMMA")) for k in ops):
                loops.append((target, addr, ops))
    return loops


INSTRUCTION_BYTES = 16     # sm_90 encodes every instruction in 128 bits


def code_bytes(ins: list[tuple[int, str]]) -> int:
    """Bytes of code of a SASS listing's instructions (what the instruction caches hold)."""
    return len(ins) * INSTRUCTION_BYTES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kinds", help="comma-separated task kinds, e.g. expert_up_gate,expert_down")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=N[,NAME=N] tile overrides ('' = the GPU defaults); repeatable")
    ap.add_argument("--preset", default="mimo-v2-flash")
    ap.add_argument("--rows", type=int, default=8, help="step rows (the DFlash block)")
    ap.add_argument("--all", action="store_true", help="every op of each loop, not only memory, barrier and MMA")
    ap.add_argument("--any-loop", action="store_true",
                    help="every loop (backward branch), not only those with a tensor-core instruction "
                         "(e.g. moe_combine's slot loop)")
    ap.add_argument("--code-size", action="store_true",
                    help="also the code size: the kernel's, and each kind's (a kernel of accept + the "
                         "kind, less one of accept alone)")
    args = ap.parse_args(argv)
    from tilecomp.codegen.build import ptxas_usage
    from tilecomp.codegen.kernels import constexprs_for
    from tilecomp.models.presets import preset
    cfg, dcfg = preset(args.preset, layers=2)
    consts = constexprs_for(cfg, dcfg, args.rows)
    kinds = args.kinds.split(",")
    for variant in args.variant if args.variant is not None else [""]:
        tiles = parse_tiles(variant)
        compiled, log, sass = build_sass(kinds, consts, tiles)
        usage = ptxas_usage(compiled.asm["ptx"], 90, log)
        print(f"[{variant or 'GPU defaults'}] registers {usage['registers']}, spills {usage['spill_stores']} / "
              f"{usage['spill_loads']} bytes, shared memory {compiled.metadata.shared} bytes")
        if args.code_size:
            ins = instructions(sass)
            print(f"  code: {len(ins)} instructions, {code_bytes(ins) / 1024:.1f} KB")
            if len(kinds) > 1:
                base = code_bytes(instructions(build_sass(["accept"], consts, tiles)[2]))
                for kind in kinds:
                    if kind != "accept":
                        own = code_bytes(instructions(build_sass(["accept", kind], consts, tiles)[2])) - base
                        print(f"  code of {kind}: {own / 1024:.1f} KB")
        for start, end, ops in mma_loops(instructions(sass), args.any_loop):
            sel = ", ".join(f"{k} {c}" for k, c in sorted(ops.items(), key=lambda kc: (-kc[1], kc[0]) if args.all else kc)
                            if args.all or MEM_OPS.match(k))
            print(f"  loop {start:#x}..{end:#x}: {sum(ops.values())} instructions; {sel}")
    return 0


def build_sass(kinds: list[str], consts: dict, tiles: dict):
    """(compiled, ptxas log, SASS listing) of a kernel of `kinds` built for sm_90 with the GPU tile
    sizes plus those of `tiles` the kernel has (parse_tiles checked the names against every kind's:
    a kind-only switch such as QKV_LOOP is not passed to a kernel without that kind, e.g. the
    accept-only kernel of --code-size; nor are the program-set XACT / ARRIVE)."""
    from tilecomp.codegen.build import compile_kernel
    from tilecomp.codegen.triton_gen import generate_kernel, load_kernel_module
    tmp = tempfile.mkdtemp(prefix="tilecomp-sass-")
    module = load_kernel_module(generate_kernel(kinds, constexprs=consts), tmp)
    tiles = {k: v for k, v in tiles.items() if k in module.CONSTEXPRS}
    compiled, log = compile_kernel(module, 90, tiles=tiles)
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return compiled, log, sass


if __name__ == "__main__":
    sys.exit(main())
