"""Faithfulness of the traced graphs: executing them on the tiny preset's real random
weights gives the module forwards' logits (target and draft), step after step."""
import pytest
import torch

from tilecomp.interpret import model_params, run_graph
from tilecomp.ir.graph import OpKind, parse_graph, print_graph, verify_graph
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.trace import TraceOptions, build_modules, trace_decode_step, trace_prefill_step

OPTIONS = TraceOptions(dtype="f32", max_len=64)
TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg, dcfg = preset("tiny")
    target, draft = MiMoForCausalLM(cfg).eval(), DFlashDraft(dcfg, cfg).eval()
    meta_target, meta_draft = build_modules(cfg, dcfg, "f32")
    graphs = {"prefill": verify_graph(trace_prefill_step(meta_target, meta_draft, OPTIONS)),
              "decode": verify_graph(trace_decode_step(meta_target, meta_draft, OPTIONS))}
    return target, draft, graphs


def zero_caches(graph):
    return {v.name: torch.zeros(v.type.shape) for v in graph.inputs if "cache" in v.name}


def carried_caches(graph, out):
    """Output caches of a step keyed by the input names they replace (same order)."""
    ins = [v.name for v in graph.inputs if "cache" in v.name]
    outs = [name for name in graph.outputs if "cache" in name]
    return {i: out[o] for i, o in zip(ins, outs)}


def greedy():
    return {"seed": torch.tensor(0, dtype=torch.int32), "temperature": torch.tensor(0.0),
            "top_p": torch.tensor(1.0)}


def run_prefill(graphs, params, prompt):
    g, caches, env = graphs["prefill"], None, None
    caches = zero_caches(g)
    logits = []
    for start in range(0, len(prompt), 8):
        ids = torch.tensor(prompt[start:start + 8], dtype=torch.int32)
        env = run_graph(g, params, {"ids": ids, "pos": torch.tensor(start, dtype=torch.int32),
                                    **greedy(), **caches}, return_all=True)
        caches = carried_caches(g, env)
        logits.append(env["%logits"])
    return torch.cat(logits), env["%next_tokens"], caches


@torch.no_grad()
def test_prefill_chunks_equal_the_full_forward(models):
    target, draft, graphs = models
    prompt = torch.randint(0, 500, (16,)).tolist()
    logits, next_tokens, _ = run_prefill(graphs, model_params(target, draft), prompt)
    ref = target(torch.tensor([prompt]))[0]
    torch.testing.assert_close(logits, ref, **TOL)
    assert next_tokens.tolist() == ref[8:].argmax(-1).tolist()


@torch.no_grad()
def check_decode_step(target, draft, graph, params, seq, block, n_new, taps, caches):
    """Run one decode step at pos = len(seq) and compare with the modules. Returns the env."""
    pos = len(seq)
    env = run_graph(graph, params, {"block": block, "pos": torch.tensor(pos, dtype=torch.int32),
                                    "n_new": torch.tensor(n_new, dtype=torch.int32), "taps": taps,
                                    **greedy(), **caches}, return_all=True)
    tap_ids = draft.config.target_layer_ids
    _, seq_taps = target(torch.tensor([seq]), tap_layers=tap_ids)
    draft_ref = draft(block[None].long(), seq_taps, None, pos, target)[0]
    torch.testing.assert_close(env["%draft.logits"], draft_ref, **TOL)
    assert env["%drafted"][1:].tolist() == draft_ref[1:].argmax(-1).tolist()

    verify_block = env["%verify_block"]
    assert verify_block[0] == block[0] and verify_block[1:].tolist() == env["%drafted"][1:].tolist()
    full_logits, full_taps = target(torch.tensor([seq + verify_block.tolist()]), tap_layers=tap_ids)
    torch.testing.assert_close(env["%logits"], full_logits[0, pos:], **TOL)
    torch.testing.assert_close(env["%next_taps"], full_taps[0, pos:], **TOL)

    posterior = full_logits[0, pos:].argmax(-1).tolist()
    acc = 0
    while acc < 7 and verify_block[acc + 1] == posterior[acc]:
        acc += 1
    assert int(env["%acc"]) == acc
    assert env["%tokens"].tolist()[:acc + 1] == verify_block[1:acc + 1].tolist() + [posterior[acc]]
    assert int(env["%next_pos"]) == pos + acc + 1 and int(env["%next_n_new"]) == acc + 1
    assert env["%next_block"].tolist() == [posterior[acc]] + [draft.config.mask_token_id] * 7
    return env


@torch.no_grad()
def test_decode_steps_equal_the_module_forwards(models):
    target, draft, graphs = models
    params, g = model_params(target, draft), graphs["decode"]
    prompt = torch.randint(0, 500, (16,)).tolist()
    _, next_tokens, caches = run_prefill(graphs, params, prompt)
    mask = draft.config.mask_token_id
    block = torch.tensor([int(next_tokens[-1])] + [mask] * 7, dtype=torch.int32)
    taps = torch.zeros(8, g.inputs[3].type.shape[1])
    env = check_decode_step(target, draft, g, params, prompt, block, 0, taps, caches)

    # Second step as if 2 drafts had been accepted: 3 new context rows, a ring that wraps.
    verify_block = env["%verify_block"].tolist()
    seq = prompt + verify_block[:3]
    block = torch.tensor([7] + [mask] * 7, dtype=torch.int32)
    check_decode_step(target, draft, g, params, seq, block, 3, env["%next_taps"], carried_caches(g, env))


def test_graphs_read_like_the_model(models):
    _, _, graphs = models
    g = graphs["decode"]
    counts = {}
    for op in g.ops:
        counts[op.kind] = counts.get(op.kind, 0) + 1
    cfg, dcfg = preset("tiny")
    layers, draft_layers = cfg.num_hidden_layers, dcfg.num_hidden_layers
    assert counts[OpKind.ATTENTION] == layers + draft_layers
    assert counts[OpKind.EXPERT_LINEAR] == 3 * sum(cfg.moe_layer_freq)
    assert counts[OpKind.ROUTE_TOPK] == sum(cfg.moe_layer_freq)
    assert counts[OpKind.SAMPLE] == 2 and counts[OpKind.ACCEPT] == 1 and counts[OpKind.KV_COMMIT] == 1
    sinks = [op for op in g.ops if op.kind is OpKind.ATTENTION and op.kwarg("sink")]
    assert len(sinks) == sum(cfg.hybrid_layer_pattern)
    assert parse_graph(print_graph(g)) == g
