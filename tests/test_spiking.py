import math

import pytest
import snntorch.surrogate as sur
import torch

from hybridlm.heads import MLPHead, mlp_hidden, mlp_parameters
from hybridlm.modeling import HybridConfig
from hybridlm.spiking import SpikingPCLayer, spike


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


def test_lif_step_by_hand_with_threshold_other_than_one():
    layer = SpikingPCLayer(4, 3, beta=0.5, threshold=0.7, trace_decay=0.25)
    v = torch.tensor([0.2, 0.6, 0.0])
    r = torch.tensor([0.0, 1.0, 0.5])
    current = torch.tensor([0.7, 0.5, 0.2])
    s, v2, r2 = layer.lif_step(current, v, r)
    h = 0.5 * v + current  # [0.8, 0.8, 0.2]
    assert s.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(v2, h - 0.7 * s)
    torch.testing.assert_close(r2, 0.25 * r + 0.75 * s)
    layer.reset = "zero"
    _, v3, _ = layer.lif_step(current, v, r)
    torch.testing.assert_close(v3, torch.tensor([0.0, 0.0, 0.2]))


def test_gradient_flows_through_all_inner_steps():
    torch.manual_seed(0)
    layer = SpikingPCLayer(8, 16, time_steps=5, threshold=0.3)
    torch.nn.init.normal_(layer.readout.weight, std=0.1)
    x = torch.randn(2, 3, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The decoder is only used from the second step on: a non-zero gradient on it means the
    # loss reached back through the recurrence (BPTT), not just the last step.
    assert layer.decode.weight.grad.abs().sum() > 0
    assert 0 < layer.stats["rate"] < 1
    assert layer.stats["rate_per_step"].shape == (5,)


def test_more_steps_change_the_output():
    torch.manual_seed(0)
    layer = SpikingPCLayer(8, 16, time_steps=1, threshold=0.3)
    torch.nn.init.normal_(layer.readout.weight, std=0.5)
    x = torch.randn(2, 3, 8)
    y1 = layer(x)
    layer.time_steps = 6
    assert not torch.allclose(y1, layer(x))


@pytest.mark.parametrize("d, n, t", [(384, 512, 8), (32, 16, 4), (768, 1000, 2), (64, 7, 1)])
def test_mlp_baselines_match_the_spiking_layer(d, n, t):
    config = HybridConfig(n_neurons=n, time_steps=t)
    spiking = sum(p.numel() for p in SpikingPCLayer(d, n, t).parameters())
    mlp = MLPHead(d, mlp_hidden("mlp", d, config))
    assert sum(p.numel() for p in mlp.parameters()) == mlp_parameters(d, mlp.up.out_features)
    # within half a hidden unit of (2D + 1) parameters
    assert abs(sum(p.numel() for p in mlp.parameters()) - spiking) <= d + 1
    # multiply-adds per token: the layer's T N D (current) + N D (readout), the MLP's 2 D H
    h = mlp_hidden("mlp_macs", d, config)
    assert abs(2 * d * h - (t * n * d + n * d)) <= d


def _manual_pc_forward(layer, z):
    """The layer's equations written out with the dense prediction W_d r_{k-1}."""
    x = layer.norm(z)
    v = x.new_zeros(*x.shape[:-1], layer.encode.out_features)
    r = torch.zeros_like(v)
    for _ in range(layer.time_steps):
        e = x - layer.decode(r)
        h = layer.beta * v + layer.encode(e)
        s = (h > layer.threshold).to(x.dtype)
        v = h - layer.threshold * s
        r = layer.trace_decay * r + (1 - layer.trace_decay) * s
    return layer.readout(r)


@pytest.mark.parametrize("backend", ["torch", "cpu_shim"])
def test_layer_follows_its_equations_on_every_backend(backend):
    torch.manual_seed(0)
    layer = SpikingPCLayer(8, 32, time_steps=6, threshold=0.4, trace_decay=0.3,
                           backend=backend).double()
    torch.nn.init.normal_(layer.readout.weight, std=0.3)
    torch.nn.init.normal_(layer.decode.weight, std=0.3)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _manual_pc_forward(layer, x), rtol=1e-9, atol=1e-9)
    assert 0.05 < layer.stats["rate"] < 0.95


def test_backends_agree_on_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    grads = {}
    for backend in ("torch", "cpu_shim"):
        torch.manual_seed(1)
        layer = SpikingPCLayer(16, 24, time_steps=4, threshold=0.5, backend=backend)
        torch.nn.init.normal_(layer.readout.weight, std=0.2)
        layer(x).pow(2).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["cpu_shim"][name], g, rtol=1e-4, atol=1e-5)
