"""Build generated megakernels for a GPU target without a GPU, and report their resources.

`build_report(path, programs)` compiles the one @triton.jit kernel of a generated
module with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`,
runs ptxas -v on the PTX for registers and spills, and checks that `programs`
persistent programs can all be resident at once (a persistent kernel whose
programs are not co-resident deadlocks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tilecomp.errors import TilecompError

from . import layout as L
from .triton_gen import kernel_of, load_kernel_module

# Hopper (H100 SXM): SMs, registers per SM, shared memory per SM, max resident blocks per SM.
SM90 = dict(sms=132, regs_per_sm=65536, smem_per_sm=228 * 1024, blocks_per_sm=32)
SIGNATURE = {
    "records": "*i64", "queue": "*i32", "counters": "*i32", "errors": "*i64", "trace": "*i64", "epoch": "i32", "epoch_buf": "*i32",
    "arena_w": "*bf16", "arena_f32": "*fp32", "arena_u8": "*u8", "arena_i32": "*i32",
}
GPU_SPINS = 1 << 24


@contextlib.contextmanager
def mma_v2_build(constexprs: dict):
    """Builds inside run with Triton's wgmma off when constexprs["MMAV2"] is 1 (layout.py MMAV2:
    Triton reads DISABLE_MMA_V3 when it compiles, and keys its disk cache on it); the process's
    environment is restored after. A launch that finds its kernel built compiles nothing."""
    if not constexprs.get("MMAV2"):
        yield
        return
    old = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = old


@dataclass
class KernelReport:
    kernel: str
    target: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    blocks_per_sm: int
    programs: int
    max_resident: int

    @property
    def fits(self) -> bool:
        return self.programs <= self.max_resident

    def line(self) -> str:
        status = "ok" if self.fits else "NOT CO-RESIDENT (deadlock risk)"
        return (f"{self.kernel}: {self.target} warps={self.num_warps} regs={self.registers} "
                f"spills={self.spill_stores}B/{self.spill_loads}B smem={self.shared_bytes}B "
                f"blocks/SM={self.blocks_per_sm} grid={self.programs}/{self.max_resident} {status}")

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def _parse_arch(target: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", target)
    if not match:
        raise TilecompError(f"--target {target!r}: expected sm_<NN>, e.g. sm_90")
    return int(match.group(1))


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv
    if hasattr(nv, "get_ptxas"):
        return nv.get_ptxas(arch).path
    from triton import knobs
    return knobs.nvidia.ptxas.path


def ptxas_usage(ptx: str, arch: int, log: str = "") -> dict:
    """Registers and spill bytes of the kernel in `ptx`, from a `ptxas -v` log (run it if empty)."""
    out = log
    if "registers" not in out:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
            out = subprocess.run([_ptxas_path(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src),
                                  "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr

    def number(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else 0
    return dict(registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def compile_kernel(module, arch: int, num_warps: int = L.GPU_NUM_WARPS, trace: bool = False,
                   tiles: dict | None = None):
    """(compiled kernel, ptxas -v log captured during the build, or ""), with the GPU tile sizes
    an engine launches it with (the module's CONSTEXPRS + layout.GPU_TUNING + `tiles`)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel_of(module)
    if not hasattr(fn, "cache_key"):   # TRITON_INTERPRET=1 made it an InterpretedFunction
        from triton.runtime.jit import JITFunction
        fn = JITFunction(fn.fn)
    gpu = {k: v for k, v in L.GPU_TUNING.items() if k in module.CONSTEXPRS}   # the kinds it has
    constexprs = {**module.CONSTEXPRS, **gpu, **(tiles or {}), "SPIN_LIMIT": GPU_SPINS, "TRACE": trace}
    signature = dict(SIGNATURE, **{name: "constexpr" for name in constexprs})
    # pointer arguments are 16-byte aligned, as Triton's launcher specialises them on a GPU
    # (torch allocations are): without this the CPU build would see unvectorisable loads
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in SIGNATURE.items() if ty.startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    with contextlib.ExitStack() as stack:
        if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
            stack.enter_context(knobs.nvidia.scope())   # restores the knobs afterwards
            stack.enter_context(knobs.compilation.scope())
            knobs.nvidia.dump_ptxas_log = True           # Triton prints ptxas -v: capture it
            knobs.compilation.always_compile = True      # (a cache hit would run no ptxas)
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(mma_v2_build(constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
    return compiled, log.getvalue()


def build_report(path, programs: int, target: str = "sm_90", num_warps: int = L.GPU_NUM_WARPS) -> KernelReport:
    """Compile the generated kernel in `path` for `target`; raise TilecompError if it does not build.

    Under TRITON_INTERPRET=1 (CPU tests) Triton's language is patched for the interpreter,
    so the build runs in a fresh process without it."""
    arch = _parse_arch(target)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _build_in_subprocess(path, programs, target, num_warps)
    module = load_kernel_module(Path(path).read_text())
    try:
        compiled, log = compile_kernel(module, arch, num_warps)
    except Exception as exc:  # Triton raises many types; the user needs the kernel and the reason
        raise TilecompError(f"{path}: megakernel does not build for {target}: {exc}") from exc
    usage = ptxas_usage(compiled.asm["ptx"], arch, log)
    shared = int(compiled.metadata.shared)
    threads = 32 * num_warps
    by_regs = SM90["regs_per_sm"] // max(usage["registers"] * threads, 1)
    by_smem = SM90["smem_per_sm"] // shared if shared else SM90["blocks_per_sm"]
    blocks = min(by_regs, by_smem, SM90["blocks_per_sm"])
    return KernelReport(module.KERNEL_NAME, target, num_warps, usage["registers"],
                        usage["spill_stores"], usage["spill_loads"], shared, blocks, programs,
                        blocks * SM90["sms"])


def compile_kernels(cfg, dcfg, out_dir, programs: int, target: str | None = None,
                    num_warps: int = L.GPU_NUM_WARPS) -> list[str]:
    """`tilecomp compile`: write OUT/kernels/*.py; with a target, build each for it and write
    OUT/kernels/report.json. Returns the report lines (empty without a target)."""
    from .kernels import write_kernels
    paths = write_kernels(cfg, dcfg, out_dir)
    if target is None:
        return []
    reports, built = [], {}
    for path in paths:
        # step kernels that differ only in their name build identically: build once
        name = path.stem
        body = path.read_text().replace(name, "<step>")
        if body in built:
            reports.append(dataclasses.replace(built[body], kernel=name))
            continue
        built[body] = build_report(path, programs, target, num_warps)
        reports.append(built[body])
    with open(Path(out_dir) / "kernels" / "report.json", "w") as f:
        json.dump([r.to_dict() for r in reports], f, indent=2)
        f.write("\n")
    return [r.line() for r in reports]


def _build_in_subprocess(path, programs, target, num_warps) -> KernelReport:
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "tilecomp.codegen.build", str(path), str(programs),
                           target, str(num_warps)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise TilecompError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                            else f"{path}: build for {target} failed")
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    fields.pop("fits")
    return KernelReport(**fields)


if __name__ == "__main__":
    try:
        report = build_report(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    except TilecompError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report.to_dict()))
