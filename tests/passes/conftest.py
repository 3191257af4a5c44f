"""Shared fixtures of the graph-pass tests: the tiny preset traced in fp32, its real
random weights, random step inputs, and the unfused graph's outputs on them."""
import pytest
import torch

from tilecomp.interpret import model_params, run_graph
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.trace import TraceOptions, build_modules, trace_decode_step


@pytest.fixture(scope="session")
def tiny_step():
    """(traced decode graph, params, inputs, outputs of the traced graph)."""
    torch.manual_seed(1)
    cfg, dcfg = preset("tiny")
    params = model_params(MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg))
    graph = trace_decode_step(*build_modules(cfg, dcfg, "f32"), TraceOptions(dtype="f32", max_len=40))
    inputs = {}
    for v in graph.inputs:
        if v.type.dtype.is_float:
            inputs[v.name] = torch.randn(v.type.shape) * 0.5
    inputs.update({"%block": torch.tensor([5] + [dcfg.mask_token_id] * 7, dtype=torch.int32),
                   "%pos": torch.tensor(21, dtype=torch.int32), "%n_new": torch.tensor(3, dtype=torch.int32),
                   "%seed": torch.tensor(3, dtype=torch.int32), "%temperature": torch.tensor(0.0),
                   "%top_p": torch.tensor(1.0)})
    return graph, params, inputs, run_graph(graph, params, inputs)
