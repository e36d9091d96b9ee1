// Event-driven spike propagation: out = S @ W for spikes S [M, K] and weights W [K, N].
// Only the rows of W whose spike is nonzero are accumulated (each scaled by its spike value,
// which is exact for binary spikes), in increasing k, so the result is deterministic (no
// atomics) and equals the dense product exactly for integer-valued weights.
// Backward: grad_W = S^T @ grad_out (event-driven, same kernel shape) and
// grad_S = grad_out @ W^T (dense; done by the caller with a GEMM).

namespace hl {

// GPU: thread (m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x). The spike row is
// read by the whole block (broadcast); active W rows are read coalesced.
template <typename F>
__global__ void spike_matmul_fwd(const F* __restrict__ S, const F* __restrict__ W,
                                 F* __restrict__ out, int M, int K, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  if (n >= N || m >= M) return;
  const F* __restrict__ srow = S + (long long)m * K;
  F acc = F(0);
  for (int k = 0; k < K; ++k) {
    const F sk = srow[k];
    if (sk != F(0)) acc += sk * W[(long long)k * N + n];
  }
  out[(long long)m * N + n] = acc;
}

// grad_W[k, n] = sum over m with S[m, k] active of grad_out[m, n]; thread (k = blockIdx.y, n).
template <typename F>
__global__ void spike_matmul_grad_w(const F* __restrict__ S, const F* __restrict__ gout,
                                    F* __restrict__ gW, int M, int K, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int k = blockIdx.y;
  if (n >= N || k >= K) return;
  F acc = F(0);
  for (int m = 0; m < M; ++m) {
    const F sm = S[(long long)m * K + k];
    if (sm != F(0)) acc += sm * gout[(long long)m * N + n];
  }
  gW[(long long)k * N + n] = acc;
}

#ifdef HL_CPU_SHIM
// CPU schedule: one "thread" per output row (forward) or per W row (grad_W); the inner loop
// over n is a contiguous row update that vectorises. Same summation order as the GPU kernels.
// Launch with block = 1, grid = M (forward) or K (grad_W).
template <typename F>
__global__ void spike_matmul_fwd_rows(const F* __restrict__ S, const F* __restrict__ W,
                                      F* __restrict__ out, int M, int K, int N) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  F* __restrict__ orow = out + (long long)m * N;
  const F* __restrict__ srow = S + (long long)m * K;
  for (int n = 0; n < N; ++n) orow[n] = F(0);
  for (int k = 0; k < K; ++k) {
    const F sk = srow[k];
    if (sk == F(0)) continue;
    const F* __restrict__ wrow = W + (long long)k * N;
#pragma omp simd
    for (int n = 0; n < N; ++n) orow[n] += sk * wrow[n];
  }
}

template <typename F>
__global__ void spike_matmul_grad_w_rows(const F* __restrict__ S, const F* __restrict__ gout,
                                         F* __restrict__ gW, int M, int K, int N) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  F* __restrict__ grow = gW + (long long)k * N;
  for (int n = 0; n < N; ++n) grow[n] = F(0);
  for (int m = 0; m < M; ++m) {
    const F sm = S[(long long)m * K + k];
    if (sm == F(0)) continue;
    const F* __restrict__ g = gout + (long long)m * N;
#pragma omp simd
    for (int n = 0; n < N; ++n) grow[n] += sm * g[n];
  }
}
#endif  // HL_CPU_SHIM

}  // namespace hl
