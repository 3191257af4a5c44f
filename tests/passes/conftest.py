"""Shared fixtures of the graph-pass tests: the tiny preset traced in fp32, its real
random weights, random step inputs, and the unfused graph's outputs on them."""
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from tilecomp.interpret import model_params, run_graph
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.passes.lower import lower
from tilecomp.passes.pipeline import compile_model
from tilecomp.trace import TraceOptions, build_modules, trace_decode_step


@dataclass
class Step:
    """A traced step with weights, inputs and its outputs on them."""
    graph: object
    params: dict
    inputs: dict
    expected: dict

    def __iter__(self):
        return iter((self.graph, self.params, self.inputs, self.expected))

    def assert_same_outputs(self, graph, inputs=None, expected=None):
        """`graph` gives the same outputs as the traced graph (or `expected`) on the inputs."""
        got = run_graph(graph, self.params, inputs or self.inputs)
        expected = self.expected if expected is None else expected
        assert list(got) == list(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def kinds(graph) -> Counter:
    return Counter(op.kind for op in graph.ops)


@pytest.fixture(scope="session")
def tiny_step():
    """The tiny preset's traced decode step (fp32) with real random weights and random inputs."""
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
    return Step(graph, params, inputs, run_graph(graph, params, inputs))


@pytest.fixture(scope="session")
def tiny_tile():
    """The tiny preset's fused decode step lowered to an unscheduled tile program (passes return
    new programs, so the tests share one)."""
    cfg, dcfg = preset("tiny")
    return lower(compile_model(cfg, dcfg).fused)


@pytest.fixture
def count_kinds():
    return kinds


def _random_dag(seed: int, n: int):
    """n tasks; task i writes buffer b{i} and reads (and waits on) a few earlier tasks' buffers."""
    import random

    from tilecomp.ir.tile import COUNTER_LINE_SLOTS, Buffer, Counter, Task, TileProgram
    rng = random.Random(seed)
    buffers = {f"b{i}": Buffer(f"b{i}", "bf16", (8, rng.randint(1, 64) * 16), "activation") for i in range(n)}
    tasks = []
    for i in range(n):
        deps = sorted(rng.sample(range(i), min(i, rng.randint(0, 3))))
        tasks.append(Task(i, rng.choice(["linear", "attn_partial", "expert_down"]),
                          reads=[buffers[f"b{j}"].full() for j in deps], writes=[buffers[f"b{i}"].full()],
                          waits=[(f"c{j}", 1) for j in deps], signals=[(f"c{i}", 1)]))
    counters = {f"c{i}": Counter(f"c{i}", 1, i * COUNTER_LINE_SLOTS) for i in range(n)}
    return TileProgram(buffers, counters, tasks)


@pytest.fixture
def random_dag():
    """Builder of random tile programs (tile scheduler / verifier tests)."""
    return _random_dag
