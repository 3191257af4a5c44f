"""MegakernelEngine on CPU (Triton interpreter, one program = interpreter order) against
ReferenceEngine: the same tokens, greedy and sampled, with and without the DFlash draft.

The interpreter pays per tile operation, so the default tests use the tiny preset
truncated to 2 target layers (full + SWA attention, dense + MoE, sinks, draft with
its own 2 layers); the whole tiny preset runs in the slow test.
"""
import dataclasses

import pytest
import torch

from tilecomp.codegen.harness import Megakernel
from tilecomp.codegen import layout as L
from tilecomp.codegen.layout import KIND_IDS, tile_blocks, tile_scales
from tilecomp.codegen.mxfp4_ptx import afrag_order, repack_words
from tilecomp.errors import DeadlockError, TilecompError
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.runtime.megakernel import MegakernelEngine, _scale_tiles
from tilecomp.runtime.reference import ReferenceEngine

MAX_LEN = 64


def models(seed, layers=2):
    torch.manual_seed(seed)
    cfg, dcfg = preset("tiny", layers=layers)
    target = MiMoForCausalLM(cfg)
    return target, DFlashDraft(dcfg, cfg)


def prompt(seed, n):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, 500, (n,), generator=g).tolist()


def both(target, draft, ids, n_new, on_tokens=None, **kw):
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, n_new, **kw)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN)
    return ref, engine, engine.generate(ids, n_new, on_tokens=on_tokens, **kw)


def test_dflash_greedy_equals_reference_tokens_and_acceptance(monkeypatch, arena_guards):
    target, draft = models(0)
    ids = prompt(0, 11)                        # longer than the window (8): the SWA ring wraps
    launches = []
    real_launch = Megakernel.launch

    def counted(self, *args, **kwargs):
        launches.append(self.module.KERNEL_NAME)
        return real_launch(self, *args, **kwargs)
    monkeypatch.setattr(Megakernel, "launch", counted)
    streamed = []
    ref, _, got = both(target, draft, ids, 6, on_tokens=streamed.extend)
    assert got.tokens == ref.tokens
    assert got.acceptance == ref.acceptance
    assert streamed == got.tokens
    # one launch per prompt chunk of 8, then exactly ONE launch per DFlash step
    assert launches == ["prefill_chunk"] * 2 + ["decode_step"] * len(got.acceptance)
    arena_guards()


def test_plain_greedy_equals_reference():
    target, draft = models(1)
    ids = prompt(1, 10)
    ref, _, got = both(target, draft, ids, 5, use_draft=False)
    assert got.tokens == ref.tokens
    assert got.acceptance == []


def test_split_qkv_tasks_and_tuning_switches_give_the_same_tokens():
    """One task per query head and a k and a v task per KV head (the GPU default), each q and k
    head's rotary rows apart from its other rows, 8 warps, other tiles, the experts as 2 tasks
    per kind that split the routed units at run time (the GPU default is one per program), their
    unit loops marked for flattening (XFLAT; the interpreter runs the nest as written), the linear
    tasks without an up matrix or a norm in their own K loop (UPLOOP 2): same tokens."""
    target, draft = models(4)
    ids = prompt(4, 9)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 4, use_draft=False)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1, num_warps=8,
                              tiles={"BLOCK_K": 32, "BLOCK_N": 32, "XFLAT": 1, "UPLOOP": 2},
                              lower={"expert_parts": 2, "qkv_split_rope": 1})
    records = engine.step_program("plain").records.tolist()
    qkv = [r for r in records if r[0] == KIND_IDS["qkv_rope_kv"]]
    moe_layers = sum(1 for i in range(target.config.num_hidden_layers) if target.config.is_moe(i))
    assert moe_layers and sum(r[0] == KIND_IDS["expert_down"] for r in records) == 2 * moe_layers
    assert engine.qkv_q_heads == 1 and engine.consts["BLOCK_K"] == 32
    got = engine.generate(ids, 4, use_draft=False)
    assert got.tokens == ref.tokens
    with torch.no_grad():       # tokens alone hardly see a wrong rotary half of a tiny random model
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    cfg = target.config
    # q heads and k heads as rotary-rows and other-rows tasks, v heads whole
    per_layer = [2 * cfg.attn(i).n_heads + 3 * cfg.attn(i).n_kv_heads for i in range(cfg.num_hidden_layers)]
    assert len(qkv) == sum(per_layer)


def test_qkv_rows_chunks_give_the_reference_logits():
    """qkv_rows: the q / k heads' other rows and the v heads' rows as chunks of 8 rows (each
    chunk a task, its rows named in the record) give the reference's logits."""
    target, draft = models(4)
    ids = prompt(4, 7)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1, lower={"qkv_rows": 8})
    records = engine.step_program("plain").records.tolist()
    row0, row1 = (L.kind_abi("qkv_rope_kv").arg_word(n) for n in ("row0", "row1"))
    ranged = [r for r in records if r[0] == KIND_IDS["qkv_rope_kv"] and r[row1] > r[row0]]
    assert ranged and all(r[row1] - r[row0] <= 8 for r in ranged)
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_qkv_spans_give_the_reference_logits_and_tokens():
    """qkv_span: each matrix's rows as tasks across head boundaries (rope_part 3), 20 rows
    (tiny's 24-row heads: tasks end inside heads and run into the next one): the reference's
    prompt logits and DFlash tokens (the chunks inside a task: test_bodies)."""
    target, draft = models(4)
    ids = prompt(4, 7)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 6)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, lower={"qkv_span": 20})
    abi = L.kind_abi("qkv_rope_kv")
    rp, row0, row1 = (abi.arg_word(n) for n in ("rope_part", "row0", "row1"))
    spans = [(r[row0], r[row1]) for r in engine.step_program("dflash").records.tolist()
             if r[0] == KIND_IDS["qkv_rope_kv"] and r[rp] == 3]
    assert (60, 80) in spans and all(b - a <= 20 for a, b in spans)
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    got = engine.generate(ids, 6)
    assert got.tokens == ref.tokens


def test_embed_columns_and_reduce_rows_give_the_reference():
    """embed_cols / reduce_rows (the embedding and each attention's merge spread over more
    tasks; at the DFlash block of 8 rows, reduce_rows 8 is one query head per merge task): the
    reference's prompt logits and DFlash tokens."""
    target, draft = models(4)
    ids = prompt(4, 7)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 6)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, lower={"embed_cols": 24, "reduce_rows": 8})
    records = engine.step_program("dflash").records.tolist()
    assert sum(r[0] == KIND_IDS["embed"] for r in records) > 2
    got = engine.generate(ids, 6)
    assert got.tokens == ref.tokens
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_qkv_single_chunk_loop_gives_the_reference_tokens():
    """QKV_LOOP 1 (qkv_rope_kv's one loop over (matrix, chunk); tiny has BLOCK_R 16 < BLOCK_N 64,
    so its chunks are 64 rows wide) with a task per query head and k / v tasks (the GPU's split),
    and the draft's context K/V: the reference's DFlash tokens and prompt logits."""
    target, draft = models(5)
    ids = prompt(5, 9)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 4)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1, tiles={"QKV_LOOP": 1})
    assert engine.consts["QKV_LOOP"] == 1 and engine.consts["BLOCK_R"] < engine.consts["BLOCK_N"]
    got = engine.generate(ids, 4)
    assert got.tokens == ref.tokens
    assert got.acceptance == ref.acceptance
    with torch.no_grad():       # tokens alone hardly see a wrong rotary half of a tiny random model
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_combine_gather_gives_the_reference_tokens():
    """COMB_GATHER 1 (moe_combine adds each row's chosen slots only, found from the router's
    weights) in the whole engine, plain and DFlash: the reference's tokens and acceptance and the
    prompt's logits (prefill chunks of several rows: rows choosing different experts)."""
    target, draft = models(9)
    ids = prompt(9, 11)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"COMB_GATHER": 1})
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN)
    for kw in ({"use_draft": False}, {}):
        want, got = ref.generate(ids, 4, **kw), engine.generate(ids, 4, **kw)
        assert got.tokens == want.tokens and got.acceptance == want.acceptance, kw
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qkv_loop", [0, 1])
def test_rotary_split_with_combined_kv_tasks_gives_the_reference_logits(qkv_loop):
    """qkv_split_rope with k and v in one task per KV head (qkv_split_kv 0): the rotary part
    projects k's rotary rows only, the other part k's other rows and v; under either q/k/v loop
    the prompt's logits are the reference's."""
    target, draft = models(10)
    ids = prompt(10, 9)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1, tiles={"QKV_LOOP": qkv_loop},
                              lower={"qkv_split_rope": 1, "qkv_split_kv": 0})
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_unknown_tile_override_is_named():
    target, draft = models(0)
    with pytest.raises(Exception, match="BLOCK_Q"):
        MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"BLOCK_Q": 8})


def test_sampled_follows_the_shared_rule_and_is_reproducible():
    target, draft = models(3)
    ids = prompt(3, 5)
    kw = dict(use_draft=False, temperature=0.9, top_p=0.9, seed=1234)
    ref, engine, got = both(target, draft, ids, 3, **kw)
    assert got.tokens == ref.tokens
    again = engine.generate(ids, 3, **kw)        # second request on the same engine: epochs go on
    assert again.tokens == got.tokens


def test_prompt_logits_within_fp32_tolerance():
    target, draft = models(4)
    ids = prompt(4, 10)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN)
    got = engine.prompt_logits(ids)
    want = target(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_schedule_not_in_interpreter_order_raises_deadlock_error():
    # two programs under the interpreter: program 0 waits for tasks program 1 has not run yet
    target, draft = models(5)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, programs=2)
    with pytest.raises(DeadlockError, match=r"first: program 0: task \d+ \(\w+ \[[^\]]+\]\) "
                                            r"waited on counter \d+ \([^)]+\): value \d+, target \d+"):
        engine.generate(prompt(5, 4), 2, use_draft=False)


@pytest.mark.slow
def test_whole_tiny_preset_dflash_greedy():
    target, draft = models(6, layers=None)
    ids = prompt(6, 12)
    ref, _, got = both(target, draft, ids, 4)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance


def test_cli_generate_with_the_megakernel_engine_prints_the_reference_tokens(tmp_path, capsys):
    from tilecomp.cli import main
    ckpt = tmp_path / "m"
    assert main(["init", "--preset", "tiny", "--layers", "2", "--out", str(ckpt), "--seed", "1"]) == 0
    outputs = {}
    for engine in ("reference", "megakernel"):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(ckpt), "--engine", engine, "--prompt-ids",
                     "1,2,3", "--max-new-tokens", "4"]) == 0
        outputs[engine] = capsys.readouterr().out.split()
    assert len(outputs["reference"]) == 4
    assert outputs["megakernel"] == outputs["reference"]


def test_engine_uses_compile_artifacts_and_refuses_ones_for_another_model(tmp_path):
    from tilecomp.codegen.build import compile_kernels
    from tilecomp.errors import TilecompError
    target, draft = models(9)
    compile_kernels(target.config, draft.config, tmp_path / "ok", programs=1)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, artifacts=tmp_path / "ok")
    assert engine.kernel_paths["decode_step"] == tmp_path / "ok" / "kernels" / "decode_step.py"
    other_cfg, other_dcfg = preset("small", layers=1)
    compile_kernels(other_cfg, other_dcfg, tmp_path / "other", programs=1)
    with pytest.raises(TilecompError, match="compiled for tile sizes"):
        MegakernelEngine(target, draft, max_len=MAX_LEN, artifacts=tmp_path / "other")


def test_kernel_files_launch_with_the_step_programs_tile_sizes(tmp_path):
    """A kernel file records the CPU tile sizes; the engine launches it with its own (a GPU adds
    layout.GPU_TUNING, --tile overrides): version 2's first default run silently kept BLOCK_K 64."""
    from tilecomp.codegen.build import compile_kernels
    from tilecomp.codegen.harness import Megakernel
    target, draft = models(10)
    compile_kernels(target.config, draft.config, tmp_path, programs=1)
    path = tmp_path / "kernels" / "decode_step.py"
    assert Megakernel.from_file(path, constexprs={"BLOCK_K": 128}).constexprs["BLOCK_K"] == 128
    with pytest.raises(ValueError, match="no tile size"):
        Megakernel.from_file(path, constexprs={"BLOCK_Q": 16})
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, artifacts=tmp_path, tiles={"BLOCK_K": 32})
    step = engine.step_program("plain")
    assert step.kernel.constexprs["BLOCK_K"] == 32


@pytest.mark.parametrize("mode,lo,hi", [(6, 65, 191), (8, 2, 252), (9, 34, 160)])
def test_scale_limited_dequantizations_only_for_the_scales_they_are_exact_for(mode, lo, hi):
    """MX_DOT 6 is exact for scale codes 65..191, MX_DOT 8 for 2..252, MX_DOT 9 for 34..160, all for all-zero groups:
    a model with a non-zero group outside gets MX_DOT 3, or a named error when the mode was asked
    for; an all-zero group at code 0 (what the quantizer writes) keeps the mode."""
    from tilecomp.runtime.megakernel import _exact_mx_dot
    target, draft = models(6)
    assert _exact_mx_dot(target, draft, {}, mode) == mode
    experts = next(m for m in target.modules() if hasattr(m, "gate_proj_scales"))
    with torch.no_grad():
        experts.gate_proj_blocks[0, 0, 0].zero_()
        experts.gate_proj_scales[0, 0, 0] = 0
        assert _exact_mx_dot(target, draft, {}, mode) == mode
        experts.gate_proj_blocks[0, 0, 0, 0] = 0x21
        assert _exact_mx_dot(target, draft, {}, mode) == 3
        with pytest.raises(TilecompError, match=rf"MX_DOT={mode} is exact for MXFP4 scale codes {lo}..{hi}; "
                                                r".*gate_proj_scales has non-zero groups with codes in 0..0"):
            _exact_mx_dot(target, draft, {"MX_DOT": mode}, mode)
        experts.gate_proj_scales[0, 0, 0] = hi + 1
        assert _exact_mx_dot(target, draft, {}, mode) == 3
        experts.gate_proj_scales[0, 0, 0] = hi
        assert _exact_mx_dot(target, draft, {}, mode) == mode


def test_word_code_experts_give_the_reference_tokens_and_ptx_lookups_are_refused_on_cpu():
    """End to end, MX_DOT 6 and MX_DOT 9 (the engine's repacked words, decoded by the Triton-op
    form of the PTX block, PTX_ASM 0) give the reference tokens; inline PTX (MX_DOT 8, MX_DOT 9
    with PTX_ASM 1) is refused in the interpreter with the reason."""
    target, draft = models(6)
    for tiles in ({"MX_DOT": 8}, {"MX_DOT": 9, "PTX_ASM": 1}):
        with pytest.raises(TilecompError, match=f"MX_DOT={tiles['MX_DOT']}.* dequantizes with inline PTX"):
            MegakernelEngine(target, draft, max_len=MAX_LEN, tiles=tiles)
    ids = prompt(6, 9)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 3, use_draft=False)
    for mode in (6, 9):
        engine = MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"MX_DOT": mode, "BLOCK_KX": 128})
        assert engine.consts["MX_DOT"] == mode
        assert engine.generate(ids, 3, use_draft=False).tokens == ref.tokens, mode
    # the arena holds the repacked codes, the model its own
    buffers = dict(target.named_buffers())
    names = [n for n in engine.builder.slots if n.endswith("_blocks")]
    assert names and all(n in buffers for n in names)
    for name in names:
        assert torch.equal(engine.arenas.view(name), repack_words(buffers[name])), name
        assert not torch.equal(engine.arenas.view(name), buffers[name]), name


def test_tiled_scales_give_the_reference_logits_and_are_refused_where_rows_are_not_words():
    """STILE 1 (codegen/layout.py tile_scales): the arena holds each MXFP4 scale tensor in the
    K-word-major layout and the step gives the reference's logits and tokens; with AFRAG 1 too
    (the codes in afrag_order before the MX_DOT 9 repack). The scale codes are
    spread per group first (random weights quantize to nearly one code), so a layout mix-up moves
    the logits. The tiny preset's K/32 (2 and 1 groups) are not whole words: an explicit STILE=1
    is refused with the tensor's name, the GPU default falls back to 0."""
    torch.manual_seed(9)
    cfg, dcfg = preset("tiny", layers=2)
    cfg = dataclasses.replace(cfg, hidden_size=256, moe_intermediate_size=256)   # K/32 = 8: 2 words a row
    target = MiMoForCausalLM(cfg)
    draft = DFlashDraft(dataclasses.replace(dcfg, hidden_size=256), cfg)
    g = torch.Generator().manual_seed(9)
    for name, buf in target.named_buffers():
        if name.endswith("_scales"):
            buf += torch.randint(0, 6, buf.shape, generator=g, dtype=torch.uint8)
    ids = prompt(9, 9)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 3, use_draft=False)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"MX_DOT": 9, "BLOCK_KX": 128, "STILE": 1})
    assert engine.consts["STILE"] == 1
    buffers = dict(target.named_buffers())
    names = [n for n in engine.builder.slots if n.endswith("_scales")]
    assert names
    for name in names:
        assert torch.equal(engine.arenas.view(name), tile_scales(buffers[name])), name
        assert not torch.equal(engine.arenas.view(name), buffers[name]), name
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    assert engine.generate(ids, 3, use_draft=False).tokens == ref.tokens
    # AFRAG on top (the codes in the wgmma operand's element order, WLEFT and XPIPE as on a GPU)
    # and the experts' inputs as operand buffers (XACT: x^T loaded K-major as the dots' operand)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"MX_DOT": 9, "BLOCK_KX": 128, "STILE": 1,
                                                                     "AFRAG": 1, "WLEFT": 1, "XPIPE": 1},
                              lower={"expert_operands": 1})
    assert engine.consts["AFRAG"] == 1 and engine.step_program("prefill").kernel.constexprs["XACT"] == 1
    for name in (n for n in engine.builder.slots if n.endswith("_blocks")):
        assert torch.equal(engine.arenas.view(name), repack_words(afrag_order(buffers[name]))), name
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(TilecompError, match="AFRAG=1 reorders MX_DOT 9's words.*MX_DOT is 3"):
        MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"MX_DOT": 3, "AFRAG": 1})
    # XTILE on top: the codes tile by tile (the logits: test_xeven_and_xtile_...); the arena then
    # depends on BLOCK_NX / BLOCK_KX, which a variant program may not change; K 256 is not whole
    # 512-wide tiles
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"MX_DOT": 9, "BLOCK_KX": 128, "BLOCK_NX": 64,
                                                                     "AFRAG": 1, "XTILE": 1})
    for name in (n for n in engine.builder.slots if n.endswith("_blocks")):
        assert torch.equal(engine.arenas.view(name), tile_blocks(repack_words(afrag_order(buffers[name])), 64, 128)), name
    # the interpreter widens the tiles to the widest task, but not BLOCK_NX under XTILE (the
    # arena's tile): the experts loop over 64-row sub-tiles and read the codes where they are
    assert engine.step_program("prefill").kernel.constexprs["BLOCK_NX"] == 64
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(TilecompError, match="BLOCK_NX.*arena"):
        engine.variant_program("prefill", {"BLOCK_NX": 32})
    with pytest.raises(TilecompError, match=r"XTILE=1 .*_blocks is \d+ rows x K 256, not whole 64 x 512 tiles"):
        MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"BLOCK_KX": 512, "BLOCK_NX": 64, "XTILE": 1})
    tiny, tiny_draft = models(9)
    with pytest.raises(TilecompError, match=r"STILE=1 .*_scales has 2 groups per row \(K/32\), not a multiple of 4"):
        MegakernelEngine(tiny, tiny_draft, max_len=MAX_LEN, tiles={"STILE": 1})
    assert _scale_tiles(tiny, tiny_draft, {}) == 0 and _scale_tiles(target, draft, {}) == 1


def test_expert_operand_buffers_give_the_reference_tokens():
    """LowerOptions.expert_operands: moe_route's normed rows and up_gate's act are "operand"
    buffers in the weight arena (the weights' dtype: bf16 on a GPU, fp32 here), every program's
    kernel runs with XACT 1 and reads them there; the DFlash step gives the reference's greedy
    tokens and acceptance. XACT follows the program: a --tile XACT is refused."""
    target, draft = models(5)
    ids = prompt(5, 9)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 4)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, lower={"expert_operands": 1})
    operands = [b for b in engine.schedule.buffers.values() if b.kind == "operand"]
    moe_layers = sum(target.config.is_moe(i) for i in range(target.config.num_hidden_layers))
    assert moe_layers and len(operands) == 2 * moe_layers           # xn and act of each MoE layer
    for b in operands:
        assert engine.builder.slots[f"tile.{b.name}"].arena == "w", b.name
    for kind in ("dflash", "plain", "prefill"):
        assert engine.step_program(kind).kernel.constexprs["XACT"] == 1, kind
    got = engine.generate(ids, 4)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    # a split router whose tasks each write a share of the normed rows (xn_split), as on a GPU
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN,
                              lower={"expert_operands": 1, "router_block": 4, "xn_split": 1})
    records = engine.step_program("dflash").records.tolist()
    xn0, xn1 = (L.kind_abi("moe_route").arg_word(n) for n in ("xn0", "xn1"))
    assert sum(r[0] == KIND_IDS["moe_route"] and r[xn1] > r[xn0] for r in records) >= 4 * moe_layers
    assert engine.generate(ids, 4).tokens == ref.tokens
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    assert MegakernelEngine(target, draft, max_len=MAX_LEN).step_program("plain").kernel.constexprs["XACT"] == 0
    with pytest.raises(TilecompError, match="XACT follow the compiled tile program"):
        MegakernelEngine(target, draft, max_len=MAX_LEN, tiles={"XACT": 1})


def test_dflash_step_with_the_gpu_lowering_gives_the_reference_tokens():
    """The DFlash step (a block of rows) lowered as on a GPU: experts as run-time balanced parts
    over the routed units, one query head per qkv task, k / v and rotary rows apart, attention
    chunks sized for the programs; greedy tokens and acceptance as the reference's."""
    target, draft = models(7)
    ids = prompt(7, 10)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 5)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1,
                              lower={"expert_parts": 3, "qkv_split_rope": 1, "kv_chunk": 0})
    records = engine.step_program("dflash").records.tolist()
    assert sum(r[0] == KIND_IDS["expert_up_gate"] for r in records) == 3 * sum(
        target.config.is_moe(i) for i in range(target.config.num_hidden_layers))
    got = engine.generate(ids, 5)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance


def test_attention_split_at_run_time_gives_the_reference_tokens():
    """kv_chunk 0: each attention's keys in view are split over its (KV head, chunk) tasks at run
    time (chunk_len < 0 in the records), not its cache's capacity: with a 128-position cache
    lowered for 2 programs (run in one, in the interpreter's order), the full layer's two chunks
    of at most 64 keys split the 70..86 keys in view (64 each, where 32-key chunks would miss
    some); plain and DFlash greedy tokens and acceptance and the prompt's logits are the
    reference's."""
    target, draft = models(8)
    ids = prompt(8, 70)
    max_len = 2 * MAX_LEN
    engine = MegakernelEngine(target, draft, max_len=max_len, lower={"kv_chunk": 0, "programs": 2})
    ref = ReferenceEngine(target, draft, max_len=max_len)
    abi = L.kind_abi("attn_partial")
    for name, kw in (("plain", {"use_draft": False}), ("dflash", {})):
        parts = [r for r in engine.step_program(name).records.tolist() if r[0] == abi.id]
        dyn = [r for r in parts if r[abi.arg_word("chunk_len")] < 0]
        assert dyn and max(r[abi.arg_word("n_chunks")] for r in dyn) >= 2, name
        want, got = ref.generate(ids, 6, **kw), engine.generate(ids, 6, **kw)
        assert got.tokens == want.tokens and got.acceptance == want.acceptance, name
    with torch.no_grad():                       # the prefill chunks' split: the prompt's logits
        torch.testing.assert_close(engine.prompt_logits(ids), target(torch.tensor([ids]))[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_read_back_returns_the_values_and_raises_on_a_timed_out_program():
    """A generation step reads its committed tokens and every program's timeout flag in one copy:
    the values come back as they were, and a set flag raises the DeadlockError naming the wait."""
    target, draft = models(5)
    step = MegakernelEngine(target, draft, max_len=MAX_LEN).step_program("plain")
    a, b = torch.tensor([3], dtype=torch.int32), torch.tensor([7, -2, 5], dtype=torch.int32)
    assert step.read_back(a, b) == [3, 7, -2, 5]
    step.errors[0] = torch.tensor([1, 0, 0, 4, 9])        # (flag, task, counter, value, target)
    with pytest.raises(DeadlockError, match=r"program 0: task 0 .* waited on counter 0 .*value 4, target 9"):
        step.read_back(a, b)


def test_expert_queue_gives_the_reference_tokens_logits_and_reports_its_own_wait():
    """expert_queue: the expert parts take their units from the layer's queue (XQUEUE) and
    expert_down waits per slot in its body. DFlash tokens and acceptance over several steps and
    the logits of a three-chunk prompt are the reference's (each launch after the first needs the
    plan task's zeroing of the queue: without it every later step finds the queue empty). A down
    part whose slot can never be done (its records claim 8 up_gate units per slot) ends in
    the DeadlockError that names the slot, the value and the target."""
    target, draft = models(7)
    ids = prompt(7, 10)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 6)
    lower = {"expert_parts": 3, "qkv_split_rope": 1, "kv_chunk": 0, "expert_queue": 1}
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, qkv_q_heads=1, lower=lower)
    step = engine.step_program("dflash")
    assert step.kernel.constexprs["XQUEUE"] == 1
    down = L.kind_abi("expert_down")
    syncs = {r[down.arg_word("sync")] for r in step.records.tolist() if r[0] == down.id}
    assert len(syncs) == sum(target.config.is_moe(i) for i in range(target.config.num_hidden_layers))
    assert min(syncs) >= 0
    got = engine.generate(ids, 6)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance
    long = prompt(7, 20)
    with torch.no_grad():
        torch.testing.assert_close(engine.prompt_logits(long), target(torch.tensor([long]))[0, -1],
                                   rtol=1e-4, atol=1e-4)
    inter = down.arg_word("inter")
    rows = step.records[:, 0] == down.id
    step.records[rows, inter] = 8 * step.kernel.constexprs["BLOCK_NX"]
    with pytest.raises(DeadlockError, match=r"task \d+ \(expert_down \[[^\]]+\]\) waited in its body on "
                                            r"slot 0's up_gate units done .*value 1, target 8"):
        engine.generate(ids, 2)


def test_xeven_and_xtile_on_the_gpu_expert_path_give_the_same_logits(monkeypatch):
    """XEVEN (no bounds masks on whole expert tiles) and XTILE (the codes stored tile by tile) on
    the GPU's expert path as far as the interpreter runs it: MX_DOT 9's repacked words (its
    Triton-op form), AFRAG's order, STILE's scale tiles, the weights as the left operand, the
    pipelined K loop, bf16-operand inputs and the unit queue, with the GPU's unwidened tile sizes
    on a 256-wide model whose expert tiles are whole (2 K steps per row band): the prompt's logits
    are the reference's and bit-identical to XEVEN 0 / XTILE 0's."""
    import tilecomp.runtime.megakernel as M
    real = M.tile_constexprs
    monkeypatch.setattr(M, "tile_constexprs", lambda tp, base, widen=True: real(tp, base, widen=False))
    cfg, _ = preset("tiny", layers=2)
    cfg = dataclasses.replace(cfg, hidden_size=256, moe_intermediate_size=256, intermediate_size=256)
    torch.manual_seed(9)
    target = MiMoForCausalLM(cfg)
    ids = prompt(9, 9)
    with torch.no_grad():
        want = target(torch.tensor([ids]))[0, -1]
    tiles = dict(MX_DOT=9, PTX_ASM=0, AFRAG=1, STILE=1, XPIPE=1, WLEFT=1, BLOCK_NX=64, BLOCK_KX=128)
    got = {}
    for even, xtile in ((0, 0), (1, 0), (1, 1)):
        engine = MegakernelEngine(target, None, max_len=32, tiles=dict(tiles, XEVEN=even, XTILE=xtile),
                                  lower={"expert_parts": 3, "expert_operands": 1, "expert_queue": 1})
        consts = engine.step_program("prefill").kernel.constexprs
        assert (consts["XEVEN"], consts["XTILE"], consts["XQUEUE"], consts["MX_DOT"], consts["AFRAG"],
                consts["STILE"]) == (even, xtile, 1, 9, 1, 1)
        with torch.no_grad():
            got[even, xtile] = engine.prompt_logits(ids)
    torch.testing.assert_close(got[1, 1], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1, 0], got[0, 0]) and torch.equal(got[1, 1], got[0, 0])
