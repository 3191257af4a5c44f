"""tilecomp.models: the eager PyTorch reference (MiMo target, MXFP4 experts, checkpoints, presets)."""
from .cache import KVCache
from .checkpoint import load_config, load_pretrained, save_pretrained
from .config import AttnSpec, DFlashConfig, MiMoConfig
from .mimo import DenseExperts, MiMoForCausalLM, MXFP4Experts
from .mxfp4 import E2M1_VALUES, dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4
from .presets import PRESETS, preset

__all__ = [
    "AttnSpec", "DFlashConfig", "MiMoConfig", "MiMoForCausalLM", "MXFP4Experts", "DenseExperts",
    "KVCache", "E2M1_VALUES", "quantize_mxfp4", "dequantize_mxfp4", "fake_quantize_mxfp4",
    "PRESETS", "preset", "load_config", "load_pretrained", "save_pretrained",
]
