import numpy as np

from tilecomp.cli import main
from tilecomp.train.data import document_starts, load_data


def fake_lib(root):
    for i in range(40):
        (root / f"m{i}.py").write_text(f'"""Doc {i}."""\n\ndef f{i}(x):\n    # add {i}\n    return x + {i}\n')
    return root


def test_train_data_builds_a_loadable_folder(tmp_path, capsys):
    (tmp_path / "Lib").mkdir()
    lib = fake_lib(tmp_path / "Lib")
    out = tmp_path / "data"
    assert main(["train", "data", "--lib", str(lib), "--out", str(out), "--vocab-size", "300"]) == 0
    assert '"train"' in capsys.readouterr().out
    data = load_data(out)
    assert data.vocab_size <= 300 and data.train.dtype == np.uint16
    assert len(document_starts(data.train)) + len(document_starts(data.heldout)) == 40
    assert len(data.prose) > 0


def test_missing_data_folder_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "target", "--data", str(tmp_path / "none"), "--run", str(tmp_path / "run"),
                 "--steps", "1", "--size", "miniature", "--quiet"])
    assert code == 2
    assert "train.npy: missing" in capsys.readouterr().err


def test_unknown_size_is_a_clean_error(tmp_path, capsys):
    fake_lib_dir = tmp_path / "Lib"
    fake_lib_dir.mkdir()
    fake_lib(fake_lib_dir)
    main(["train", "data", "--lib", str(fake_lib_dir), "--out", str(tmp_path / "d"), "--vocab-size", "280"])
    code = main(["train", "target", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"),
                 "--steps", "1", "--size", "huge", "--quiet"])
    assert code == 2 and "--size" in capsys.readouterr().err
