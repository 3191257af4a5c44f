import pytest

from tilecomp.errors import ConfigError, TilecompError
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import CompileOptions, compile_model
from tilecomp.settings import Settings, settings


def test_settings_come_from_the_given_environment():
    assert settings({}) == Settings(dump_dir=None, debug=0)
    assert settings({"TILECOMP_DUMP_DIR": "/tmp/d", "TILECOMP_DEBUG": "2"}) == Settings("/tmp/d", 2)
    with pytest.raises(ConfigError, match="TILECOMP_DEBUG: expected a non-negative integer, found 'loud'"):
        settings({"TILECOMP_DEBUG": "loud"})


def test_debug_1_reports_progress_on_stderr(capsys):
    compile_model(*preset("tiny", layers=1), settings=Settings(debug=1))
    err = capsys.readouterr().err
    assert "[tilecomp] trace decode step: " in err and "[tilecomp] decode_step: dce: " in err


@pytest.mark.parametrize("options, message", [
    (CompileOptions(dtype="fp8"), "dtype: expected one of bf16, f16, f32, found 'fp8'"),
    (CompileOptions(max_len=8), "max_len: expected at least two blocks"),
])
def test_bad_compile_options(options, message):
    with pytest.raises(TilecompError, match=message):
        compile_model(*preset("tiny", layers=1), options, settings=Settings())
