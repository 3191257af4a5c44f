"""The measured acceptance of `tilecomp bench --checkpoint DIR --block 8`.

A checkpoint that ships a trained DFlash draft and its `tokenizer.json` (the
example model does) gets its tokens/s reported at the acceptance it really
reaches, next to the assumed `--acceptance`. The prompts are windows of the
held-out Python standard-library files: the same by-file split the training
corpus uses (`tilecomp.train.corpus.is_heldout`), read from the running
interpreter's `Lib/`, so they exist offline on every machine and were never
trained on. Generation is greedy, with the engine whose step was timed.
"""
from __future__ import annotations

import random
from pathlib import Path

from tilecomp.errors import TilecompError


def heldout_prompts(tokenizer, n: int, prompt_len: int, seed: int = 0, lib_dir: Path | None = None) -> list[list[int]]:
    """n prompts of prompt_len token ids, each from a different held-out stdlib file, at a
    seeded random offset (files too short for a window are skipped)."""
    from tilecomp.train.corpus import is_heldout, list_sources, read_source, stdlib_dir
    lib = Path(lib_dir) if lib_dir is not None else stdlib_dir()
    files = [rel for rel in list_sources(lib) if is_heldout(rel)]
    rng = random.Random(seed)
    rng.shuffle(files)
    prompts = []
    for rel in files:
        if len(prompts) == n:
            break
        text = read_source(lib / rel)
        ids = tokenizer.encode(text).ids if text else []
        if len(ids) < prompt_len + 8:
            continue
        start = rng.randrange(0, len(ids) - prompt_len - 8)
        prompts.append([int(t) for t in ids[start:start + prompt_len]])
    if len(prompts) < n:
        raise TilecompError(f"acceptance prompts: {lib} has {len(prompts)} held-out files of at least "
                            f"{prompt_len + 8} tokens, {n} were asked for (--acceptance-prompts)")
    return prompts


def checkpoint_tokenizer(args):
    """The checkpoint's tokenizer when bench should measure acceptance (a --checkpoint with a
    draft and a tokenizer.json, block > 1, --acceptance-prompts > 0), else None."""
    folder = getattr(args, "checkpoint", None)
    if not folder or args.block <= 1 or getattr(args, "acceptance_prompts", 0) <= 0:
        return None
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tilecomp.train.tokenizer import load_tokenizer
    return load_tokenizer(path)


def measure_acceptance(engine, tokenizer, args, block_size: int, engine_name: str) -> dict:
    """Mean tokens per DFlash step of greedy generation on held-out stdlib prompts, by `engine`
    (reported as `engine_name`)."""
    from tilecomp.train.evaluate import acceptance_of
    prompts = heldout_prompts(tokenizer, args.acceptance_prompts, args.acceptance_prompt_len)
    out = acceptance_of(engine, prompts, args.acceptance_tokens, block_size, tokenizer)
    out.update(engine=engine_name, new_tokens=args.acceptance_tokens, prompt_len=args.acceptance_prompt_len,
               source="held-out Python stdlib files (tilecomp.train.corpus split), greedy")
    return out
