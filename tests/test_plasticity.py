import math

import pytest
import torch

from hybridlm.config import ConfigError, load_config
from hybridlm.plasticity import LocalLearning, NeuromodulatoryGate
from hybridlm.spiking import SpikingPCLayer


def _layer(**kw):
    torch.manual_seed(0)
    layer = SpikingPCLayer(8, 12, time_steps=5, threshold=0.4, trace_decay=0.4, **kw)
    torch.nn.init.normal_(layer.decode.weight, std=0.3)
    return layer.double().train()


def test_rule_is_minus_the_gradient_of_the_local_pc_energy():
    layer = _layer()
    layer.collect_hebbian = True
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    # record the traces r_{k-1} the forward pass used
    traces, lif = [], layer.lif_step

    def recording(current, v, r):
        traces.append(r.detach().clone())
        return lif(current, v, r)

    layer.lif_step = recording
    layer(x)
    x = layer.norm(x).detach()  # the layer explains its normalised input
    stat, count = layer.take_hebbian_statistic()
    rule = stat / count
    # F = 1/2 mean_tokens (1/T) sum_k ||x - W_d r_{k-1}||^2, activity held fixed
    w = layer.decode.weight.detach().clone().requires_grad_(True)
    energy = sum(((x - r @ w.t()) ** 2).sum(-1).mean() for r in traces) / (2 * len(traces))
    (grad,) = torch.autograd.grad(energy, w)
    torch.testing.assert_close(rule, -grad, rtol=1e-10, atol=1e-12)
    assert rule.abs().sum() > 0


def _learner(layer, eta=0.5, decay=0.0, gate=None):
    return LocalLearning(layer, eta, decay, gate or NeuromodulatoryGate("constant", 0, 1))


def test_local_step_moves_w_d_down_the_energy():
    layer = _layer()
    layer.collect_hebbian = True
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    layer(x)
    before = layer.stats["pc_energy"]
    _learner(layer, eta=0.05).step(torch.tensor(1.0))
    layer(x)
    assert layer.stats["pc_energy"] < before


def test_a_zero_gate_changes_nothing():
    layer = _layer()
    layer.collect_hebbian = True
    w0 = layer.decode.weight.detach().clone()
    layer(torch.randn(2, 3, 8, dtype=torch.float64))
    out = _learner(layer, gate=NeuromodulatoryGate("constant", 0.0, 0.0)).step(torch.tensor(3.0))
    assert out["plasticity/gate"] == 0.0
    assert torch.equal(layer.decode.weight, w0)


def test_surprise_gate_is_bounded_and_tracks_the_loss():
    gate = NeuromodulatoryGate("surprise", g_min=0.2, g_max=1.5, momentum=0.5)
    assert gate(4.0) == 1.0  # first loss is the expectation
    assert gate(8.0) == 1.5  # twice the expected loss, clipped to g_max
    assert gate(0.1) == 0.2  # far better than expected, clipped to g_min
    for bad in (dict(g_min=-1.0), dict(g_max=float("nan")), dict(g_min=2.0, g_max=1.0)):
        with pytest.raises(ValueError, match="gate bound"):
            NeuromodulatoryGate("surprise", **({"g_min": 0.0, "g_max": 1.0} | bad))


def test_non_finite_update_is_skipped_and_counted():
    layer = _layer()
    layer.collect_hebbian = True
    layer(torch.randn(2, 3, 8, dtype=torch.float64))
    layer._hebb[0, 0] = float("nan")
    w0 = layer.decode.weight.detach().clone()
    learner = _learner(layer)
    out = learner.step(torch.tensor(1.0))
    assert learner.skipped == 1 and out["plasticity/skipped"] == 1
    assert torch.equal(layer.decode.weight, w0)


def test_weights_stay_bounded_over_a_long_run():
    layer = _layer()
    layer.collect_hebbian = True
    learner = _learner(layer, eta=0.2, decay=0.05, gate=NeuromodulatoryGate("constant", 0, 2))
    norms = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(400):
            layer(3 * torch.randn(4, 4, 8, dtype=torch.float64, generator=g))
            learner.step(torch.tensor(1.0))
            norms.append(float(layer.decode.weight.norm()))
    assert all(math.isfinite(n) for n in norms)
    assert max(norms[200:]) < 1.5 * max(norms[:200]) + 1.0  # no drift to infinity
    assert max(norms[300:]) - min(norms[300:]) < 0.5 * max(norms[300:])


@pytest.mark.parametrize("mode, grad, local", [
    ("bptt", True, False), ("hebbian", False, True), ("hybrid", True, True)])
def test_modes_switch_what_learns(tiny, mode, grad, local):
    model = tiny(learning=mode).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.2)
    ids = torch.randint(5, 120, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    w = model.head.decode.weight
    assert (w.grad is not None and w.grad.abs().sum() > 0) == grad
    learner = model.local_learning()
    assert (learner is not None) == local
    if learner is not None:
        w0 = w.detach().clone()
        learner.step(torch.tensor(1.0))
        assert not torch.equal(w, w0)
    assert model.head.encode.weight.grad is not None  # the rest always learns by BPTT


def test_hebbian_mode_counts_w_d_as_learned(tiny):
    assert tiny(learning="hebbian").trainable_parameters() == tiny().trainable_parameters()


@pytest.mark.parametrize("override, key", [
    ("model.learning=oja", "model.learning"),
    ("model.hebbian_lr=-0.1", "model.hebbian_lr"),
    ("model.hebbian_lr=.inf", "model.hebbian_lr"),
    ("model.gate_min=-1", "model.gate_min"),
    ("model.gate_max=.nan", "model.gate_max"),
    ("model.gate=reward", "model.gate"),
])
def test_bad_plasticity_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/default.yaml", [override])
