"""Random-weight models built directly on the benchmark device.

`tilecomp bench --preset P` needs no checkpoint: modules are built on the
meta device, materialised on the GPU, and filled in place. Expert weights are
random MXFP4 codes (random nibbles, scales near 2^-7) written straight into
the packed buffers, so a 256-expert model never exists in a wider dtype.
"""
import torch

from tilecomp.models import DFlashConfig, MiMoConfig, MiMoForCausalLM
from tilecomp.models.mimo import INIT_STD


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen_device = next(iter(module.parameters())).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.dtype == torch.uint8 and name.endswith("_scales"):
            t.copy_(torch.randint(118, 123, t.shape, generator=g, device=t.device, dtype=torch.uint8))
        elif t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=g, device=t.device, dtype=torch.uint8))
        elif name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            t.zero_()
        elif t.is_floating_point():
            t.normal_(0.0, INIT_STD, generator=g)
    return module


def random_target(cfg: MiMoConfig, device, dtype=torch.bfloat16, experts: str = "mxfp4",
                  seed: int = 0) -> MiMoForCausalLM:
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg, dtype=dtype, experts=experts)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return fill_random_(model, seed).eval()


def random_draft(dcfg: DFlashConfig, cfg: MiMoConfig, device, dtype=torch.bfloat16, seed: int = 1):
    from tilecomp.models.dflash import DFlashDraft
    with torch.device("meta"):
        draft = DFlashDraft(dcfg, cfg)
    draft = draft.to_empty(device=device).to(dtype)
    return fill_random_(draft, seed).eval()
