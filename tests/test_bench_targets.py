"""The kernel benchmark's targets table is read off the run's own rows, per allocator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _row(peer, ms, peak, variant=None):
    r = {"peer": peer, "T": 16, "N": bench.N_LARGE, "median_ms": ms, "peak_extra_mib": peak,
         "gbps": bench.BYTES_PER_NEURON_STEP * 16 * bench.N_LARGE / (ms / 1e3) / 1e9}
    if variant:
        r["variant"] = variant
    return r


def test_targets_compare_like_with_like_and_can_fail():
    reuse = "allocator reuse"
    result = {"copy": {"gbps": 50.0}, "lif": [
        _row("ours", 14.0, 192), _row("snntorch", 600.0, 492),
        _row("spikingjelly", 120.0, 492), _row("compiled", 80.0, 288),
        _row("ours", 14.0, 192, "no output pool"),  # not a peer of the default rows
        _row("ours", 15.0, 192, reuse), _row("snntorch", 160.0, 492, reuse),
        _row("spikingjelly", 55.0, 492, reuse), _row("compiled", 14.0, 288, reuse)]}
    rows = {(t["allocator"], t["target"]): t for t in bench.targets(result)}
    default = {k[1]: v for k, v in rows.items() if k[0] == "default"}
    assert default[">= 15x faster than snntorch"]["measured"] == "42.9x"
    assert all(t["met"] for t in default.values())
    same = {k[1]: v for k, v in rows.items() if k[0] != "default"}
    assert not same[">= 15x faster than snntorch"]["met"]  # 10.7x
    assert not same[">= 4x faster than spikingjelly"]["met"]  # 3.7x
    assert not same[">= 1x faster than compiled"]["met"]
    assert same[">= 60% of copy bandwidth"]["met"] == (
        bench.BYTES_PER_NEURON_STEP * 16 * bench.N_LARGE / 0.015 / 1e9 / 50.0 >= 0.6)
    assert same["peak memory <= the lowest peer"]["measured"] == "192 MiB vs compiled 288"
