"""Mixed precision (hybridlm.precision): every head trains in bf16 and fp16 on the CPU, with
float32 weights and a float32 local statistic; fp16 really runs under autocast with loss
scaling; bf16 trunk features take half the disk; devices and resumes that cannot do a
precision are refused. In-process, tiny models, a few steps each."""

import json

import pytest
import torch
import yaml
from transformers import get_constant_schedule

from hybridlm import precision
from hybridlm.checkpoints import resume_point, run_identity
from hybridlm.config import ConfigError
from hybridlm.engine import Engine, make_optimizer
from hybridlm.features import FeatureCache
from tests.conftest import tiny_model
from tests.test_checkpoints import _checkpoint
from tests.test_run_lifecycle import (
    Reached,
    _finished_head,
    stop_after_checks,  # noqa: F401 (a fixture, used by name)
    train_main,
)

IDS = torch.randint(5, 120, (4, 12), generator=torch.Generator().manual_seed(7))


def engine_for(model, mode: str, lr: float = 1e-2, **kw) -> Engine:
    acc = precision.make_accelerator(mode, cpu=True, **kw)
    model, opt = acc.prepare(model, make_optimizer(model, lr=lr, weight_decay=0.01))
    return Engine(acc, model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                  local=acc.unwrap_model(model).local_learning())


def trained(**kw):
    m = tiny_model(**kw).train()
    if hasattr(m.head, "readout"):  # a non-zero readout: the layer's weights get gradients
        torch.nn.init.normal_(m.head.readout.weight, std=0.2)
    return m


@pytest.mark.parametrize("head,mode,learning,backend", [
    ("spiking_pc", "no", "hybrid", "torch"), ("spiking_pc", "bf16", "hybrid", "torch"),
    ("spiking_pc", "fp16", "hybrid", "torch"), ("spiking_pc", "bf16", "hybrid", "cpu_shim"),
    ("ista", "fp16", "bptt", "torch"), ("mlp", "fp16", "bptt", "torch")])
def test_every_mode_trains_in_its_dtype_with_float32_weights(head, mode, learning, backend,
                                                             monkeypatch):
    engine = engine_for(trained(head=head, learning=learning, kernel_backend=backend), mode)
    base = engine.base
    if head == "spiking_pc":  # the kernel op gets the autocast dtype (it sums in float32)
        from hybridlm import spiking

        handed, op = [], spiking.kernels.sc_inference
        monkeypatch.setattr(spiking.kernels, "sc_inference",
                            lambda v1, lateral, *a, **k: handed.append((v1.dtype, lateral.dtype))
                            or op(v1, lateral, *a, **k))
    seen = []  # the dtype the head's last layer computed in: autocast is really on
    last = base.head.readout if hasattr(base.head, "readout") else base.head.down
    last.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    losses = []
    for _ in range(4):
        with engine.accelerator.autocast():
            out = engine.model(input_ids=IDS, labels=IDS)
        row = engine.step(out.loss, out.local_statistic)
        losses.append(out.loss.item())
        assert row and row["train/grad_norm"] > 0
        if learning != "bptt":  # the local rule's statistic sums tokens: float32
            assert {v.dtype for v in out.local_statistic.values()} == {torch.float32}
            assert float(out.local_statistic["tokens"]) == IDS.numel()
    assert set(seen) == {precision.DTYPES[mode]}
    if head == "spiking_pc":
        assert set(handed) == {(precision.DTYPES[mode],) * 2}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in base.parameters())
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("head.") for k in changed)
    if head == "spiking_pc":
        assert "head.dictionary" in changed
    assert ("train/loss_scale" in row) == (mode == "fp16")


def test_fp16_on_cpu_scales_the_loss_and_skips_a_step_that_overflows():
    """accelerate 1.15 leaves fp16 off on a CPU; make_accelerator adds the autocast and the
    GradScaler. A scale so large that the fp16 backward overflows: the optimizer step is
    skipped (weights untouched) and the scale halved."""
    engine = engine_for(trained(head="mlp"), "fp16")
    acc = engine.accelerator
    assert acc.native_amp and isinstance(acc.scaler, torch.amp.GradScaler)
    acc.scaler._init_scale = 2.0 ** 120  # scaled loss still finite in float32, not in fp16
    before = {k: v.clone() for k, v in engine.base.state_dict().items()}
    with acc.autocast():
        out = engine.model(input_ids=IDS, labels=IDS)
    row = engine.step(out.loss)
    assert row["train/loss_scale"] == 2.0 ** 119
    assert all(torch.equal(v, before[k]) for k, v in engine.base.state_dict().items())


def test_local_statistic_is_float32_and_exact_under_autocast():
    layer = tiny_model().head
    g = torch.Generator().manual_seed(0)
    x_c = torch.randn(2047, 32, generator=g)
    r = (torch.rand(2047, 16, generator=g) < 0.2).float()
    valid = torch.ones(2047, dtype=torch.bool)
    plain = layer.local_statistic(x_c, r, valid)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            mixed = layer.local_statistic(x_c, r, valid)
        for k, v in plain.items():
            assert mixed[k].dtype == torch.float32 and torch.equal(mixed[k], v), k
    assert float(plain["tokens"]) == 2047


def test_bf16_features_take_half_the_bytes_and_are_never_read_as_float32(tmp_path):
    model = tiny_model("mlp")
    ids = torch.randint(5, 120, (6, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    f32 = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", progress=False)
    bf16 = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", progress=False,
                                mixed_precision="bf16")
    assert not bf16.entry["reused"] and bf16.entry["file"] != f32.entry["file"]
    assert bf16.store.dtype == torch.bfloat16 and f32.store.dtype == torch.float32
    header = 128  # a .npy header; the data halves
    assert bf16.entry["bytes"] - header == (f32.entry["bytes"] - header) // 2
    index = torch.arange(6)
    feats = bf16.features(model, index, ids)
    assert feats.dtype == torch.float32  # handed out as float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the trunk computes under bf16
        fresh = model.encoder_features(ids).to(torch.bfloat16).float()
    assert torch.equal(feats, fresh)
    again = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", progress=False,
                                 mixed_precision="bf16")
    assert again.entry["reused"] and torch.equal(again.store, bf16.store)
    # an entry whose metadata says another dtype is rebuilt, not reinterpreted
    meta = tmp_path / "features" / bf16.entry["file"].replace(".npy", ".json")
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"dtype": "float32"}))
    rebuilt = FeatureCache.on_disk(model, ids, mask, tmp_path, "train", progress=False,
                                   mixed_precision="bf16")
    assert not rebuilt.entry["reused"] and torch.equal(rebuilt.store, bf16.store)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'bf16' .*Tesla V100.*'fp16'"):
        precision.check_supported("bf16", torch.device("cuda"))
    precision.check_supported("fp16", torch.device("cuda"))  # every CUDA GPU does fp16


def test_a_precision_torch_cannot_autocast_on_this_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda d: False)
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'fp16' is not supported on "
                                          r"this cpu.*use 'bf16' or 'no'"):
        precision.make_accelerator("fp16", cpu=True)


@pytest.mark.usefixtures("stop_after_checks")
def test_resume_in_another_precision_is_refused(tmp_path, capsys):
    # the run folder's config: train.mixed_precision is one of the keys compared
    out = tmp_path / "run"
    _finished_head(out, ["train.mixed_precision=bf16"])
    with pytest.raises(Reached):
        train_main(out, capsys, "train.mixed_precision=bf16", "--resume")
    rc, err = train_main(out, capsys, "--resume")
    assert rc == 2 and "another config" in err and "train.mixed_precision: 'bf16' -> 'no'" in err
    # and the checkpoint's identity, for a folder whose config.yaml was deleted
    ours = run_identity("hybridlm", "mlp", {}, {}, mixed_precision="fp16")
    _checkpoint(tmp_path / "ckpt", 4, identity=yaml.safe_load(yaml.safe_dump(ours)))
    assert resume_point(tmp_path / "ckpt", ours) is not None
    with pytest.raises(ConfigError, match="another mixed_precision than this run"):
        resume_point(tmp_path / "ckpt", ours | {"mixed_precision": "no"})
    # a checkpoint saved before the precision was recorded is a float32 one
    old = {k: v for k, v in ours.items() if k != "mixed_precision"}
    _checkpoint(tmp_path / "old", 4, identity=yaml.safe_load(yaml.safe_dump(old)))
    assert resume_point(tmp_path / "old", ours | {"mixed_precision": "no"}) is not None
    with pytest.raises(ConfigError, match="another mixed_precision"):
        resume_point(tmp_path / "old", ours)
