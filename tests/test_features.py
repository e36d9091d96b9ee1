"""The disk cache of frozen-trunk features: built once, reused, and rebuilt when damaged."""

import json

import numpy as np
import pytest
import torch

from hybridlm.features import FeatureCache, cache_report


@pytest.fixture
def blocks():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (7, 10), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[-1, 6:] = False
    return ids, mask


def test_built_once_then_reused_with_the_same_values(tiny, tmp_path, blocks):
    model = tiny("mlp")
    ids, mask = blocks
    built = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", batch_size=3,
                                 progress=False)
    assert not built.entry["reused"] and built.misses == 7
    torch.testing.assert_close(built.store, model.encoder_features(ids), rtol=0, atol=0)
    again = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", progress=False)
    assert again.entry["reused"] and again.encode_seconds == 0
    index = torch.tensor([4, 0])
    assert torch.equal(again.features(model, index, ids[index]), built.store[index])
    report = cache_report([built, again])
    assert (report["entries_built"], report["entries_reused"]) == (1, 1)
    assert report["seconds_saved"] == round(built.entry["encode_seconds"], 1)


def test_other_data_or_another_trunk_get_their_own_entry(tiny, tmp_path, blocks):
    ids, mask = blocks
    FeatureCache.on_disk(tiny("mlp"), ids, mask, tmp_path, "train", progress=False)
    other = ids.clone()
    other[0, 0] += 1
    assert not FeatureCache.on_disk(tiny("mlp"), other, mask, tmp_path, "train",
                                    progress=False).entry["reused"]
    deeper = tiny("mlp", trainable_encoder_layers=1)  # features from below the top layer
    assert not FeatureCache.on_disk(deeper, ids, mask, tmp_path, "train",
                                    progress=False).entry["reused"]
    assert len(list((tmp_path / "features").glob("*.npy"))) == 3


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop metadata", "bad shape"])
def test_a_damaged_entry_is_detected_and_rebuilt(tiny, tmp_path, blocks, damage, capsys):
    model = tiny("mlp")
    ids, mask = blocks
    good = FeatureCache.on_disk(model, ids, mask, tmp_path, "val", progress=False)
    expected = good.store.clone()
    (npy,) = (tmp_path / "features").glob("*.npy")
    meta = npy.with_suffix(".json")
    del good
    if damage == "flip a byte":
        data = bytearray(npy.read_bytes())
        data[-5] ^= 0xFF
        npy.write_bytes(bytes(data))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "drop metadata":
        meta.unlink()
    else:
        m = json.loads(meta.read_text())
        meta.write_text(json.dumps(m | {"shape": [1, 2, 3]}))
    rebuilt = FeatureCache.on_disk(model, ids, mask, tmp_path, "val", progress=False)
    assert not rebuilt.entry["reused"]
    if damage != "drop metadata":
        assert "encoding it again" in capsys.readouterr().out
    torch.testing.assert_close(rebuilt.store, expected, rtol=0, atol=0)
    assert np.load(npy).shape == (7, 10, 32)
