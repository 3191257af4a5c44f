"""Helpers of the graph-pass tests."""
import torch

from tilecomp.interpret import run_graph


def assert_same_outputs(graph, params, inputs, expected):
    got = run_graph(graph, params, inputs)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def kinds(graph):
    counts = {}
    for op in graph.ops:
        counts[op.kind] = counts.get(op.kind, 0) + 1
    return counts
