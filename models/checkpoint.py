"""Checkpoints in the Hugging Face layout: config.json + safetensors (optionally sharded).

  DIR/config.json                       MiMoConfig.to_dict() (+ quantization_config)
  DIR/model.safetensors                 or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  DIR/dflash/config.json                DFlashConfig.to_dict()           (optional draft)
  DIR/dflash/model.safetensors          the draft's own state_dict()

Experts are stored either stacked and pre-quantized (`mlp.experts.{gate,up,down}_proj_blocks`
/ `_scales`, uint8) or per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), the latter
quantized to MXFP4 at load when quantization_config.quant_method == "mxfp4".

Loading is lazy: the modules are built on the meta device, given empty storage once, and
filled one tensor at a time from memory-mapped files (peak RAM ~ model + one tensor).
"""
import inspect
import json
import math
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tilecomp.errors import CheckpointError, ConfigError

from .config import DFlashConfig, MiMoConfig
from .mimo import DenseExperts, MiMoForCausalLM, MXFP4Experts
from .mxfp4 import dequantize_mxfp4

CONFIG, WEIGHTS, INDEX, DRAFT_DIR = "config.json", "model.safetensors", "model.safetensors.index.json", "dflash"
PROJS = ("gate_proj", "up_proj", "down_proj")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
_EXPERTS_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\w+_proj)_(blocks|scales)$")


# --- config ------------------------------------------------------------------

def _read_json(file: str, error=ConfigError) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{file}: file not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def load_config(path) -> tuple[MiMoConfig, DFlashConfig | None]:
    """The target (and draft) configs of a checkpoint directory; reads no weights."""
    file = os.path.join(path, CONFIG)
    cfg = MiMoConfig.from_dict(_read_json(file), source=file)
    dfile = os.path.join(path, DRAFT_DIR, CONFIG)
    dcfg = None
    if os.path.exists(dfile):
        dcfg = DFlashConfig.from_dict(_read_json(dfile), source=dfile, target=cfg)
    return cfg, dcfg


# --- writing -----------------------------------------------------------------

def _expert_modules(module: torch.nn.Module) -> dict:
    return {name: m for name, m in module.named_modules() if isinstance(m, (MXFP4Experts, DenseExperts))}


def _is_expert_param(key: str, expert_modules) -> bool:
    return any(key.startswith(prefix + ".") for prefix in expert_modules)


def _per_expert_weights(module, e: int):
    if isinstance(module, DenseExperts):           # raw weights, even when training fake-quantizes
        return module.gate_proj[e].clone(), module.up_proj[e].clone(), module.down_proj[e].clone()
    return module.expert(e)                        # dequantized: exact in the module's dtype


def _num_experts(module) -> int:
    return (module.gate_proj_blocks if isinstance(module, MXFP4Experts) else module.gate_proj).shape[0]


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _target_tensors(target: MiMoForCausalLM, experts: str) -> dict:
    """Checkpoint tensors of the target in the chosen expert format, as name -> (nbytes, make()).

    Tensors are made only when their shard is written, so per-expert output never holds a
    dequantized copy of more experts than one shard's worth.
    """
    out = {}
    expert_modules = _expert_modules(target)
    for key, t in target.state_dict().items():
        if _is_expert_param(key, expert_modules):
            continue
        if target.config.tie_word_embeddings and key == "lm_head.weight":
            continue
        out[key] = (_nbytes(t.shape, t.dtype), lambda t=t: t)
    for prefix, module in expert_modules.items():
        if experts == "mxfp4":
            packed = module if isinstance(module, MXFP4Experts) else module.to_mxfp4()
            for key, t in packed.state_dict().items():
                out[f"{prefix}.{key}"] = (_nbytes(t.shape, t.dtype), lambda t=t: t)
            continue
        dtype = module.dtype if isinstance(module, MXFP4Experts) else module.gate_proj.dtype
        for e in range(_num_experts(module)):
            for j, proj in enumerate(PROJS):
                make = lambda m=module, e=e, j=j: _per_expert_weights(m, e)[j]   # noqa: E731
                out[f"{prefix}.{e}.{proj}.weight"] = (_expert_nbytes(module, j, dtype), make)
    return out


def _expert_nbytes(module, j: int, dtype) -> int:
    if isinstance(module, MXFP4Experts):
        blocks = (module.gate_proj_blocks, module.up_proj_blocks, module.down_proj_blocks)[j]
        return _nbytes((blocks.shape[1], blocks.shape[2] * 32), dtype)
    return _nbytes((module.gate_proj, module.up_proj, module.down_proj)[j].shape[1:], dtype)


def _write_tensors(tensors: dict, path: str, shard_size: int | None):
    """tensors: name -> (nbytes, make()); one file, or shards of about shard_size bytes + index."""
    def materialize(names):
        return {k: tensors[k][1]().detach().contiguous().cpu() for k in names}

    if shard_size is None:
        save_file(materialize(tensors), os.path.join(path, WEIGHTS), metadata={"format": "pt"})
        return
    shards, current, size = [], [], 0
    for key, (nbytes, _) in tensors.items():
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards):
        name = shard_name(i, len(shards))
        save_file(materialize(names), os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in names})
    write_index(path, weight_map, sum(nbytes for nbytes, _ in tensors.values()))


def shard_name(i: int, n: int) -> str:
    """File name of shard i (0-based) of n, the Hugging Face way."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(path: str, weight_map: dict[str, str], total_size: int):
    """DIR/model.safetensors.index.json: which shard holds each tensor."""
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def checkpoint_config(config: MiMoConfig) -> dict:
    """The target's config.json: its fields, MXFP4 experts declared, HF architecture names."""
    out = config.to_dict()
    out["quantization_config"] = {**(out.get("quantization_config") or {}), "quant_method": "mxfp4"}
    out.setdefault("architectures", ["MiMoV2FlashForCausalLM"])
    out.setdefault("model_type", "mimo_v2_flash")
    return out


def save_pretrained(target: MiMoForCausalLM, draft, path, shard_size: int | None = None,
                    experts: str = "mxfp4"):
    """Write target (and draft) in the HF layout. experts: "mxfp4" (stacked blocks/scales)
    or "per_expert" (one weight per expert and projection, quantized again at load)."""
    if experts not in ("mxfp4", "per_expert"):
        raise ValueError(f"save_pretrained: experts must be 'mxfp4' or 'per_expert', found {experts!r}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(checkpoint_config(target.config), f, indent=2)
    _write_tensors(_target_tensors(target, experts), path, shard_size)
    if draft is not None:
        ddir = os.path.join(path, DRAFT_DIR)
        os.makedirs(ddir, exist_ok=True)
        with open(os.path.join(ddir, CONFIG), "w") as f:
            json.dump(draft.config.to_dict(), f, indent=2)
        _write_tensors({k: (_nbytes(t.shape, t.dtype), lambda t=t: t) for k, t in draft.state_dict().items()},
                       ddir, None)


# --- reading -----------------------------------------------------------------

class TensorSource:
    """Tensor name -> safetensors file of a checkpoint directory; opened lazily (mmap)."""

    def __init__(self, path: str):
        self.path = path
        self._handles = {}
        index = os.path.join(path, INDEX)
        single = os.path.join(path, WEIGHTS)
        if os.path.exists(index):
            weight_map = _read_json(index, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' object")
            self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self.files = {k: single for k in self._open(single).keys()}
        else:
            raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX} found")

    def _open(self, file: str):
        if file not in self._handles:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: file not found (listed in {INDEX})")
            try:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a valid safetensors file or truncated ({e})") from None
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, shape, kind: str) -> torch.Tensor:
        """Read one tensor, checking its shape and its dtype kind ("float" or "uint8")."""
        if name not in self.files:
            raise CheckpointError(f"{self.path}: missing tensor '{name}' (expected {kind} {list(shape)})")
        file = self.files[name]
        handle = self._open(file)
        try:
            view = handle.get_slice(name)
        except SafetensorError:
            raise CheckpointError(f"{file}: missing tensor '{name}' (listed in {INDEX})") from None
        found_shape, code = list(view.get_shape()), view.get_dtype()
        ok_dtype = code in _FLOAT_CODES if kind == "float" else code == "U8"
        if not ok_dtype:
            raise CheckpointError(f"{file}: tensor '{name}': expected dtype {kind}, found {code}")
        if found_shape != list(shape):
            raise CheckpointError(f"{file}: tensor '{name}': expected shape {list(shape)}, found {found_shape}")
        try:
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: tensor '{name}' cannot be read ({e})") from None


def _kind(t: torch.Tensor) -> str:
    return "uint8" if t.dtype == torch.uint8 else "float"


def _expert_format(cfg: MiMoConfig, src: TensorSource) -> str:
    """'mxfp4' (stacked, pre-quantized), 'quantize' (per expert -> MXFP4) or 'dense' (per expert)."""
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    if not moe:
        return "mxfp4"
    prefix = f"model.layers.{moe[0]}.mlp.experts"
    if f"{prefix}.gate_proj_blocks" in src:
        return "mxfp4"
    if f"{prefix}.0.gate_proj.weight" in src:
        return "quantize" if cfg.quant_method == "mxfp4" else "dense"
    raise CheckpointError(f"{src.path}: missing tensor '{prefix}.gate_proj_blocks' (stacked MXFP4 "
                          f"experts) or '{prefix}.0.gate_proj.weight' (per-expert weights)")


@torch.no_grad()
def _fill_experts(module, prefix: str, src: TensorSource, fmt: str):
    """Per-expert checkpoint weights -> one expert at a time into the module."""
    for e in range(_num_experts(module)):
        ws = []
        for proj in PROJS:
            store = getattr(module, f"{proj}_blocks" if fmt == "quantize" else proj)
            N = store.shape[1]
            K = store.shape[2] * 32 if fmt == "quantize" else store.shape[2]
            ws.append(src.read(f"{prefix}.{e}.{proj}.weight", (N, K), "float").to(store.device))
        if fmt == "quantize":
            module.set_expert(e, *ws)
        else:
            for proj, w in zip(PROJS, ws):
                getattr(module, proj)[e].copy_(w)


@torch.no_grad()
def _fill(module: torch.nn.Module, src: TensorSource, fmt: str = "mxfp4"):
    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    expert_modules = _expert_modules(module)
    if fmt != "mxfp4":
        for prefix, m in expert_modules.items():
            _fill_experts(m, prefix, src, fmt)
    for name, t in module.state_dict().items():
        if fmt != "mxfp4" and _is_expert_param(name, expert_modules):
            continue
        if tied and name == "lm_head.weight":
            continue
        t.copy_(src.read(name, t.shape, _kind(t)))


def _check_quantization(cfg: MiMoConfig, path: str):
    if cfg.quant_method not in (None, "mxfp4"):
        raise CheckpointError(f"{os.path.join(path, CONFIG)}: quantization_config.quant_method: "
                              f"expected 'mxfp4' or no quantization_config, found {cfg.quant_method!r}")


def load_pretrained(path, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """-> (target MiMoForCausalLM, DFlashDraft or None), weights memory-mapped one at a time."""
    cfg, dcfg = load_config(path)
    _check_quantization(cfg, path)
    src = TensorSource(path)
    fmt = _expert_format(cfg, src)
    with torch.device("meta"):
        target = MiMoForCausalLM(cfg, dtype=dtype, experts="dense" if fmt == "dense" else "mxfp4")
    target = target.to_empty(device=device)
    if cfg.tie_word_embeddings:
        target.lm_head.weight = target.model.embed_tokens.weight
    _fill(target, src, fmt)
    target.eval()
    draft = None
    if dcfg is not None:
        draft = _load_draft(dcfg, cfg, os.path.join(path, DRAFT_DIR), dtype, device)
    return target, draft


def _load_draft(dcfg: DFlashConfig, cfg: MiMoConfig, ddir: str, dtype, device):
    from .dflash import DFlashDraft                      # owned by the draft module; imported lazily
    kwargs = {"dtype": dtype} if "dtype" in inspect.signature(DFlashDraft).parameters else {}
    with torch.device("meta"):
        draft = DFlashDraft(dcfg, cfg, **kwargs).to(dtype)
    draft = draft.to_empty(device=device)
    _fill(draft, TensorSource(ddir))
    return draft.eval()
