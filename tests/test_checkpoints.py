import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.checkpoints import (
    PROGRESS,
    file_checksums,
    latest_intact,
    read_progress,
    resume_point,
    run_identity,
    tokenizer_identity,
    verify,
    write_progress,
)
from hybridlm.config import ConfigError


def _checkpoint(root, step, payload=b"weights" * 1000, identity=None):
    folder = root / f"step_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "optimizer.bin").write_bytes(payload[::-1])
    write_progress(folder, {"step": step, "identity": identity, "files": file_checksums(folder)})
    return folder


class _Tokenizer:
    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


def test_intact_checkpoint_verifies(tmp_path):
    assert verify(_checkpoint(tmp_path, 1)) is None


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 13_999), st.sampled_from(["model.safetensors", "optimizer.bin"]))
def test_a_flipped_byte_anywhere_is_detected(tmp_path_factory, offset, name):
    folder = _checkpoint(tmp_path_factory.mktemp("c"), 3, bytes(range(256)) * 55)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in verify(folder)


def test_truncated_missing_and_unfinished_are_detected(tmp_path):
    a = _checkpoint(tmp_path / "a", 1)
    (a / "model.safetensors").write_bytes(b"short")
    assert "checksum" in verify(a)
    b = _checkpoint(tmp_path / "b", 1)
    (b / "optimizer.bin").unlink()
    assert "missing" in verify(b)
    c = _checkpoint(tmp_path / "c", 1)
    (c / PROGRESS).unlink()
    assert "cut off" in verify(c)
    d = _checkpoint(tmp_path / "d", 1)
    (d / PROGRESS).write_text("{{{ not yaml")
    assert "checksum" in verify(d)


@pytest.mark.parametrize("edit", [
    lambda text: text.replace("step: 1", "step: 7"),  # still valid YAML, another position
    lambda text: text.replace("files:", "files: 5\nx:"),
    lambda text: text.rpartition("# sha256")[0],  # its checksum line lost
    lambda text: "{{{ not yaml\n",
])
def test_a_damaged_progress_file_is_detected_and_the_previous_checkpoint_taken(tmp_path, edit):
    good = _checkpoint(tmp_path, 1)
    bad = _checkpoint(tmp_path, 2)
    (bad / PROGRESS).write_text(edit((good / PROGRESS).read_text()))
    assert verify(bad) is not None
    with pytest.warns(UserWarning, match="step_0000002 skipped: progress.yaml"):
        assert latest_intact(tmp_path) == good
    assert read_progress(good)["step"] == 1


def test_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    good = _checkpoint(tmp_path, 4)
    bad = _checkpoint(tmp_path, 8)
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[random.Random(0).randrange(len(data))] ^= 1
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_0000008 skipped"):
        assert latest_intact(tmp_path) == good
    assert latest_intact(tmp_path / "nothing") is None


def _identity(head, model, words, data=None, trunk="c" * 64):
    return run_identity("hybridlm", head, model, tokenizer_identity(_Tokenizer(words)),
                        trunk=trunk, data=data or {"docs": "a" * 64})


def test_resume_point_accepts_its_own_run_and_names_what_differs_otherwise(tmp_path):
    words = ["[PAD]", "the", "cat"]
    model = {"encoder": "smollm2", "n_neurons": 256, "time_steps": 4}
    ours = _identity("spiking_pc", model, words)
    folder = _checkpoint(tmp_path, 4, identity=yaml.safe_load(yaml.safe_dump(ours)))
    assert resume_point(tmp_path, ours) == folder
    assert resume_point(tmp_path / "none", ours) is None
    cases = [
        (_identity("mlp", model, words), "another head"),
        (_identity("spiking_pc", model | {"n_neurons": 512}, words), "another model.n_neurons"),
        (_identity("spiking_pc", model, words[::-1]), "another tokenizer"),
        (_identity("spiking_pc", model, words, {"docs": "b" * 64}), "another data.docs than"),
        # the frozen trunk is not in the checkpoint: another trunk's weights (same name) or
        # another trunk (its name is model.encoder) are refused, not trained on silently
        (_identity("spiking_pc", model, words, trunk="d" * 64), "another trunk_sha256 than"),
        (_identity("spiking_pc", model | {"encoder": "minilm"}, words), "another model.encoder"),
    ]
    for theirs, message in cases:
        with pytest.raises(ConfigError, match=message):
            resume_point(tmp_path, theirs)


def test_resume_point_refuses_a_checkpoint_without_identity(tmp_path):
    _checkpoint(tmp_path, 4)
    with pytest.raises(ConfigError, match="records no model identity"):
        resume_point(tmp_path, _identity("mlp", {}, ["a"]))
