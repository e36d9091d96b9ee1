"""Continual-learning metrics against hand-computed matrices, and the energy arithmetic."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import energy
from hybridlm.continual import metrics as clm

# accuracy-like (higher is better); R[i][j]: domain j after stage i
R_ACC = [[0.8, 0.1, 0.2],
         [0.5, 0.9, 0.3],
         [0.4, 0.6, 0.7]]
B_ACC = [0.1, 0.2, 0.1]

# loss-like (lower is better)
R_LOSS = [[2.0, 5.0, 6.0],
          [3.0, 1.5, 5.5],
          [3.5, 2.5, 1.0]]
B_LOSS = [6.0, 6.0, 7.0]


def test_accuracy_matrix_by_hand():
    m = clm.all_metrics(R_ACC, B_ACC, "accuracy")
    assert m["ACC"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert m["BWT"] == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)  # -0.35: forgetting
    assert m["FWT"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)  # 0.05
    assert m["forgetting_per_domain"] == pytest.approx([0.8 - 0.4, 0.9 - 0.6])
    assert m["forgetting"] == pytest.approx(0.35)


def test_loss_matrix_by_hand_signs_flip():
    m = clm.all_metrics(R_LOSS, B_LOSS, "loss")
    assert m["ACC"] == pytest.approx((3.5 + 2.5 + 1.0) / 3)
    assert m["BWT"] == pytest.approx(((3.5 - 2.0) + (2.5 - 1.5)) / 2)  # +1.25: forgetting
    assert m["FWT"] == pytest.approx(((5.0 - 6.0) + (5.5 - 7.0)) / 2)  # -1.25: helps
    # Chaudhry for a loss: final - min over earlier stages (positive = forgetting)
    assert m["forgetting_per_domain"] == pytest.approx([3.5 - 2.0, 2.5 - 1.5])
    assert m["forgetting"] == pytest.approx(1.25)


def test_chaudhry_differs_from_first_minus_last():
    # domain 0 peaks after stage 1, not right after its own stage 0
    R = [[0.5, 0.0], [0.9, 0.8]]
    R3 = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.4, 0.8, 0.6]]
    assert clm.forgetting(R3) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert -clm.bwt(R3) == pytest.approx(((0.5 - 0.4) + (0.8 - 0.8)) / 2)  # Avalanche's
    assert clm.forgetting(R) == pytest.approx(0.5 - 0.9)  # only l < T-1 = stage 0 counts


def test_single_stage_is_not_defined_never_nan():
    m = clm.all_metrics([[0.7]], [0.1], "accuracy")
    assert m["ACC"] == pytest.approx(0.7)
    assert m["BWT"] is None and m["FWT"] is None and m["forgetting"] is None
    assert clm.fmt(m["BWT"]) == "not defined" and clm.fmt(float("nan")) == "not defined"
    assert clm.mean_std([None, None])["mean"] is None
    assert clm.compare([None], [None]) == {"defined": False, "reason": "not defined"}


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="T x T"):
        clm.acc([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="b must have"):
        clm.fwt([[1.0, 2.0], [3.0, 4.0]], [1.0])
    with pytest.raises(ValueError, match="no rows"):
        clm.bwt([])
    with pytest.raises(ValueError, match="unknown score"):
        clm.all_metrics([[1.0]], [1.0], "bleu")


def test_mean_std_and_compare_by_hand():
    ms = clm.mean_std([1.0, 2.0, 3.0])
    assert ms == {"mean": 2.0, "std": pytest.approx(1.0), "n": 3}
    assert clm.mean_std([5.0])["std"] == 0.0
    c = clm.compare([0.7, 0.8, 0.9], [1.0, 1.1, 1.2])
    assert c["relative_reduction"] == pytest.approx(1 - 0.8 / 1.1)
    assert c["paired_difference"]["mean"] == pytest.approx(-0.3)
    assert c["exceeds_seed_spread"] is True  # |0.3| > 0.1 + 0.1
    c = clm.compare([0.7, 1.0, 1.3], [1.0, 1.1, 1.2])
    assert c["exceeds_seed_spread"] is False  # |0.1| < 0.3 + 0.1


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5).flatmap(
    lambda t: st.lists(st.lists(st.floats(0, 1), min_size=t, max_size=t), min_size=t,
                       max_size=t)))
def test_chaudhry_forgetting_bounds_first_minus_last(R):
    """max over earlier stages >= the stage's own score, so F >= -BWT (accuracy)."""
    assert clm.forgetting(R) >= -clm.bwt(R) - 1e-12
    neg = [[-v for v in row] for row in R]  # a loss is a negated accuracy
    assert clm.forgetting(neg, higher_is_better=False) == pytest.approx(clm.forgetting(R))
    assert clm.bwt(neg) == pytest.approx(-clm.bwt(R))


def test_energy_by_hand():
    ops = energy.head_ops("spiking_pc", d_model=4, n_neurons=3, time_steps=2, mlp_hidden=0,
                          rate=0.5)
    assert ops["mac"] == 3 * 4 + 3 * 4  # bottom-up drive D^T x_c once + readout
    assert ops["sop"] == 0.5 * 2 * 3 * 3  # spikes through the lateral D^T D, each step
    e = energy.energy_pj(ops, "fp32")
    assert e["energy_pj"] == pytest.approx(4.6 * 24 + 0.9 * 9)
    assert e["dense_energy_pj"] == pytest.approx(4.6 * (24 + 18))  # lateral done densely
    ista = energy.head_ops("ista", 4, 3, 2, 0)
    assert ista["mac"] == 24 + 18 and ista["sop"] == 0
    mlp = energy.head_ops("mlp", 4, 3, 2, mlp_hidden=5)
    assert mlp["mac"] == 2 * 4 * 5 and mlp["sop"] == 0
    assert energy.energy_pj(mlp, "int8")["energy_pj"] == pytest.approx(0.23 * 40)
    with pytest.raises(ValueError, match="firing rate"):
        energy.head_ops("spiking_pc", 4, 3, 2, 0)
    with pytest.raises(ValueError, match="preset"):
        energy.energy_pj(mlp, "fp8")
    assert not math.isnan(energy.lm_head_macs(384, 30522))
