// Fused leaky integrate-and-fire (LIF) kernels: multi-step forward/backward. One source for
// the GPU (NVRTC via cupy.RawModule) and the CPU (g++ through cuda_shim.h, which defines
// HL_CPU_SHIM).
//
// Layout: time-first, x[t * N + i] for t < T, i < N (N = product of the non-time dims).
// Math, with u_t = h_t - theta and H(u) = 1 if u > 0 else 0 (snntorch's convention):
//   "standard" dynamics:  h_t = beta * v_{t-1} + x_t ; s_t = H(u_t)
//       reset subtract:   v_t = h_t - theta * s_t      reset zero: v_t = h_t * (1 - s_t)
//   "snntorch" dynamics (snntorch.Leaky, reset from the previous step's spike, detached):
//       subtract: h_t = beta * h_{t-1} + x_t - s_{t-1} * theta
//       zero:     h_t = beta * ((1 - s_{t-1}) * h_{t-1}) + x_t ;  s_t = H(u_t)
// Backward (both dynamics; snntorch's is the standard one with a detached reset), walking t
// down from T-1 with gv = dL/dv_t (0 at t = T-1):
//   sg = surrogate'(u_t) ; dv/dh = 1 (subtract) or 1 - s_t (zero) ; dv/ds = -theta or -h_t
//   gh = (gs_t + [not detached] gv * dv/ds) * sg + gv * dv/dh ; gx_t = gh ; gv <- beta * gh
// Surrogates (snntorch.surrogate), passed as two constants (sa, sb):
//   atan:         sa / (1 + (sb * u)^2)    with sa = alpha / 2, sb = pi / 2 * alpha
//   fast_sigmoid: 1 / (sb * |u| + 1)^2     with sb = slope (sa unused)
//
// beta * v is written __fmul_rn so that no compiler fuses it with the following add into an
// FMA: spikes then equal a float32 torch loop (and snntorch) bit for bit on CPU and GPU,
// whatever NVRTC's --fmad setting.
//
// Saved state: none. The forward writes only s; the backward takes x again (the caller holds
// it) and recomputes h_t with the same step function, bit for bit, before walking time down:
//   GPU (one thread per neuron): time in segments of HL_SEG steps. When T > HL_SEG, a first
//     pass runs the forward and leaves the state entering each later segment in gx, at that
//     segment's first row (overwritten later by that row's own gradient); then, last segment
//     first, the segment's h is recomputed into registers (HL_SEG of them, unrolled) and the
//     segment is walked backward. T <= HL_SEG: x is read once, no first pass.
//   CPU (under the shim): the same, with a 64-byte vector of neurons (16 floats, 8 doubles)
//     in place of a thread and the 16 steps of a segment unrolled (h in vector registers).
//
// Template parameters: F (float|double), DYN (0 standard, 1 snntorch), RESET (0 subtract,
// 1 zero), DETACH (reset carries no gradient; forced on for DYN = 1), SURR (0 atan,
// 1 fast_sigmoid).

namespace hl {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename F, int SURR>
__device__ __forceinline__ F surrogate_grad(F u, F sa, F sb) {
  if (SURR == 0) {
    const F k = sb * u;
    return sa / (F(1) + k * k);
  } else {
    const F d = sb * (u < F(0) ? -u : u) + F(1);
    return F(1) / (d * d);
  }
}

// One forward step of one neuron. v is the state carried to the next step (standard: v_t;
// snntorch: h_t), sp the spike of the previous step on entry and of this step on return.
template <typename F, int DYN, int RESET>
__device__ __forceinline__ F lif_fwd_step(F x, F& v, F& sp, F beta, F theta) {
  F h;
  if (DYN == 0) {
    h = mul_rn(beta, v) + x;
    sp = (h - theta > F(0)) ? F(1) : F(0);
    v = (RESET == 0) ? h - theta * sp : h * (F(1) - sp);
  } else {
    if (RESET == 0) {
      h = (mul_rn(beta, v) + x) - sp * theta;
    } else {
      h = mul_rn(beta, (F(1) - sp) * v) + x;
    }
    sp = (h - theta > F(0)) ? F(1) : F(0);
    v = h;
  }
  return h;
}

// One backward step (time t, walking down). gv: dL/dv_t on entry, dL/dv_{t-1} on return.
template <typename F, int RESET, int DETACH, int SURR>
__device__ __forceinline__ F lif_bwd_step(F gs, F h, F& gv, F beta, F theta, F sa, F sb) {
  const F u = h - theta;
  const F sp = (u > F(0)) ? F(1) : F(0);
  const F sg = surrogate_grad<F, SURR>(u, sa, sb);
  const F dvdh = (RESET == 0) ? F(1) : F(1) - sp;
  const F dvds = (RESET == 0) ? -theta : -h;
  const F gst = DETACH ? gs : gs + gv * dvds;
  const F gh = gst * sg + gv * dvdh;
  gv = mul_rn(beta, gh);
  return gh;
}

// ---- GPU kernels: one thread per neuron, looping over time, state in registers. ----

#ifndef HL_SEG
#define HL_SEG 16
#endif

template <typename F, int DYN, int RESET>
__global__ void lif_fwd(const F* __restrict__ x, F* __restrict__ s, int T, long long N, F beta,
                        F theta) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  F v = F(0), sp = F(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i;
    lif_fwd_step<F, DYN, RESET>(x[o], v, sp, beta, theta);
    s[o] = sp;
  }
}

// The state a segment starts from, as stored by the first pass: v (standard: v_{t0-1};
// snntorch: h_{t0-1}); the snntorch dynamics also need the previous spike, H(v - theta) with
// the forward's own expression (exact: v is that step's h).
template <typename F, int DYN>
__device__ __forceinline__ F lif_prev_spike(F v, F theta) {
  return (DYN == 1 && v - theta > F(0)) ? F(1) : F(0);
}

// snntorch dynamics take DETACH = 1 (their reset is detached by construction; forced here).
template <typename F, int DYN, int RESET, int DETACH, int SURR>
__global__ void lif_bwd(const F* __restrict__ x, const F* __restrict__ gs, F* __restrict__ gx,
                        int T, long long N, F beta, F theta, F sa, F sb) {
  constexpr int DET = DYN == 1 ? 1 : DETACH;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int last = (T - 1) / HL_SEG * HL_SEG;  // first step of the last segment
  if (last > 0) {  // first pass: checkpoints into gx
    F v = F(0), sp = F(0);
    for (int t = 0; t < last; ++t) {
      if (t > 0 && t % HL_SEG == 0) gx[(long long)t * N + i] = v;
      lif_fwd_step<F, DYN, RESET>(x[(long long)t * N + i], v, sp, beta, theta);
    }
    gx[(long long)last * N + i] = v;
  }
  F gv = F(0);
  for (int t0 = last; t0 >= 0; t0 -= HL_SEG) {
    F v = t0 > 0 ? gx[(long long)t0 * N + i] : F(0);
    F sp = t0 > 0 ? lif_prev_spike<F, DYN>(v, theta) : F(0);
    F hr[HL_SEG];
#pragma unroll
    for (int j = 0; j < HL_SEG; ++j) {
      if (t0 + j < T)
        hr[j] = lif_fwd_step<F, DYN, RESET>(x[(long long)(t0 + j) * N + i], v, sp, beta, theta);
    }
#pragma unroll
    for (int j = HL_SEG - 1; j >= 0; --j) {
      if (t0 + j < T) {
        const long long o = (long long)(t0 + j) * N + i;
        gx[o] = lif_bwd_step<F, RESET, DET, SURR>(gs[o], hr[j], gv, beta, theta, sa, sb);
      }
    }
  }
}

#ifdef HL_CPU_SHIM
// ---- CPU schedule (compiled only by the shim): the same step functions; each task takes a
// tile of HL_TILE consecutive neurons and walks it in vector-wide chunks (below). Launch with
// block = 1 and grid = ceil(N / HL_TILE).
#ifndef HL_TILE
#define HL_TILE 1024
#endif

// Lanes per CPU chunk: one 64-byte vector (16 floats, 8 doubles).
template <typename F>
struct hl_chunk {
  static constexpr int VL = 64 / (int)sizeof(F);
};

// The CPU mirrors the GPU schedule with a vector of VL neurons in place of a thread: a chunk
// walks all T rows (one cache line of each), its state in registers. Time goes in segments of
// 16 steps; a full segment is unrolled with no condition inside, so the loads of its 16 rows
// issue together and the segment's h stays in 16 vector registers (the last, partial segment
// of T % 16 steps takes plain loops). HL_SEG must be 16 for the unroll pragmas below.
static_assert(HL_SEG == 16, "the CPU chunk kernels unroll 16 steps");

// LEN steps of the forward from row t0 (LEN = HL_SEG: unrolled; 0: len steps, a loop); with
// H, h_j is kept in hr[j]; with S, spikes are written to s.
template <typename F, int DYN, int RESET, int LEN, bool H, bool S>
__device__ __forceinline__ void lif_fwd_segment(const F* __restrict__ x, F* __restrict__ s,
                                                F (*__restrict__ hr)[hl_chunk<F>::VL],
                                                int t0, int len, long long N, long long c,
                                                F* __restrict__ v, F* __restrict__ sp, F beta,
                                                F theta) {
  constexpr int VL = hl_chunk<F>::VL;
  const int n = LEN ? LEN : len;
#pragma GCC unroll 16
  for (int j = 0; j < n; ++j) {
    const long long o = (long long)(t0 + j) * N + c;
#pragma omp simd
    for (int l = 0; l < VL; ++l) {
      const F h = lif_fwd_step<F, DYN, RESET>(x[o + l], v[l], sp[l], beta, theta);
      if (H) hr[j][l] = h;
      if (S) s[o + l] = sp[l];
    }
  }
}

template <typename F, int RESET, int DET, int SURR, int LEN>
__device__ __forceinline__ void lif_bwd_segment(const F* __restrict__ gs, F* __restrict__ gx,
                                                F (*__restrict__ hr)[hl_chunk<F>::VL],
                                                int t0, int len, long long N, long long c,
                                                F* __restrict__ gv, F beta, F theta, F sa,
                                                F sb) {
  constexpr int VL = hl_chunk<F>::VL;
  const int n = LEN ? LEN : len;
#pragma GCC unroll 16
  for (int j = n - 1; j >= 0; --j) {
    const long long o = (long long)(t0 + j) * N + c;
#pragma omp simd
    for (int l = 0; l < VL; ++l)
      gx[o + l] = lif_bwd_step<F, RESET, DET, SURR>(gs[o + l], hr[j][l], gv[l], beta, theta, sa,
                                                    sb);
  }
}

template <typename F, int DYN, int RESET>
__device__ __forceinline__ void lif_fwd_chunk(const F* __restrict__ x, F* __restrict__ s, int T,
                                              long long N, long long c, F beta, F theta) {
  constexpr int VL = hl_chunk<F>::VL;
  F v[VL], sp[VL];
#pragma omp simd
  for (int l = 0; l < VL; ++l) v[l] = sp[l] = F(0);
  int t0 = 0;
  for (; t0 + HL_SEG <= T; t0 += HL_SEG)
    lif_fwd_segment<F, DYN, RESET, HL_SEG, false, true>(x, s, nullptr, t0, 0, N, c, v, sp, beta,
                                                        theta);
  if (t0 < T)
    lif_fwd_segment<F, DYN, RESET, 0, false, true>(x, s, nullptr, t0, T - t0, N, c, v, sp, beta,
                                                   theta);
}

// Backward of one chunk, as the GPU lif_bwd: checkpoints of the state at segment starts in
// gx (only when T > 16), then per segment, last first: recompute h into registers, walk back.
template <typename F, int DYN, int RESET, int DET, int SURR>
__device__ __forceinline__ void lif_bwd_chunk(const F* __restrict__ x, const F* __restrict__ gs,
                                              F* __restrict__ gx, int T, long long N,
                                              long long c, F beta, F theta, F sa, F sb) {
  constexpr int VL = hl_chunk<F>::VL;
  const int last = (T - 1) / HL_SEG * HL_SEG;
  F v[VL], sp[VL], gv[VL];
  if (last > 0) {
#pragma omp simd
    for (int l = 0; l < VL; ++l) v[l] = sp[l] = F(0);
    for (int t0 = 0; t0 < last; t0 += HL_SEG) {
      if (t0 > 0) {
#pragma omp simd
        for (int l = 0; l < VL; ++l) gx[(long long)t0 * N + c + l] = v[l];
      }
      lif_fwd_segment<F, DYN, RESET, HL_SEG, false, false>(x, nullptr, nullptr, t0, 0, N, c, v,
                                                           sp, beta, theta);
    }
#pragma omp simd
    for (int l = 0; l < VL; ++l) gx[(long long)last * N + c + l] = v[l];
  }
#pragma omp simd
  for (int l = 0; l < VL; ++l) gv[l] = F(0);
  for (int t0 = last; t0 >= 0; t0 -= HL_SEG) {
#pragma omp simd
    for (int l = 0; l < VL; ++l) {
      v[l] = t0 > 0 ? gx[(long long)t0 * N + c + l] : F(0);
      sp[l] = t0 > 0 ? lif_prev_spike<F, DYN>(v[l], theta) : F(0);
    }
    // Separate arrays: the partial segment indexes its own by a runtime j, which would
    // otherwise keep the full segment's h on the stack too.
    if (t0 + HL_SEG <= T) {
      F hr[HL_SEG][VL];
      lif_fwd_segment<F, DYN, RESET, HL_SEG, true, false>(x, nullptr, hr, t0, 0, N, c, v, sp,
                                                          beta, theta);
      lif_bwd_segment<F, RESET, DET, SURR, HL_SEG>(gs, gx, hr, t0, 0, N, c, gv, beta, theta, sa,
                                                   sb);
    } else {
      F hp[HL_SEG][VL];
      lif_fwd_segment<F, DYN, RESET, 0, true, false>(x, nullptr, hp, t0, T - t0, N, c, v, sp,
                                                     beta, theta);
      lif_bwd_segment<F, RESET, DET, SURR, 0>(gs, gx, hp, t0, T - t0, N, c, gv, beta, theta, sa,
                                              sb);
    }
  }
}

// Tile kernels: HL_TILE neurons per block (launch with block = 1, grid = ceil(N / HL_TILE)),
// full chunks of VL lanes as above; the last n % VL lanes of the last tile take a plain
// per-step loop over those lanes (same step functions, same results).
template <typename F, int DYN, int RESET>
__global__ void lif_fwd_tile(const F* __restrict__ x, F* __restrict__ s, int T, long long N,
                             F beta, F theta) {
  constexpr int VL = hl_chunk<F>::VL;
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  const int nfull = n / VL * VL;
  for (int c = 0; c < nfull; c += VL) lif_fwd_chunk<F, DYN, RESET>(x, s, T, N, i0 + c, beta, theta);
  const int m = n - nfull;
  if (m == 0) return;
  F v[VL], sp[VL];
  for (int l = 0; l < m; ++l) v[l] = sp[l] = F(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i0 + nfull;
    for (int l = 0; l < m; ++l) {
      lif_fwd_step<F, DYN, RESET>(x[o + l], v[l], sp[l], beta, theta);
      s[o + l] = sp[l];
    }
  }
}

template <typename F, int DYN, int RESET, int DETACH, int SURR>
__global__ void lif_bwd_tile(const F* __restrict__ x, const F* __restrict__ gs,
                             F* __restrict__ gx, int T, long long N, F beta, F theta, F sa,
                             F sb) {
  constexpr int DET = DYN == 1 ? 1 : DETACH;
  constexpr int VL = hl_chunk<F>::VL;
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  const int nfull = n / VL * VL;
  for (int c = 0; c < nfull; c += VL)
    lif_bwd_chunk<F, DYN, RESET, DET, SURR>(x, gs, gx, T, N, i0 + c, beta, theta, sa, sb);
  const int m = n - nfull;
  if (m == 0) return;
  // The remaining m < VL lanes: h parked in gx's own rows, then walked back (overwritten).
  F v[VL], sp[VL], gv[VL];
  for (int l = 0; l < m; ++l) v[l] = sp[l] = gv[l] = F(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i0 + nfull;
    for (int l = 0; l < m; ++l) gx[o + l] = lif_fwd_step<F, DYN, RESET>(x[o + l], v[l], sp[l],
                                                                        beta, theta);
  }
  for (int t = T - 1; t >= 0; --t) {
    const long long o = (long long)t * N + i0 + nfull;
    for (int l = 0; l < m; ++l)
      gx[o + l] = lif_bwd_step<F, RESET, DET, SURR>(gs[o + l], gx[o + l], gv[l], beta, theta, sa,
                                                    sb);
  }
}
#endif  // HL_CPU_SHIM

}  // namespace hl
