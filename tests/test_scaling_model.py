"""The step-time model of docs/scaling.md (bench/scaling_model.py) computes its formulas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "scaling_model", Path(__file__).resolve().parents[1] / "bench" / "scaling_model.py")
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)

MEASURED = {"tokens_per_rank_per_step": 1000, "flops_per_token": 1e6,
            "gradient_bytes_per_step": 2e6, "other_allreduce_bytes_per_step": 1e6 + 4,
            "frozen_lm_head_bytes": 1e8}


def test_ddp_and_fsdp2_step_times_follow_the_ring_formulas():
    n, bw, alpha = 4, 1e9, 1e-5
    p = model.predict(MEASURED, n, bw, flops=1e12, alpha=alpha)
    assert p["compute"] == pytest.approx(1000 * 1e6 / 1e12)
    ring = 2 * (n - 1) / n  # an all-reduce moves 2 (n-1)/n of the bytes, over 2 (n-1) hops
    flag = ring * 4 / bw + 2 * (n - 1) * alpha
    stat = ring * 1e6 / bw + 2 * (n - 1) * alpha
    assert p["ddp"] == pytest.approx(ring * 2e6 / bw + 2 * (n - 1) * alpha + stat + flag)
    part = (n - 1) / n  # an all-gather or reduce-scatter: (n-1)/n of the bytes, n-1 hops
    for key, gathered in (("fsdp2_head", 2e6), ("fsdp2_all", 2e6 + 1e8)):
        expected = (2 * (part * gathered / bw + (n - 1) * alpha)  # forward and backward
                    + part * 2e6 / bw + (n - 1) * alpha + stat + flag)
        assert p[key] == pytest.approx(expected), key
    tree = model.predict(MEASURED, 512, bw, 1e12, alpha, tree=True)["ddp"]
    assert model.predict(MEASURED, 512, bw, 1e12, alpha)["ddp"] - tree == pytest.approx(
        3 * (2 * 511 - 2 * 9) * alpha)  # three all-reduces, 2 log2(512) = 18 hops each


def test_the_table_has_a_row_per_size_and_bandwidth():
    rows = model.table(MEASURED, 1e12, 1e-5).splitlines()
    assert len(rows) == 2 + len(model.GPUS) * len(model.BANDWIDTHS_GBPS)
    assert rows[2].startswith("| 8 | 25 |") and rows[-1].startswith("| 512 | 400 |")
