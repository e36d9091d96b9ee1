// Event-driven spike propagation: out = S @ W for spikes S [M, K] and weights W [K, N].
// Only the rows of W whose spike is nonzero are accumulated (each scaled by its spike value,
// which is exact for binary spikes), in increasing k, so the result is deterministic (no
// atomics) and equals the dense product exactly for integer-valued weights.
// Backward: grad_W = S^T @ grad_out (event-driven, same kernel shape) and
// grad_S = grad_out @ W^T (dense; done by the caller with a GEMM).
//
// Precisions: W, out and grad_out are stored as F (float, double, hl::bf16, hl::f16) and
// summed in acc_t<F> (float for the half types), rounded once when stored. The spikes are
// stored as P: F itself or one byte (unsigned char, read as its value).

namespace hl {

// GPU: thread (m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x). The spike row is
// read by the whole block (broadcast); active W rows are read coalesced.
template <typename F, typename P>
__global__ void spike_matmul_fwd(const P* __restrict__ S, const F* __restrict__ W,
                                 F* __restrict__ out, int M, int K, int N) {
  typedef typename acc_of<F>::type A;
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  if (n >= N || m >= M) return;
  const P* __restrict__ srow = S + (long long)m * K;
  A acc = A(0);
  for (int k = 0; k < K; ++k) {
    const A sk = A(load(srow + k));
    if (sk != A(0)) acc += sk * A(load(W + (long long)k * N + n));
  }
  store(out + (long long)m * N + n, acc);
}

// grad_W[k, n] = sum over m with S[m, k] active of grad_out[m, n]; thread (k = blockIdx.y, n).
template <typename F, typename P>
__global__ void spike_matmul_grad_w(const P* __restrict__ S, const F* __restrict__ gout,
                                    F* __restrict__ gW, int M, int K, int N) {
  typedef typename acc_of<F>::type A;
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int k = blockIdx.y;
  if (n >= N || k >= K) return;
  A acc = A(0);
  for (int m = 0; m < M; ++m) {
    const A sm = A(load(S + (long long)m * K + k));
    if (sm != A(0)) acc += sm * A(load(gout + (long long)m * N + n));
  }
  store(gW + (long long)k * N + n, acc);
}

#ifdef HL_CPU_SHIM
// CPU schedule: one "thread" per output row (forward) or per W row (grad_W); columns in
// chunks of HL_PROP_COLS, summed in accumulators on the stack with a contiguous row update
// that vectorises. Same summation order as the GPU kernels. Launch with block = 1, grid = M
// (forward) or K (grad_W).
#define HL_PROP_COLS 512

// acc[0..nc) = sum over j < J with a[j * as] != 0 of a[j * as] * rows[j * N + n0 + 0..nc)
template <typename F, typename P>
__device__ __forceinline__ void prop_rows(const P* __restrict__ a, long long as, int J,
                                          const F* __restrict__ rows, int N, int n0, int nc,
                                          typename acc_of<F>::type* __restrict__ acc) {
  typedef typename acc_of<F>::type A;
  for (int n = 0; n < nc; ++n) acc[n] = A(0);
  for (int j = 0; j < J; ++j) {
    const A aj = A(load(a + j * as));
    if (aj == A(0)) continue;
    const F* __restrict__ row = rows + (long long)j * N + n0;
#pragma omp simd
    for (int n = 0; n < nc; ++n) acc[n] += aj * A(load(row + n));
  }
}

template <typename F, typename P>
__global__ void spike_matmul_fwd_rows(const P* __restrict__ S, const F* __restrict__ W,
                                      F* __restrict__ out, int M, int K, int N) {
  typename acc_of<F>::type acc[HL_PROP_COLS];
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  for (int n0 = 0; n0 < N; n0 += HL_PROP_COLS) {
    const int nc = N - n0 < HL_PROP_COLS ? N - n0 : HL_PROP_COLS;
    prop_rows<F, P>(S + (long long)m * K, 1, K, W, N, n0, nc, acc);
    F* __restrict__ orow = out + (long long)m * N + n0;
#pragma omp simd
    for (int n = 0; n < nc; ++n) store(orow + n, acc[n]);
  }
}

template <typename F, typename P>
__global__ void spike_matmul_grad_w_rows(const P* __restrict__ S, const F* __restrict__ gout,
                                         F* __restrict__ gW, int M, int K, int N) {
  typename acc_of<F>::type acc[HL_PROP_COLS];
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  for (int n0 = 0; n0 < N; n0 += HL_PROP_COLS) {
    const int nc = N - n0 < HL_PROP_COLS ? N - n0 : HL_PROP_COLS;
    prop_rows<F, P>(S + k, K, M, gout, N, n0, nc, acc);
    F* __restrict__ grow = gW + (long long)k * N + n0;
#pragma omp simd
    for (int n = 0; n < nc; ++n) store(grow + n, acc[n]);
  }
}
#endif  // HL_CPU_SHIM

}  // namespace hl
