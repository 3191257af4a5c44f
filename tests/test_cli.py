"""`tilecomp init` and `tilecomp generate` end to end on a tiny checkpoint, and their errors."""
import json
import os
import sys

import pytest
import torch

from tilecomp.cli import main
from tilecomp.commands import init as init_cmd
from tilecomp.models.checkpoint import load_pretrained
from tilecomp.runtime import ReferenceEngine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    return str(out)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def generate_json(capsys, ckpt, *extra):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt-ids", "5,6,7,8,9,10",
                             "--max-new-tokens", 12, "--engine", "reference", "--json", *extra)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1          # ONE object
    return json.loads(out)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "init" in out and "generate" in out


def test_init_then_generate_json_matches_the_python_api(tiny_dir, capsys):
    assert sorted(os.listdir(tiny_dir)) == ["config.json", "dflash", "model.safetensors"]
    report = generate_json(capsys, tiny_dir)
    assert set(report) == {"tokens", "acceptance", "mean_acceptance", "tokens_per_s"}
    assert len(report["tokens"]) == 12 and report["tokens_per_s"] > 0
    assert report["mean_acceptance"] == pytest.approx(
        sum(a + 1 for a in report["acceptance"]) / len(report["acceptance"]))
    target, draft = load_pretrained(tiny_dir, dtype=torch.float32)
    plain = ReferenceEngine(target, draft, max_len=64).generate([5, 6, 7, 8, 9, 10], 12, use_draft=False)
    assert report["tokens"] == plain.tokens
    no_draft = generate_json(capsys, tiny_dir, "--no-draft")
    assert no_draft["tokens"] == plain.tokens and no_draft["acceptance"] == []


def test_sampled_generation_is_reproducible(tiny_dir, capsys):
    a = generate_json(capsys, tiny_dir, "--temperature", 0.8, "--top-p", 0.9, "--seed", 7)
    b = generate_json(capsys, tiny_dir, "--temperature", 0.8, "--top-p", 0.9, "--seed", 7, "--no-draft")
    c = generate_json(capsys, tiny_dir, "--temperature", 0.8, "--top-p", 0.9, "--seed", 8)
    assert a["tokens"] == b["tokens"] != c["tokens"]


def test_streaming_prints_token_ids_and_a_summary(tiny_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", tiny_dir, "--prompt-ids", "1,2,3",
                             "--max-new-tokens", 9)
    assert code == 0
    assert len(out.split()) == 9 and all(t.isdigit() for t in out.split())
    assert "mean acceptance" in err and "tokens/s" in err


def write_tokenizer(path):
    """A word-level tokenizer whose ids stay inside the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    words = ["[UNK]", "def", "fibonacci", "(", "n", ")", ":", "return"] + [f"w{i}" for i in range(400)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(os.path.join(path, "tokenizer.json"))


def test_prompt_text_and_decoded_output_with_a_tokenizer(tmp_path, capsys):
    ckpt = tmp_path / "m"
    assert run_cli(capsys, "init", "--preset", "tiny", "--out", ckpt)[0] == 0
    write_tokenizer(ckpt)
    report = json.loads(run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "def fibonacci(n):",
                                "--max-new-tokens", 6, "--json")[1])
    assert len(report["tokens"]) == 6 and isinstance(report["text"], str)
    from tokenizers import Tokenizer
    assert report["text"] == Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode(report["tokens"])
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "def fibonacci(n):",
                           "--max-new-tokens", 6)
    assert code == 0 and out.strip() == report["text"].strip()


@pytest.mark.parametrize("argv,expected", [
    (["--prompt", "hello"], "tokenizer.json"),
    (["--prompt-ids", "1,x,3"], "--prompt-ids"),
    (["--prompt-ids", "1,2,99999"], "outside the vocabulary"),
    (["--prompt-ids", ",".join(["1"] * 20), "--max-len", "16"], "max positions 16"),
    (["--prompt-ids", "1,2", "--top-p", "0"], "--top-p"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt-ids", "1,2", "--cuda-graph"], "--cuda-graph: only with --engine megakernel"),
])
def test_generate_bad_input_exits_2_naming_the_field(tiny_dir, capsys, argv, expected):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", tiny_dir, *argv)
    assert code == 2 and err.startswith("error: ") and expected in err, err


def test_generate_bad_checkpoint_names_the_file(tmp_path, tiny_dir, capsys):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path / "nope", "--prompt-ids", "1")
    assert code == 2 and "nope" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    cfg["hiden_size"] = cfg.pop("hidden_size")
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", "--checkpoint", broken, "--prompt-ids", "1")
    assert code == 2 and "config.json" in err and "hidden_size" in err


def test_megakernel_engine_missing_is_a_clear_error(tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tilecomp.runtime.megakernel", None)   # import fails
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tiny_dir, "--prompt-ids", "1,2",
                           "--engine", "megakernel")
    assert code == 2 and "megakernel" in err


def test_init_refuses_a_non_empty_dir_and_bad_layers(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "init", "--preset", "tiny", "--out", tiny_dir)
    assert code == 2 and "--force" in err
    code, _, err = run_cli(capsys, "init", "--preset", "tiny", "--layers", "99", "--out", tmp_path / "x")
    assert code == 2 and "--layers" in err


def test_init_streams_big_models_layer_by_layer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(init_cmd, "STREAM_BYTES", 0)           # treat tiny as big
    out = tmp_path / "streamed"
    code, stdout, _ = run_cli(capsys, "init", "--preset", "tiny", "--layers", "3", "--out", out)
    assert code == 0 and "layer by layer" in stdout
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) == 3 + 1                                  # one per layer + the rest
    assert index["weight_map"]["model.layers.2.mlp.experts.up_proj_blocks"] != \
        index["weight_map"]["model.layers.1.mlp.experts.up_proj_blocks"]
    target, draft = load_pretrained(str(out), dtype=torch.float32)
    assert target.config.num_hidden_layers == 3 and draft is not None
    w = target.model.layers[1].mlp.experts.expert(0)[0]
    assert 0.005 < float(w.std()) < 0.05                        # random E2M1 codes at a sane scale
    report = generate_json(capsys, str(out))
    assert len(report["tokens"]) == 12
