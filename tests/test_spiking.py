import math

import pytest
import snntorch.surrogate as sur
import torch

from hybridlm.kernels import reference
from hybridlm.spiking import ISTALayer, SpikingPCLayer, spike


@pytest.mark.parametrize("name, alpha, theirs", [
    ("atan", 2.0, sur.atan(alpha=2.0)),
    ("atan", 3.5, sur.atan(alpha=3.5)),
    ("fast_sigmoid", 25.0, sur.fast_sigmoid(slope=25)),
    ("fast_sigmoid", 5.0, sur.fast_sigmoid(slope=5)),
])
def test_surrogate_matches_snntorch(name, alpha, theirs):
    u = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    ours = spike(u, name, alpha)
    ref = theirs(u.detach().clone().requires_grad_(True))
    assert torch.equal(ours, (u > 0).double())
    (g_ours,) = torch.autograd.grad(ours.sum(), u)
    u2 = u.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(theirs(u2).sum(), u2)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.detach(), ours.detach())


@pytest.mark.parametrize("name, alpha, smooth", [
    # The surrogate derivative is the exact derivative of a smooth step function.
    ("atan", 2.0, lambda u, a: torch.atan(math.pi / 2 * a * u) / math.pi + 0.5),
    ("fast_sigmoid", 25.0, lambda u, k: u / (1 + k * u.abs())),
])
def test_surrogate_equals_finite_differences_of_its_smooth_step(name, alpha, smooth):
    u = torch.tensor([-1.3, -0.4, -0.05, 0.02, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(spike(u, name, alpha).sum(), u)
    h = 1e-6
    fd = (smooth(u.detach() + h, alpha) - smooth(u.detach() - h, alpha)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)



@pytest.fixture(scope="module")
def trunk_states():
    """Real trunk states: all-MiniLM-L6-v2 (run causally) over real text, (tokens, 384)."""
    from transformers import AutoModel, AutoTokenizer

    from hybridlm.corpora import documents
    from hybridlm.trunks import resolve_trunk

    path = resolve_trunk("minilm").path
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path,
                                                                              is_decoder=True)
    texts = [t[:1500] for _, (_, t) in zip(range(2), documents("builtin:python_reference"))]
    texts += [t[3000:4500] for _, (_, t) in zip(range(2), documents("builtin:shakespeare"))]
    with torch.no_grad():
        states = [enc(**tok(t, return_tensors="pt", truncation=True, max_length=256))
                  .last_hidden_state[0] for t in texts]
    return torch.cat(states)  # (about 1,000 tokens, 384)


def _layer(d, n=64, t=8, init="data", states=None, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = SpikingPCLayer(d, n, time_steps=t, backend="torch", **kw).to(dtype)
    if init == "data":
        layer.init_from_data(states[: 4 * n].to(dtype), torch.Generator().manual_seed(1))
    return layer


def _energy_path(layer, x_c, spikes):
    """F after 0..T steps, recomputed from scratch from the spikes: (T + 1, M)."""
    counts = torch.zeros(len(x_c), spikes.shape[-1], dtype=x_c.dtype)
    path = [layer.energy(x_c, counts)]
    for s in spikes:
        counts = counts + layer.delta * s.to(x_c.dtype)
        path.append(layer.energy(x_c, counts))
    return torch.stack(path)


@pytest.mark.parametrize("init", ["data", "random", "aligned"])
@pytest.mark.parametrize("t, delta, mu, nu", [(1, 1.0, 0.0, 0.1), (8, 1.0, 0.0, 0.1),
                                               (16, 0.5, 0.3, 0.05), (8, 2.0, 0.0, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_energy_never_rises_and_spikes_stay_under_the_bound(trunk_states, init, t, delta, mu,
                                                            nu, dtype):
    """On real trunk states, for every token and every inner step: F(r_k) <= F(r_{k-1})
    (recomputed from the spikes, not taken from the layer's own bookkeeping), and spikes per
    token <= ||x_c||^2 / (2 nu delta). `aligned`: pairs of identical atoms, so firing every
    suprathreshold neuron at once would overshoot and the layer has to hold some back."""
    d = trunk_states.shape[1]
    layer = _layer(d, 96, t, "random" if init == "aligned" else init, trunk_states, dtype,
                   spike_quantum=delta, l2_cost=mu, rate_cost=nu)
    if init == "aligned":
        with torch.no_grad():
            layer.init_from_data(trunk_states[:400].to(dtype), torch.Generator().manual_seed(1))
            layer.dictionary[:, 48:] = layer.dictionary[:, :48]
    with torch.no_grad():
        x_c = layer.centred(trunk_states.to(dtype))
        r, spikes, d_energy = layer.infer(x_c)
        path = _energy_path(layer, x_c, spikes)
    tol = (1e-9 if dtype == torch.float64 else 2e-5) * path[0].clamp_min(1)
    assert ((path[1:] - path[:-1]) <= tol).all()  # 100% of tokens and steps
    assert (path[-1] < path[0]).float().mean() > 0.9  # and it does explain the tokens
    # the layer's bookkeeping of dF is the same F
    torch.testing.assert_close(path[0] + d_energy.cumsum(0)[-1], path[-1],
                               rtol=1e-6 if dtype == torch.float64 else 1e-3, atol=1e-3)
    per_token = spikes.sum((0, 2)).to(dtype)
    bound = x_c.pow(2).sum(-1) / (2 * nu * delta)
    assert (per_token <= bound).all()
    torch.testing.assert_close(r, delta * spikes.sum(0).to(dtype))
    if init == "aligned" and t >= 8:
        # held back: some token-step saw a suprathreshold pair of identical atoms fire alone
        both = spikes[..., :48] & spikes[..., 48:]
        assert not both.all()


def test_a_settled_token_stops_spiking(trunk_states):
    layer = _layer(trunk_states.shape[1], 64, 64, "data", trunk_states)
    with torch.no_grad():
        x_c = layer.centred(trunk_states[:200].double())
        r, spikes, _ = layer.infer(x_c)
        v = (x_c - r @ layer.atoms().t()) @ layer.atoms() - layer.mu * r  # -dF/dr at r_T
    active = spikes.any(-1)  # (T, M)
    first_quiet = (~active).float().argmax(0)
    for m in range(len(x_c)):  # once a token has no spike, it never spikes again
        k = int(first_quiet[m])
        if not active[k, m]:
            assert not active[k:, m].any()
    assert (~active[-1]).float().mean() > 0.9  # most tokens settled within 64 steps
    settled = ~active[-1]
    assert (v[settled] <= layer.thresholds() + 1e-9).all()  # no neuron above threshold


def test_bptt_cannot_saturate_the_layer(trunk_states):
    """Trained by BPTT to fire as much as it can (loss = -sum r), with a large learning rate:
    the spikes per token stay under the bound and no neuron fires on more than half of its
    steps, because a spike is only accepted when it lowers the energy."""
    layer = _layer(trunk_states.shape[1], 64, 8, "data", trunk_states, torch.float32)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    z = trunk_states[:256]
    for _ in range(30):
        x_c = layer.centred(z)
        r, spikes, _ = layer.infer(x_c)
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    with torch.no_grad():
        x_c = layer.centred(z)
        r, spikes, _ = layer.infer(x_c)
        path = _energy_path(layer, x_c, spikes)
    assert (spikes.sum((0, 2)).float() <= x_c.pow(2).sum(-1) / (2 * layer.nu * layer.delta)).all()
    assert spikes.float().mean((0, 1)).max() <= 0.5
    assert ((path[1:] - path[:-1]) <= 1e-4 * path[0]).all()


def test_bptt_gradient_is_the_derivative_of_the_dynamics_with_smooth_spikes(monkeypatch):
    """With the step function replaced by a smooth one, the reference's gradient w.r.t. the
    drive V_1 and the lateral weights G equals central finite differences of the same T-step
    dynamics in which the inhibition sent by earlier spikes is held at its value (the one
    stop-gradient of the backward, see sc_inference_reference)."""
    smooth = lambda u, s=None, a=None: torch.sigmoid(3 * u)  # noqa: E731
    monkeypatch.setattr(reference, "spike", smooth)
    torch.manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=0)
    x = torch.randn(4, 6, dtype=torch.float64)
    theta, delta, t = 0.3, 0.4, 4
    v1 = (x @ atoms).requires_grad_(True)
    lateral = (atoms.t() @ atoms + 0.1 * torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(5, dtype=torch.float64)
    r, _, _ = reference.sc_inference_reference(v1, lateral, theta, delta, t)
    g_v1, g_lat = torch.autograd.grad((r * w).sum(), (v1, lateral))

    # the base point's spike values and selection masks, held fixed in the lateral term
    frozen, keep, v = [], [], v1.detach()
    for _ in range(t):
        u = v - theta
        acc, _ = reference.sc_select_reference(u, lateral.detach(), delta)
        keep.append((acc | (u <= 0)).double())
        frozen.append(smooth(u) * keep[-1])
        v = v - delta * frozen[-1] @ lateral.detach()

    def f(v1, lateral):
        v, r = v1, 0.0
        for k in range(t):
            r = r + delta * smooth(v - theta) * keep[k]
            v = v - delta * frozen[k] @ lateral
        return float((r * w).sum())

    for arg, grad in ((v1, g_v1), (lateral, g_lat)):
        base = (v1.detach().clone(), lateral.detach().clone())
        i = 0 if arg is v1 else 1
        fd = torch.zeros_like(grad)
        for idx in range(grad.numel()):
            plus, minus = [b.clone() for b in base], [b.clone() for b in base]
            plus[i].view(-1)[idx] += 1e-6
            minus[i].view(-1)[idx] -= 1e-6
            fd.view(-1)[idx] = (f(*plus) - f(*minus)) / 2e-6
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert g_lat.abs().sum() > 0  # the lateral weights do learn through the potentials


def test_surrogate_gradient_reaches_every_parameter_through_the_steps(trunk_states):
    layer = _layer(trunk_states.shape[1], 32, 5, "data", trunk_states, torch.float32)
    torch.nn.init.normal_(layer.readout.weight, std=0.1)
    z = trunk_states[:64].reshape(2, 32, -1)
    out = layer(z)
    out.delta.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out.stats["rate_per_step"].shape == (5,)
    assert out.stats["energy_per_step"].shape == (6,)
    assert out.local_statistic is None  # only when asked for


def test_local_rule_is_minus_the_gradient_of_the_energy_at_the_settled_state(trunk_states):
    layer = _layer(trunk_states.shape[1], 160, 6, "data", trunk_states).train()
    z = trunk_states[:30].double()
    mask = torch.ones(30, dtype=torch.bool)
    mask[20:] = False  # padding: left out of the statistic
    stat = layer(z[None], mask[None], local_statistic=True).local_statistic
    x_c = layer.centred(z).detach()[:20]
    r, _, _ = layer.infer(x_c)
    atoms = layer.atoms().detach().clone().requires_grad_(True)
    energy = layer.energy(x_c, r.detach(), atoms).sum()
    (g_atoms,) = torch.autograd.grad(energy, atoms)
    torch.testing.assert_close(stat["error_code"], -g_atoms, rtol=1e-10, atol=1e-10)
    assert float(stat["tokens"]) == 20
    silent = r.sum(0) == 0  # a neuron that never spiked: its atom gets no update
    assert silent.any() and (stat["error_code"][:, silent] == 0).all()


def test_local_step_updates_only_active_atoms_and_keeps_them_unit_norm(trunk_states):
    from hybridlm.plasticity import LocalLearning, NeuromodulatoryGate

    layer = _layer(trunk_states.shape[1], 48, 6, "data", trunk_states).train()
    learner = LocalLearning(layer, 0.05, NeuromodulatoryGate("constant", g_max=1.0))
    before = layer.atoms().detach().clone()
    z = trunk_states[:120].double()[None]
    with torch.no_grad():
        out = layer(z, local_statistic=True)
    learner.collect(out.local_statistic)
    active = out.stats["neuron_spikes"] > 0
    f_before = layer.energy(layer.centred(z[0]), layer.infer(layer.centred(z[0]))[0]).mean()
    out = learner.step(torch.tensor(3.0))
    after = layer.atoms().detach()
    assert torch.equal(after[:, ~active], before[:, ~active])
    assert not torch.allclose(after[:, active], before[:, active])
    torch.testing.assert_close(layer.dictionary.norm(dim=0)[active],
                               torch.ones(int(active.sum()), dtype=torch.float64))
    assert out["plasticity/atoms_updated"] == int(active.sum())
    with torch.no_grad():  # a small step down the energy lowers it (at the old code)
        f_after = layer.energy(layer.centred(z[0]), layer.infer(layer.centred(z[0]))[0]).mean()
    assert f_after < f_before


def test_ista_control_descends_the_same_energy(trunk_states):
    torch.manual_seed(0)
    layer = ISTALayer(trunk_states.shape[1], 64, time_steps=12).double()
    layer.init_from_data(trunk_states[:256].double(), torch.Generator().manual_seed(1))
    with torch.no_grad():
        x_c = layer.centred(trunk_states.double())
        r, active, d_energy = layer.infer(x_c)
    f = layer.energy(x_c, torch.zeros_like(r))[None] + d_energy.cumsum(0)
    assert (d_energy <= 1e-9 * f[0]).all()
    torch.testing.assert_close(f[-1], layer.energy(x_c, r))
    assert (r >= 0).all() and 0 < float((r > 0).float().mean()) < 1


def test_more_steps_explain_more(trunk_states):
    layer = _layer(trunk_states.shape[1], 64, 1, "data", trunk_states)
    with torch.no_grad():
        x_c = layer.centred(trunk_states.double())
        f = [layer.energy(x_c, layer.infer(x_c, t)[0]).mean() for t in (1, 2, 4, 8)]
    assert f[0] > f[1] > f[2] > f[3]


@pytest.mark.parametrize("kw, message", [
    (dict(time_steps=0), "time_steps must be finite and >= 1"),
    (dict(spike_quantum=0.0), "spike_quantum must be finite and > 0"),
    (dict(spike_quantum=float("nan")), "spike_quantum must be finite"),
    (dict(l2_cost=-0.1), "l2_cost must be finite and >= 0"),
    (dict(rate_cost=0.0), "rate_cost must be finite and > 0"),
])
def test_out_of_range_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SpikingPCLayer(8, 4, **kw)


def test_a_zero_atom_and_non_finite_features_are_named():
    layer = SpikingPCLayer(8, 4, backend="torch")
    with torch.no_grad():
        layer.dictionary[:, 2] = 0
    with pytest.raises(FloatingPointError, match="dictionary column 2 is zero"):
        layer(torch.randn(1, 3, 8))
    layer = SpikingPCLayer(8, 4, backend="torch")
    z = torch.randn(1, 3, 8)
    z[0, 1, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="trunk's features hold NaN"):
        layer(z)
