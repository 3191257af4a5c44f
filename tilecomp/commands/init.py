"""`tilecomp init`: write a random checkpoint (target + DFlash draft) of a preset.

    tilecomp init --preset {tiny,small,mimo-v2-flash,mimo-v2.5-pro} [--layers N] --out DIR [--seed S]

Small models are built in memory and written with `save_pretrained`. Models
larger than STREAM_BYTES (the real MiMo shapes) are never held in RAM: the
module tree is built on the meta device only for its tensor names, shapes and
dtypes, and random tensors are made and written one layer (one shard) at a
time; MXFP4 experts get random E2M1 codes with a fixed E8M0 scale.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from tilecomp.errors import TilecompError
from tilecomp.models.checkpoint import shard_name, write_index
from tilecomp.models.mimo import INIT_STD
from tilecomp.models.mxfp4 import random_scale_code

STREAM_BYTES = 1 << 30                 # targets above 1 GiB are written layer by layer
RANDOM_SCALE = random_scale_code(INIT_STD)   # the in-memory init's expert scale (2^(120-127))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_parser(subparsers):
    from tilecomp.models.presets import PRESETS
    p = subparsers.add_parser("init", help="write a random checkpoint of a preset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep only the first N target layers")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the non-expert weights")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in DIR")
    p.set_defaults(func=run)
    return p


def prepare_out_dir(out: str, force: bool):
    if os.path.exists(out) and not os.path.isdir(out):
        raise TilecompError(f"--out: {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise TilecompError(f"--out: {out} is not empty (add --force to replace the checkpoint in it)")
        old = [os.path.join(out, "config.json"), os.path.join(out, "model.safetensors.index.json"),
               *glob.glob(os.path.join(out, "model*.safetensors"))]
        for path in old:
            if os.path.isfile(path):
                os.remove(path)
        shutil.rmtree(os.path.join(out, "dflash"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)


def meta_models(tcfg, dcfg, dtype):
    """Target and draft on the meta device: names, shapes and dtypes, no storage."""
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    with torch.device("meta"):
        return MiMoForCausalLM(tcfg, dtype=dtype), DFlashDraft(dcfg, tcfg, dtype=dtype)


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def random_tensor(name: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random value for one checkpoint tensor, by its name (same rules as the in-memory init)."""
    t = torch.empty(like.shape, dtype=like.dtype)
    if name.endswith("_blocks"):
        return t.random_(0, 256, generator=gen)
    if name.endswith("_scales"):
        return t.fill_(RANDOM_SCALE)
    if name.endswith("norm.weight"):
        return t.fill_(1.0)
    if name.endswith("e_score_correction_bias"):
        return t.zero_()
    return t.normal_(0.0, INIT_STD, generator=gen)


def shard_of(name: str) -> str:
    """One shard per layer ('model.layers.3.' / 'layers.3.'), one for everything else."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return f"layer{int(parts[i + 1]):05d}"
    return "other"


def write_streamed(module: torch.nn.Module, path: str, seed: int):
    """Random tensors for a meta module, one shard per layer, + model.safetensors.index.json."""
    groups: dict[str, list[str]] = {}
    state = module.state_dict()
    for name in state:
        groups.setdefault(shard_of(name), []).append(name)
    weight_map, total = {}, 0
    for i, (group, names) in enumerate(sorted(groups.items())):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        tensors = {name: random_tensor(name, state[name], gen) for name in names}
        file = shard_name(i, len(groups))
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    write_index(path, weight_map, total)


def write_config(obj: dict, path: str):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(obj, f, indent=2)


def init_streamed(target, draft, out: str, seed: int):
    """Write a random checkpoint of meta modules without ever holding the model in memory."""
    from tilecomp.models.checkpoint import DRAFT_DIR, checkpoint_config
    write_config(checkpoint_config(target.config), out)
    write_streamed(target, out, seed)
    ddir = os.path.join(out, DRAFT_DIR)
    os.makedirs(ddir, exist_ok=True)
    write_config(draft.config.to_dict(), ddir)
    write_streamed(draft, ddir, seed + 1)


def init_in_memory(tcfg, dcfg, out: str, dtype, seed: int):
    from tilecomp.models.checkpoint import save_pretrained
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    torch.manual_seed(seed)
    target = MiMoForCausalLM(tcfg, dtype=dtype)
    draft = DFlashDraft(dcfg, tcfg, dtype=dtype)
    save_pretrained(target, draft, out)


def run(args) -> int:
    from tilecomp.models.presets import preset
    tcfg, dcfg = preset(args.preset, args.layers)
    dtype = DTYPES[args.dtype]
    prepare_out_dir(args.out, args.force)
    target, draft = meta_models(tcfg, dcfg, dtype)
    target_bytes = nbytes(target)
    size = target_bytes + nbytes(draft)
    streamed = target_bytes > STREAM_BYTES
    if streamed:
        init_streamed(target, draft, args.out, args.seed)
    else:
        init_in_memory(tcfg, dcfg, args.out, dtype, args.seed)
    print(f"wrote {args.out}: preset {args.preset}, {tcfg.num_hidden_layers} target layers, "
          f"{dcfg.num_hidden_layers} draft layers, {size / 2**20:.1f} MiB"
          f"{' (written layer by layer)' if streamed else ''}")
    return 0
