"""`tilecomp generate`: run a checkpoint with the reference or the megakernel engine.

    tilecomp generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3)
                      --max-new-tokens N --engine {reference,megakernel} [--no-draft]
                      [--temperature T --top-p P --seed S] [--json]

Without --json the new text streams to stdout as it is committed (token ids
when DIR has no tokenizer.json) and a summary line goes to stderr. With
--json one object is printed: tokens, text (only with a tokenizer),
acceptance, mean_acceptance, tokens_per_s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from tilecomp.errors import CheckpointError, TilecompError

# The model used when --checkpoint is not given (issue 6 ships one under examples/).
DEFAULT_CHECKPOINT: str | None = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "model")

TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="generate tokens from a checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", metavar="DIR", default=DEFAULT_CHECKPOINT,
                   help="checkpoint directory (config.json, safetensors, optional dflash/ "
                        "and tokenizer.json)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs DIR/tokenizer.json)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--engine", choices=["reference", "megakernel"], default="reference")
    p.add_argument("--no-draft", action="store_true", help="plain token-by-token decoding")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="megakernel engine: run each step as the replay of a CUDA graph recorded at "
                        "its first launch (no per-step host launch work). Default: on a GPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-len", type=int, default=None, metavar="L",
                   help="KV-cache positions (default: prompt + new tokens + one block)")
    p.set_defaults(func=run)
    return p


def load_tokenizer(checkpoint: str):
    """tokenizers.Tokenizer from DIR/tokenizer.json, or None when there is none."""
    path = os.path.join(checkpoint, TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise TilecompError(f"--prompt-ids: expected comma-separated integers like 1,2,3, "
                            f"found {text!r}") from None
    if not ids:
        raise TilecompError(f"--prompt-ids: expected at least one token id, found {text!r}")
    return ids


def prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return parse_prompt_ids(args.prompt_ids)
    if tokenizer is None:
        raise TilecompError(f"--prompt needs a tokenizer: {os.path.join(args.checkpoint, TOKENIZER_FILE)} "
                            f"not found (use --prompt-ids 1,2,3 instead)")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise TilecompError(f"--prompt: the text {args.prompt!r} encodes to no tokens")
    return ids


def make_engine(name: str, target, draft, max_len: int, device: str = "cpu", cuda_graph: bool | None = None):
    """The engine class named by --engine; both take (target, draft, max_len). cuda_graph: the
    megakernel's steps as CUDA-graph replays (None: on a GPU)."""
    if name == "reference":
        from tilecomp.runtime.reference import ReferenceEngine
        return ReferenceEngine(target, draft, max_len=max_len)
    on_cpu = str(device).startswith("cpu")
    programs = 1 if on_cpu else torch.cuda.get_device_properties(device).multi_processor_count
    if on_cpu:
        # no GPU: the generated kernels run in Triton's interpreter, which must be
        # chosen before any kernel module is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from tilecomp.runtime.megakernel import MegakernelEngine
    except ImportError as e:
        raise TilecompError(f"--engine megakernel: tilecomp.runtime.megakernel is not available "
                            f"({e}); use --engine reference") from None
    from tilecomp.codegen.kernels import step_rows
    # the compiled programs' caches hold at least two blocks
    max_len = max(max_len, 2 * step_rows(draft.config if draft is not None else None))
    return MegakernelEngine(target, draft, max_len=max_len, programs=programs,
                            schedule=compile_step(target, draft, max_len, programs, on_cpu),
                            cuda_graph=cuda_graph)


def compile_step(target, draft, max_len: int, programs: int, interpreter_order: bool):
    """The compiler's output (trace -> passes -> lower -> schedule) for the engine to run: the
    DFlash step's, the plain step's and the prefill chunk's schedules (a `Compiled`); None
    without a draft (the engine then compiles its plain step and prefill chunk itself)."""
    if draft is None:
        return None
    from tilecomp.passes.pipeline import compile_model, engine_options
    options = engine_options(max_len, programs, interpreter_order)
    return compile_model(target.config, draft.config, options)


class TextStream:
    """Streams committed tokens: decoded text (re-decoding the whole output so
    multi-token characters come out right) or token ids without a tokenizer."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, new: list[int]):
        self.tokens.extend(new)
        if self.tokenizer is None:
            self.out.write("".join(f"{t} " for t in new))
        else:
            text = self.tokenizer.decode(self.tokens)
            if text.startswith(self.printed):
                self.out.write(text[len(self.printed):])
                self.printed = text
        self.out.flush()

    def finish(self):
        """End the line; with a tokenizer, print any text held back at a partial character."""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens)
            if text != self.printed:
                self.out.write(text[len(self.printed):] if text.startswith(self.printed) else
                               f"\n{text}")
        self.out.write("\n")
        self.out.flush()


def check_args(args):
    if args.checkpoint is None:
        raise TilecompError("--checkpoint: no checkpoint given and no built-in model is shipped yet "
                            "(make one: tilecomp init --preset tiny --out DIR)")
    if not os.path.isdir(args.checkpoint):
        raise TilecompError(f"--checkpoint: {args.checkpoint} is not a directory")
    if args.max_new_tokens < 0:
        raise TilecompError(f"--max-new-tokens: expected >= 0, found {args.max_new_tokens}")
    if args.temperature < 0:
        raise TilecompError(f"--temperature: expected >= 0, found {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise TilecompError(f"--top-p: expected a value in (0, 1], found {args.top_p}")
    if getattr(args, "cuda_graph", None) and args.engine != "megakernel":
        raise TilecompError("--cuda-graph: only with --engine megakernel (the reference engine "
                            "runs PyTorch operators one by one)")


def run(args) -> int:
    check_args(args)
    from tilecomp.models.checkpoint import load_pretrained
    tokenizer = load_tokenizer(args.checkpoint)
    ids = prompt_ids(args, tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if str(device).startswith("cpu") else torch.bfloat16)
    target, draft = load_pretrained(args.checkpoint, dtype=dtype, device=device)
    use_draft = not args.no_draft
    if use_draft and draft is None:
        raise TilecompError(f"--checkpoint: {args.checkpoint} has no DFlash draft (dflash/config.json); "
                            f"run with --no-draft")
    block = draft.config.block_size if use_draft else 1
    max_len = args.max_len or len(ids) + args.max_new_tokens + block
    engine = make_engine(args.engine, target, draft, max_len, device, cuda_graph=args.cuda_graph)
    stream = None if args.json else TextStream(tokenizer)
    result = engine.generate(ids, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, use_draft=use_draft, on_tokens=stream)
    if args.json:
        report = {"tokens": result.tokens}
        if tokenizer is not None:
            report["text"] = tokenizer.decode(result.tokens)
        report.update(acceptance=result.acceptance, mean_acceptance=result.mean_acceptance,
                      tokens_per_s=result.tokens_per_s)
        print(json.dumps(report))
    else:
        stream.finish()
        steps = len(result.acceptance) if use_draft else max(len(result.tokens) - 1, 0)
        print(f"[{len(result.tokens)} tokens: prefill + {steps} decode steps, mean acceptance "
              f"{result.mean_acceptance:.2f} tokens/step, {result.tokens_per_s:.1f} tokens/s, "
              f"engine {args.engine}{'' if use_draft else ', no draft'}]", file=sys.stderr)
    return 0
