import pytest
import torch

from hybridlm.config import ConfigError, load_config
from hybridlm.plasticity import LocalLearning, NeuromodulatoryGate
from hybridlm.spiking import SpikingPCLayer


def _layer(n=24, d=16, t=6):
    torch.manual_seed(0)
    layer = SpikingPCLayer(d, n, time_steps=t, backend="torch").double().train()
    layer.init_from_data(torch.randn(4 * n, d, dtype=torch.float64),
                         torch.Generator().manual_seed(1))
    return layer


def _learner(layer, eta=0.5, gate=None):
    return LocalLearning(layer, eta, gate or NeuromodulatoryGate("constant", 0, 1))


def _forward_and_collect(layer, learner, x):
    out = layer(x, local_statistic=True)
    learner.collect(out.local_statistic)
    return out


def test_repeated_local_steps_lower_the_settled_energy():
    layer = _layer()
    learner = _learner(layer, eta=0.2)
    x = torch.randn(8, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    energies = []
    for _ in range(15):
        out = _forward_and_collect(layer, learner, x)
        energies.append(float(out.stats["pc_energy_loss"].detach()))
        learner.step(torch.tensor(1.0))
    assert energies[-1] < 0.9 * energies[0]


def test_micro_batches_add_up_to_the_whole_batch():
    x = torch.randn(6, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole, parts = _layer(), _layer()
    a, b = _learner(whole), _learner(parts)
    _forward_and_collect(whole, a, x)
    for chunk in x.split(2):  # gradient accumulation: three forwards, one step
        _forward_and_collect(parts, b, chunk)
    a.step(torch.tensor(1.0))
    b.step(torch.tensor(1.0))
    torch.testing.assert_close(parts.dictionary, whole.dictionary, rtol=1e-12, atol=1e-12)


def test_a_step_without_a_statistic_is_an_error():
    with pytest.raises(RuntimeError, match="no statistic was collected"):
        _learner(_layer()).step(torch.tensor(1.0))


def test_a_zero_gate_changes_nothing():
    layer = _layer()
    learner = _learner(layer, gate=NeuromodulatoryGate("constant", 0.0, 0.0))
    w0 = layer.dictionary.detach().clone()
    _forward_and_collect(layer, learner, torch.randn(2, 3, 16, dtype=torch.float64))
    out = learner.step(torch.tensor(3.0))
    assert out["plasticity/gate"] == 0.0
    assert torch.equal(layer.dictionary, w0)


def test_surprise_gate_is_bounded_and_tracks_the_loss():
    gate = NeuromodulatoryGate("surprise", g_min=0.2, g_max=1.5, momentum=0.5)
    assert gate(4.0) == 1.0  # first loss is the expectation
    assert gate(8.0) == 1.5  # twice the expected loss, clipped to g_max
    assert gate(0.1) == 0.2  # far better than expected, clipped to g_min
    for bad in (dict(g_min=-1.0), dict(g_max=float("nan")), dict(g_min=2.0, g_max=1.0)):
        with pytest.raises(ValueError, match="gate bound"):
            NeuromodulatoryGate("surprise", **({"g_min": 0.0, "g_max": 1.0} | bad))


def test_energy_gate_weights_tokens_by_their_own_settled_energy():
    """Per token g_t = F_T(t) / expected energy: the update is the statistic weighted by each
    token's energy, divided by the running expectation (the first batch is its own)."""
    layer = _layer()
    learner = _learner(layer, eta=0.1, gate=NeuromodulatoryGate("energy", 0.0, 10.0))
    x = torch.randn(4, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _forward_and_collect(layer, learner, x)
    stat = {k: v.clone() for k, v in learner.pending.items()}
    atoms = layer.atoms().detach().clone()
    out = learner.step(torch.tensor(1.0))
    expected_energy = float(stat["energy"] / stat["tokens"])
    assert out["plasticity/gate"] == pytest.approx(1.0)  # the batch mean of F_t / its mean
    step = 0.1 * stat["weighted_error_code"] / expected_energy / stat["tokens"]
    touched = step.abs().sum(0) > 0
    new = atoms[:, touched] + step[:, touched]
    torch.testing.assert_close(layer.dictionary[:, touched], new / new.norm(dim=0))


def test_non_finite_update_is_skipped_and_counted():
    layer = _layer()
    learner = _learner(layer)
    _forward_and_collect(layer, learner, torch.randn(2, 3, 16, dtype=torch.float64))
    learner.pending["error_code"][0, 0] = float("nan")
    w0 = layer.dictionary.detach().clone()
    out = learner.step(torch.tensor(1.0))
    assert learner.skipped == 1 and out["plasticity/skipped"] == 1
    assert torch.equal(layer.dictionary, w0)


def test_atoms_stay_unit_norm_over_a_long_run():
    layer = _layer()
    learner = _learner(layer, eta=0.5, gate=NeuromodulatoryGate("constant", 0, 2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(200):
            _forward_and_collect(layer, learner, 3 * torch.randn(4, 4, 16, dtype=torch.float64,
                                                                 generator=g))
            learner.step(torch.tensor(1.0))
    assert torch.isfinite(layer.dictionary).all()
    torch.testing.assert_close(layer.atoms().norm(dim=0), torch.ones(24, dtype=torch.float64))


@pytest.mark.parametrize("mode, grad, local", [
    ("bptt", True, False), ("hebbian", False, True), ("hybrid", True, True)])
def test_modes_switch_what_learns(tiny, mode, grad, local):
    model = tiny(learning=mode, rate_cost=0.05).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.2)
    ids = torch.randint(5, 120, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    w = model.head.dictionary
    assert (w.grad is not None and w.grad.abs().sum() > 0) == grad
    learner = model.local_learning()
    assert (learner is not None) == local
    if learner is not None:
        w0 = w.detach().clone()
        learner.collect(out.local_statistic)
        learner.step(torch.tensor(1.0))
        assert not torch.equal(w, w0)
    assert model.head.readout.weight.grad is not None  # the readout always learns by BPTT


def test_hebbian_mode_counts_the_dictionary_as_learned(tiny):
    assert tiny(learning="hebbian").trainable_parameters() == tiny().trainable_parameters()


@pytest.mark.parametrize("override, key", [
    ("model.learning=oja", "model.learning"),
    ("model.hebbian_lr=-0.1", "model.hebbian_lr"),
    ("model.hebbian_lr=.inf", "model.hebbian_lr"),
    ("model.gate_min=-1", "model.gate_min"),
    ("model.gate_max=.nan", "model.gate_max"),
    ("model.gate=reward", "model.gate"),
    ("model.spike_quantum=0", "model.spike_quantum"),
    ("model.spike_quantum=.nan", "model.spike_quantum"),
    ("model.rate_cost=0", "model.rate_cost"),
    ("model.l2_cost=-1", "model.l2_cost"),
    ("model.time_steps=0", "model.time_steps"),
    ("model.dictionary_init=kmeans", "model.dictionary_init"),
    ("model.pc_energy_weight=.inf", "model.pc_energy_weight"),
])
def test_bad_plasticity_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/default.yaml", [override])
