"""A pool of large CPU output buffers, reused once nothing refers to them any more.

Why: glibc hands allocations above its mmap threshold (32 MiB at most) back to the kernel when
they are freed, so every step's fresh outputs page-fault again on first touch: 20-60 ms for a
100 MB buffer on the 2-core VM this was measured on, more than the LIF kernels themselves
(docs/kernels.md). The pool keeps those buffers mapped, as torch's CUDA caching allocator does
for GPU memory.

A buffer goes back to the pool when its storage is freed: the tensor holds its memory through
a ``memoryview`` lease (``torch.frombuffer``), and the lease's finalizer runs only once every
tensor, view, gradient and storage object on it is gone (or ``share_memory_()`` moved the data
elsewhere). Reuse therefore never depends on counting references. Such a tensor cannot be
resized in place (``resize_`` to a larger size raises).

Bounded: at most ``HYBRIDLM_OUTPUT_POOL_MIB`` (default 1024) of free buffers are kept; buffers
in use are the caller's live tensors. ``HYBRIDLM_OUTPUT_POOL_MIB=0`` turns the pool off (plain
``torch.empty``). :func:`empty_cache` drops the free buffers.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref

import torch

MIN_BYTES = 4 << 20  # below this, glibc reuses freed memory by itself


def _limit_bytes() -> int:
    raw = os.environ.get("HYBRIDLM_OUTPUT_POOL_MIB", "1024")
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"HYBRIDLM_OUTPUT_POOL_MIB must be a number of MiB (0 turns the "
                         f"output pool off); got {raw!r}") from None
    if mib < 0:
        raise ValueError(f"HYBRIDLM_OUTPUT_POOL_MIB must be >= 0; got {raw!r}")
    return int(mib * 2**20)


class _Pool:
    def __init__(self) -> None:
        # Re-entrant: a finalizer can run (garbage collection) while this thread holds it.
        self._lock = threading.RLock()
        self._free: dict[int, list[mmap.mmap]] = {}  # nbytes -> unused buffers
        self.free_bytes = self.in_use_bytes = self.peak_in_use = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(shape)
        nbytes = shape.numel() * dtype.itemsize
        if nbytes < MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        limit = _limit_bytes()
        with self._lock:
            self._trim(limit)  # the limit may have been lowered since the last call
            if limit == 0:
                return torch.empty(shape, dtype=dtype)
            blocks = self._free.get(nbytes)
            if blocks:
                block = blocks.pop()
                self.free_bytes -= nbytes
            else:
                # Private: the default anonymous mapping is MAP_SHARED, which a forked child
                # (a DataLoader worker) would share with this process instead of copying.
                block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
            self.in_use_bytes += nbytes
            self.peak_in_use = max(self.peak_in_use, self.in_use_bytes)
        lease = memoryview(block)
        weakref.finalize(lease, self._release, block, nbytes).atexit = False
        flat = torch.frombuffer(lease, dtype=dtype)
        # set_ rather than view(): a view's _base would make the op's output a view, which
        # autograd then refuses to modify in place.
        return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape)

    def _release(self, block: mmap.mmap, nbytes: int) -> None:
        with self._lock:
            self.in_use_bytes -= nbytes
            if self.free_bytes + nbytes <= _limit_bytes():
                self._free.setdefault(nbytes, []).append(block)
                self.free_bytes += nbytes

    def _trim(self, limit: int) -> None:
        """Drop free buffers, largest sizes first, until at most `limit` bytes are free."""
        for nbytes in sorted(self._free, reverse=True):
            blocks = self._free[nbytes]
            while blocks and self.free_bytes > limit:
                blocks.pop()
                self.free_bytes -= nbytes

    def stats(self) -> dict:
        with self._lock:
            return {"in_use_bytes": self.in_use_bytes, "free_bytes": self.free_bytes,
                    "held_bytes": self.in_use_bytes + self.free_bytes,
                    "peak_in_use_bytes": self.peak_in_use}

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_in_use = self.in_use_bytes

    def empty_cache(self) -> None:
        with self._lock:
            self._trim(0)


_POOL = _Pool()


def empty_output(shape, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer shaped ``shape`` with ``like``'s dtype and device."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return _POOL.empty(shape, like.dtype)


def output_pool_stats() -> dict:
    """Bytes of pooled buffers in use by live tensors and free, and the most in use at once
    since :func:`reset_output_pool_peak`."""
    return _POOL.stats()


def reset_output_pool_peak() -> None:
    _POOL.reset_peak()


def empty_cache() -> None:
    """Release the pool's free buffers (buffers in use stay with their tensors)."""
    _POOL.empty_cache()
