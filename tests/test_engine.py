"""The training engine (hybridlm.engine): one step for make train, the continual stages, the
benchmarks and the multi-process tests. In-process, tiny models, a few steps each."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from transformers import get_constant_schedule

from hybridlm.config import load_config
from hybridlm.engine import Engine, NonFiniteLoss, make_optimizer
from tests.conftest import tiny_model
from tests.test_kernels import needs_cxx

IDS = torch.randint(5, 120, (4, 12), generator=torch.Generator().manual_seed(7))  # no padding


def engine_for(model, accum: int = 1, mixed: str = "no", lr: float = 1e-2, **kw) -> Engine:
    # accelerate keeps precision and accumulation in process-wide state: start it afresh
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum, mixed_precision=mixed)
    model, opt = acc.prepare(model, make_optimizer(model, lr=lr, weight_decay=0.01))
    return Engine(acc, model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                  local=acc.unwrap_model(model).local_learning(), **kw)


def train(engine: Engine, batches: list[torch.Tensor]) -> list:
    """One engine step per micro-batch, inside accelerate's accumulation context."""
    rows = []
    for ids in batches:
        with engine.accelerator.accumulate(engine.model), engine.accelerator.autocast():
            out = engine.model(input_ids=ids, labels=ids)
            rows.append(engine.step(out.loss, out.local_statistic))
    return rows


def weights(engine: Engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.base.state_dict().items()}


def trained(**kw):
    m = tiny_model(**kw).train()
    if hasattr(m.head, "readout"):  # a non-zero readout: the layer's weights get gradients
        torch.nn.init.normal_(m.head.readout.weight, std=0.2)
    return m


def test_a_step_clips_steps_and_logs():
    engine = engine_for(trained(head="mlp"))
    before = weights(engine)
    (row,) = train(engine, [IDS])
    assert set(row) == {"train/grad_norm"} and row["train/grad_norm"] > 0
    after = weights(engine)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(("head.", "lm_bias")) for k in changed)
    assert all(p.grad is None or not p.grad.any() for p in engine.params)  # zeroed


@pytest.mark.parametrize("gate", ["constant", "surprise"])
def test_accumulated_micro_batches_step_like_the_whole_batch(gate):
    """Two micro-batches of 2 with accumulation = one batch of 4: the gradient (DDP-style mean),
    the local rule's statistic (summed) and the surprise gate (the step's mean loss)."""
    kw = dict(head="spiking_pc", learning="hybrid", gate=gate, hebbian_lr=0.5)
    # one after the other: accelerate keeps the accumulation count in process-wide state
    # (the engine of `whole` would read the second one's)
    whole = engine_for(trained(**kw))
    rows = [train(whole, [IDS])[0] for _ in range(3)]
    parts = engine_for(trained(**kw), accum=2)
    for w in rows:
        first, second = train(parts, [IDS[:2], IDS[2:]])
        assert first == {} and set(second) == set(w)  # the first only accumulated
        assert second["plasticity/gate"] == pytest.approx(w["plasticity/gate"], rel=1e-5)
    a, b = weights(whole), weights(parts)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_non_finite_loss_is_skipped_then_refused_after_patience():
    engine = engine_for(trained(head="mlp"), patience=3)
    before = weights(engine)
    out = engine.model(input_ids=IDS, labels=IDS)
    nan = out.loss * float("nan")
    assert engine.step(nan) is None and engine.step(nan) is None
    assert engine.skipped == 2 and engine.bad_in_a_row == 2
    assert all(torch.equal(v, weights(engine)[k]) for k, v in before.items())  # untouched
    assert train(engine, [IDS])[0] and engine.bad_in_a_row == 0  # a finite step resets it
    for _ in range(2):
        engine.step(nan)
    with pytest.raises(NonFiniteLoss, match="3 steps in a row"):
        engine.step(nan)


def test_settled_energy_joins_the_loss_when_weighted():
    plain, weighted = trained(pc_energy_weight=0.0), trained(pc_energy_weight=0.5)
    a = plain(input_ids=IDS, labels=IDS)
    b = weighted(input_ids=IDS, labels=IDS)
    energy = b.head_stats["pc_energy_loss"]
    assert energy > 0
    torch.testing.assert_close(b.loss, a.loss + 0.5 * energy)
    b.loss.backward()  # the energy term reaches the dictionary
    a.loss.backward()
    assert not torch.allclose(weighted.head.dictionary.grad, plain.head.dictionary.grad)


def test_trainable_trunk_layers_train_and_the_rest_stays_frozen():
    engine = engine_for(trained(head="mlp", trainable_encoder_layers=1))
    before = weights(engine)
    for _ in range(2):
        train(engine, [IDS])
    after = weights(engine)
    changed = {k.split(".")[0] + "." + ".".join(k.split(".")[1:4]) for k in before
               if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder.encoder.layer.1") for k in changed)  # the top layer
    assert not any(k.startswith(("encoder.encoder.layer.0", "encoder.embeddings"))
                   for k in changed)


def test_bf16_autocast_trains_a_non_spiking_head_in_float32_weights():
    engine = engine_for(trained(head="mlp"), mixed="bf16")
    rows = train(engine, [IDS, IDS])
    assert all(r and r["train/grad_norm"] > 0 for r in rows)
    assert all(p.dtype == torch.float32 for p in engine.base.parameters())


def test_mixed_precision_with_a_spiking_head_loads():  # trained: tests/test_precision.py
    cfg = load_config("configs/quick.yaml", ["train.mixed_precision=bf16"])
    assert cfg.train.mixed_precision == "bf16" and "spiking_pc" in cfg.train.heads


@needs_cxx
def test_compiled_kernel_backend_trains_like_the_reference():
    """The fused CPU kernels end to end: the same training steps as the plain-torch ops."""
    kw = dict(head="spiking_pc", learning="hybrid", gate="surprise")
    ref = engine_for(trained(kernel_backend="torch", **kw).double())
    shim = engine_for(trained(kernel_backend="cpu_shim", **kw).double())
    for _ in range(3):
        (a,), (b,) = train(ref, [IDS]), train(shim, [IDS])
        assert a["plasticity/gate"] == pytest.approx(b["plasticity/gate"], rel=1e-9)
    wa, wb = weights(ref), weights(shim)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-9, atol=1e-10, msg=k)
