"""Token check: the megakernel engine against the reference engine, same weights, same dtype.

    python3 -m tilecomp.bench.tokens --preset small [--prompts 8] [--new-tokens 32] [--json OUT]
    python3 -m tilecomp.bench.tokens --checkpoint examples/model [--prompts 8] ...

Both engines decode greedily from the same model (bf16 on a GPU): a preset's random
weights with random prompts, or a checkpoint's weights with prompts from held-out
standard-library files when it has a tokenizer.json (random ids otherwise).
bf16 rounding differs between the two (different reduction orders and fusion),
so where the reference's top-2 logits are closer than that rounding, the
engines may legitimately pick different tokens. For every prompt the check
reports the first position where the tokens differ and the reference's top-2
logit margin there, next to the measured logit deviation between the two
engines (the prompt's last-row logits of each). A divergence is *explained*
when its margin is below that tolerance; an unexplained one is a bug.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from tilecomp.errors import TilecompError


@torch.no_grad()
def full_logits(target, ids: list[int]) -> torch.Tensor:
    """fp32 last-row logits of one cache-free forward over `ids`."""
    x = torch.tensor([ids], dtype=torch.long, device=target.lm_head.weight.device)
    return target(x)[0, -1].float()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check(target, draft, prompts: list[list[int]], new_tokens: int, schedule=None,
          programs: int | None = None, truth=None, tiles: dict | None = None, lower: dict | None = None,
          cuda_graph: bool | None = None, num_warps: int | None = None) -> dict:
    """schedule: the compiled step (a Compiled: decode step + prefill chunk, or a TileProgram);
    truth: the same weights in fp32 (cache-free forward), the arbiter at a divergence; tiles /
    lower / num_warps: the megakernel's tuning switches (as `tilecomp bench --tile / --lower /
    --num-warps`)."""
    from tilecomp.runtime.megakernel import MegakernelEngine
    from tilecomp.runtime.reference import ReferenceEngine
    from tilecomp.codegen.kernels import step_rows
    # the compiled programs' caches hold at least two blocks (a block of 8 rows without a draft)
    max_len = max(len(p) for p in prompts) + new_tokens + 2 * step_rows(draft.config if draft else None)
    ref = ReferenceEngine(target, draft, max_len=max_len)
    mk = MegakernelEngine(target, draft, max_len=max_len, programs=programs, schedule=schedule,
                          tiles=tiles, lower=lower, cuda_graph=cuda_graph, num_warps=num_warps)
    rows, deviations = [], []
    for k, prompt in enumerate(prompts):
        row = {"prompt_len": len(prompt)}
        # the engines' logit deviation after the same prompt: the measured bf16 tolerance
        dev = (mk.prompt_logits(prompt).float() - full_logits(target, prompt)).abs().max().item()
        deviations.append(dev)
        row["prompt_logit_max_abs_diff"] = dev
        runs = {"plain": False} if draft is None else {"plain": False, "dflash": True}
        ref_tokens = ref.generate(prompt, new_tokens, use_draft=False).tokens
        for name, use_draft in runs.items():
            t0 = time.perf_counter()
            res = mk.generate(prompt, new_tokens, use_draft=use_draft)
            row[f"{name}_s"] = time.perf_counter() - t0
            if use_draft:
                row["mean_acceptance"] = res.mean_acceptance
            i = first_difference(ref_tokens, res.tokens)
            row[f"{name}_first_diff"] = i
            if i is not None and i < len(ref_tokens) and i < len(res.tokens):
                row.update({f"{name}_{key}": v for key, v in
                            divergence(target, truth, mk, prompt + ref_tokens[:i], ref_tokens[i],
                                       res.tokens[i]).items()})
        rows.append(row)
        print(f"prompt {k}: {json.dumps(row)}", file=sys.stderr, flush=True)
    tol = statistics.median(deviations)
    summary = {"median_prompt_logit_deviation": tol, "max_prompt_logit_deviation": max(deviations),
               "prompts": len(prompts), "new_tokens": new_tokens}
    for name in ("plain", "dflash") if draft is not None else ("plain",):
        diffs = [r for r in rows if r[f"{name}_first_diff"] is not None]
        below = [r for r in diffs if r.get(f"{name}_ref_margin", 0.0) <= 2 * tol]
        flips = [r for r in diffs if r.get(f"{name}_explained", True)]
        summary[name] = {"identical": len(rows) - len(diffs), "differ": len(diffs),
                         "ref_margin_below_2x_median_deviation": len(below),
                         "explained_by_fp32": len(flips), "unexplained": len(diffs) - len(flips),
                         "tokens_before_first_diff": [r[f"{name}_first_diff"] for r in diffs],
                         "ref_margins": [r.get(f"{name}_ref_margin") for r in diffs]}
    return {"summary": summary, "rows": rows, "cuda_graph": mk.cuda_graph}


def divergence(target, truth, mk, prefix: list[int], ref_tok: int, mk_tok: int) -> dict:
    """Why the engines chose differently after `prefix`: the reference's top-2 margin, the
    megakernel's deviation there, and (with an fp32 truth) whether the two chosen tokens are
    within the engines' combined error of each other in fp32 (a rounding flip, not a bug)."""
    ref_logits = full_logits(target, prefix)
    top = torch.topk(ref_logits, 2).values
    mk_logits = mk.prompt_logits(prefix).float()
    out = {"ref_margin": (top[0] - top[1]).item(),
           "mk_deviation": (mk_logits - ref_logits).abs().max().item()}
    if truth is not None:
        t = full_logits(truth, prefix)
        err = (ref_logits - t).abs().max().item() + (mk_logits - t).abs().max().item()
        gap = abs((t[ref_tok] - t[mk_tok]).item())
        out.update(fp32_gap=gap, combined_error=err, explained=gap <= err)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="random weights of a preset (default: small)")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint's weights (and its draft, if any)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: the first N layers")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-draft", action="store_true", help="check plain decoding only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", action="append", default=[], metavar="NAME=N",
                   help="a megakernel tile size or code path, as `tilecomp bench --tile` (repeatable)")
    p.add_argument("--lower", action="append", default=[], metavar="NAME=N",
                   help="a lowering option, as `tilecomp bench --lower` (repeatable)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="the megakernel's steps as CUDA-graph replays (default: on a GPU)")
    p.add_argument("--num-warps", type=int, default=None,
                   help="warps per megakernel program, as `tilecomp bench --num-warps`")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    from tilecomp.commands.bench import check_num_warps, dry_run, parse_lower, parse_tiles
    tiles, lower = parse_tiles(args.tile), parse_lower(args.lower)
    check_num_warps(args.num_warps)
    if dry_run():
        return 0
    from tilecomp.models import preset
    from tilecomp.passes.pipeline import compile_model, engine_options
    from .random_model import random_draft, random_target
    on_gpu = torch.cuda.is_available()
    if not on_gpu:          # the generated kernels run in Triton's interpreter (set before import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.checkpoint:
        if args.layers is not None:
            raise TilecompError("--layers: only with --preset (a checkpoint has its own layer count)")
        from tilecomp.commands.generate import load_tokenizer
        from tilecomp.models import load_pretrained
        from .acceptance import heldout_prompts
        target, draft = load_pretrained(args.checkpoint, dtype=dtype, device=device)
        if args.no_draft:
            draft = None
        cfg, dcfg = target.config, (draft.config if draft is not None else None)
        tokenizer = load_tokenizer(args.checkpoint)
    else:
        args.preset = args.preset or "small"
        cfg, dcfg = preset(args.preset, args.layers)
        target = random_target(cfg, device, dtype=dtype)
        draft = None if args.no_draft else random_draft(dcfg, cfg, device, dtype=dtype)
        tokenizer = None
    if tokenizer is not None:
        prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_len, seed=args.seed)
    else:
        g = torch.Generator().manual_seed(args.seed)
        lens = torch.randint(max(1, args.prompt_len // 2), args.prompt_len + 1, (args.prompts,), generator=g)
        prompts = [torch.randint(2, cfg.vocab_size, (int(n),), generator=g).tolist() for n in lens]
    programs = torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 1
    schedule = None
    if draft is not None:
        max_len = max(map(len, prompts)) + args.new_tokens + 2 * dcfg.block_size
        schedule = compile_model(cfg, dcfg, engine_options(max_len, programs, not on_gpu, lower=lower))   # decode step + prefill
    truth = copy.deepcopy(target).float()           # the arbiter at a divergence
    report = check(target, draft, prompts, args.new_tokens, schedule=schedule, programs=programs,
                   truth=truth, tiles=tiles, lower=lower, cuda_graph=args.cuda_graph, num_warps=args.num_warps)
    report.update(preset=args.preset, checkpoint=args.checkpoint, layers=cfg.num_hidden_layers, dtype=str(dtype),
                  tiles=tiles, lower=lower, num_warps=args.num_warps, device=torch.cuda.get_device_name(0) if on_gpu else "cpu", torch=torch.__version__)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
