"""`tilecomp train {data,target,draft,eval}`: build the shipped example model.

    tilecomp train data   --out DATA
    tilecomp train target --data DATA --run TRUN --minutes 4.5
    tilecomp train draft  --data DATA --target TRUN/checkpoint --run DRUN --out examples/model --minutes 2.25
    tilecomp train eval   --checkpoint examples/model --data DATA

A run folder resumes where it stopped: run the same command again (each
invocation stops after --chunk-minutes and saves).
"""
from __future__ import annotations

import argparse
import sys

from tilecomp.errors import TilecompError


def _budget_args(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--minutes", type=float, help="total training minutes over all chunks")
    g.add_argument("--steps", type=int, help="total optimizer steps over all chunks")
    p.add_argument("--chunk-minutes", type=float, default=9.0,
                   help="stop and save after this long (resume by running again)")
    p.add_argument("--size", default="example", help="model shapes: example | miniature")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 is best on a busy CPU)")


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train the example MiMo target (MXFP4 QAT) and its DFlash draft")
    sub = p.add_subparsers(dest="train_cmd", required=True)

    d = sub.add_parser("data", help="stdlib corpus -> tokenizer + token ids")
    d.add_argument("--out", required=True)
    d.add_argument("--lib", default=None, help="a Python Lib/ folder (default: this interpreter's)")
    d.add_argument("--vocab-size", type=int, default=4096)
    d.add_argument("--split-seed", type=int, default=1234)

    t = sub.add_parser("target", help="train the MiMo target with MXFP4 fake-quantized experts")
    t.add_argument("--data", required=True)
    t.add_argument("--run", required=True, help="run folder (state.pt, curves, checkpoint/)")
    _budget_args(t)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--eval-windows", type=int, default=128)
    t.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on attention / MLP outputs before the residual add (multi-epoch runs)")
    t.add_argument("--eval-every", type=int, default=100, help="held-out loss every this many steps")
    t.add_argument("--moe", choices=("auto", "mixed", "grouped"), default="auto",
                   help="expert forward: mixed = every expert on every token, three matmuls, no host "
                        "sync (auto on a GPU); grouped = tokens sorted by expert (auto on CPU)")

    r = sub.add_parser("draft", help="train the DFlash draft on the target's own greedy continuations")
    r.add_argument("--data", required=True)
    r.add_argument("--target", required=True, help="target checkpoint folder")
    r.add_argument("--run", required=True)
    r.add_argument("--out", required=True, help="where the final target + draft checkpoint goes")
    _budget_args(r)
    r.add_argument("--sequences", type=int, default=4096)
    r.add_argument("--gen-minutes", type=float, default=1.5, help="time limit for generating sequences")
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--new-tokens", type=int, default=192)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--anchors", type=int, default=24)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--gen-batch", type=int, default=1024)
    r.add_argument("--eval-prompts", type=int, default=24)
    r.add_argument("--eval-new-tokens", type=int, default=128)

    e = sub.add_parser("eval", help="acceptance per step on held-out code and prose (reference engine)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--prompts", type=int, default=24)
    e.add_argument("--new-tokens", type=int, default=128)
    e.add_argument("--device", default=None)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from tilecomp.train import draft, loop, pipeline, target

    if args.train_cmd == "data":
        from tilecomp.train.data import prepare_data
        manifest = prepare_data(args.out, args.lib, args.split_seed, args.vocab_size)
        print(pipeline.describe({k: v for k, v in manifest.items() if k != "heldout_files"}))
        return 0
    if args.train_cmd == "eval":
        return _run_eval(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    budget = loop.Budget(steps=args.steps, minutes=args.minutes, chunk_minutes=args.chunk_minutes)
    if args.train_cmd == "target":
        settings = target.TargetSettings(batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                                         eval_every=args.eval_every, moe=args.moe,
                                         dropout=args.dropout)
        summary = pipeline.run_target(args.data, args.run, args.size, budget, settings, args.device,
                                      not args.quiet, args.eval_windows)
    else:
        settings = draft.DraftSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                       sequences=args.sequences, gen_batch=args.gen_batch,
                                       batch=args.batch, anchors=args.anchors, lr=args.lr, seed=args.seed)
        summary = pipeline.run_draft(args.data, args.target, args.run, args.out, args.size, budget,
                                     settings, args.gen_minutes, args.device, not args.quiet,
                                     args.eval_prompts, args.eval_new_tokens)
    print(pipeline.describe(summary))
    if not summary["done"]:
        print(f"chunk finished at step {summary['step']}; run the same command again to resume",
              file=sys.stderr)
    return 0


def _run_eval(args) -> int:
    import torch

    from tilecomp.models.checkpoint import load_pretrained
    from tilecomp.train import evaluate, loop, pipeline
    from tilecomp.train.data import load_data

    device = loop.pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target, draft_model = load_pretrained(args.checkpoint, dtype=dtype, device=device)
    if draft_model is None:
        raise TilecompError(f"{args.checkpoint}: has no dflash/ draft to evaluate")
    result = evaluate.evaluate_acceptance(target, draft_model, load_data(args.data), args.prompts,
                                          new_tokens=args.new_tokens)
    print(pipeline.describe(result))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (`python -m tilecomp.commands.train ...`), same as `tilecomp train ...`."""
    parser = argparse.ArgumentParser(prog="tilecomp")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except TilecompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
