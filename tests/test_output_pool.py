"""The output pool reuses a large CPU output buffer only when nothing refers to it any more,
and never changes a tensor the caller still holds."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import pytest
import torch

from hybridlm.kernels import _build, pool
from hybridlm.kernels.ops import lif_multistep
from hybridlm.kernels.reference import lif_multistep_reference

pytestmark = pytest.mark.skipif(_build.find_cxx() is None, reason="no C++ compiler")

T, N = 4, 1 << 18  # 4 MiB of float32: the smallest size the pool takes


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.delenv("HYBRIDLM_OUTPUT_POOL_MIB", raising=False)
    monkeypatch.setattr(pool, "_POOL", pool._Pool())


def _x(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, generator=g) + 0.5).requires_grad_()


def test_a_dropped_output_is_reused_and_the_result_is_still_exact():
    first = lif_multistep(_x(0), 0.9, 0.7).detach()
    ptr = first.data_ptr()
    del first
    x = _x(1)
    s = lif_multistep(x, 0.9, 0.7)
    assert s.data_ptr() == ptr
    assert torch.equal(s, lif_multistep_reference(x, 0.9, 0.7))
    assert pool.output_pool_stats()["held_bytes"] == 4 * T * N


@pytest.mark.parametrize("keep", ["tensor", "view", "storage"])
def test_a_buffer_still_referenced_is_not_handed_out(keep):
    s = lif_multistep(_x(0), 0.9, 0.7).detach()
    held = {"tensor": s, "view": s[2, 5:], "storage": s.untyped_storage()}[keep]
    snapshot = s.clone()
    del s
    s2 = lif_multistep(_x(1), 0.9, 0.7)
    again = torch.empty(0).set_(held) if keep == "storage" else held
    assert s2.data_ptr() != again.data_ptr()
    expected = snapshot[2, 5:] if keep == "view" else snapshot
    assert torch.equal(again.reshape(-1), expected.reshape(-1))
    assert pool.output_pool_stats()["in_use_bytes"] == 2 * 4 * T * N


def test_a_kept_gradient_survives_the_next_step():
    x = _x(0)
    g = torch.randn(T, N)
    lif_multistep(x, 0.9, 0.7).backward(g)
    kept = x.grad
    expected = kept.clone()
    x.grad = None
    lif_multistep(x, 0.9, 0.7).backward(torch.randn(T, N))
    assert x.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, expected)


def test_a_buffer_moved_to_shared_memory_returns_to_the_pool_and_cannot_grow():
    with pytest.raises(RuntimeError, match="not resizable"):
        lif_multistep(_x(0), 0.9, 0.7).detach().resize_(T + 1, N)
    s = lif_multistep(_x(0), 0.9, 0.7).detach()
    old_ptr = s.data_ptr()
    s.share_memory_()  # the data moves to shared memory; the pooled buffer is free again
    snapshot = s.clone()
    assert pool.output_pool_stats()["in_use_bytes"] == 0
    s2 = lif_multistep(_x(1), 0.9, 0.7)
    assert s2.data_ptr() == old_ptr
    assert torch.equal(s, snapshot)


def test_free_bytes_stay_under_the_limit(monkeypatch):
    monkeypatch.setenv("HYBRIDLM_OUTPUT_POOL_MIB", "5")
    held = [lif_multistep(_x(i), 0.9, 0.7).detach() for i in range(3)]
    assert pool.output_pool_stats()["in_use_bytes"] == 3 * 4 * T * N
    del held
    stats = pool.output_pool_stats()
    assert (stats["in_use_bytes"], stats["free_bytes"]) == (0, 4 * T * N)  # one kept, two freed


def test_zero_turns_the_pool_off_and_bad_values_are_named(monkeypatch):
    lif_multistep(_x(0), 0.9, 0.7)  # leaves one free buffer
    assert pool.output_pool_stats()["free_bytes"] == 4 * T * N
    monkeypatch.setenv("HYBRIDLM_OUTPUT_POOL_MIB", "0")
    lif_multistep(_x(0), 0.9, 0.7)
    assert pool.output_pool_stats()["held_bytes"] == 0
    monkeypatch.setenv("HYBRIDLM_OUTPUT_POOL_MIB", "lots")
    with pytest.raises(ValueError, match="HYBRIDLM_OUTPUT_POOL_MIB"):
        lif_multistep(_x(0), 0.9, 0.7)


def test_small_outputs_bypass_the_pool():
    lif_multistep(torch.randn(4, 1000), 0.9, 0.7)
    assert pool.output_pool_stats()["held_bytes"] == 0


def test_empty_cache_keeps_buffers_in_use_and_the_peak_counts_them():
    kept = lif_multistep(_x(0), 0.9, 0.7).detach()
    lif_multistep(_x(1), 0.9, 0.7)
    stats = pool.output_pool_stats()
    assert stats["peak_in_use_bytes"] == 2 * 4 * T * N
    pool.empty_cache()
    stats = pool.output_pool_stats()
    assert (stats["in_use_bytes"], stats["free_bytes"]) == (4 * T * N, 0)
    pool.reset_output_pool_peak()
    assert pool.output_pool_stats()["peak_in_use_bytes"] == 4 * T * N
    del kept


def test_threads_never_share_a_buffer():
    errors = []

    def work(seed):
        for i in range(6):
            x = _x(seed * 10 + i)
            s = lif_multistep(x, 0.9, 0.7)
            if not torch.equal(s, lif_multistep_reference(x, 0.9, 0.7)):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork")
def test_a_forked_child_writes_to_its_own_copy():
    s = lif_multistep(_x(0), 0.9, 0.7).detach()
    snapshot = s.clone()
    pid = os.fork()
    if pid == 0:  # the child scribbles on the inherited output (plain libc: no thread pool
        ctypes.memset(s.data_ptr(), 0x7F, s.numel() * 4)  # after fork) and exits at once
        os._exit(0)
    os.waitpid(pid, 0)
    assert torch.equal(s, snapshot)
