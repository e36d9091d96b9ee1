// Fused leaky integrate-and-fire (LIF) kernels: multi-step forward/backward and the
// predictive-coding per-step update. One source for the GPU (NVRTC via cupy.RawModule) and
// the CPU (g++ through cuda_shim.h, which defines HL_CPU_SHIM).
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
// Template parameters: F (float|double), DYN (0 standard, 1 snntorch), RESET (0 subtract,
// 1 zero), SAVE_H (write h for backward), DETACH (reset carries no gradient), SURR (0 atan,
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

template <typename F, int DYN, int RESET, int SAVE_H>
__global__ void lif_fwd(const F* __restrict__ x, F* __restrict__ s, F* __restrict__ h,
                        int T, long long N, F beta, F theta) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  F v = F(0), sp = F(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i;
    const F ht = lif_fwd_step<F, DYN, RESET>(x[o], v, sp, beta, theta);
    s[o] = sp;
    if (SAVE_H) h[o] = ht;
  }
}

// snntorch dynamics use DETACH = 1 here (their reset is detached by construction).
template <typename F, int RESET, int DETACH, int SURR>
__global__ void lif_bwd(const F* __restrict__ gs, const F* __restrict__ h,
                        F* __restrict__ gx, int T, long long N, F beta, F theta, F sa, F sb) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  F gv = F(0);
  for (int t = T - 1; t >= 0; --t) {
    const long long o = (long long)t * N + i;
    gx[o] = lif_bwd_step<F, RESET, DETACH, SURR>(gs[o], h[o], gv, beta, theta, sa, sb);
  }
}

// Predictive-coding step, elementwise over n neurons:
//   h = beta * v + I ; s = H(h - theta) ; v' = reset(h, s) ; r' = gamma * r + (1 - gamma) * s
// omg is (1 - gamma) rounded once on the host.
template <typename F, int RESET>
__global__ void pc_fwd(const F* __restrict__ I, const F* __restrict__ v, const F* __restrict__ r,
                       F* __restrict__ s, F* __restrict__ v_out, F* __restrict__ r_out,
                       F* __restrict__ h_out, long long n, F beta, F theta, F gamma, F omg) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  F vi = v[i], sp = F(0);
  const F h = lif_fwd_step<F, 0, RESET>(I[i], vi, sp, beta, theta);
  s[i] = sp;
  v_out[i] = vi;
  r_out[i] = mul_rn(gamma, r[i]) + mul_rn(omg, sp);
  h_out[i] = h;
}

// Backward of pc_fwd: gs_total = gs + (1 - gamma) * gr' (+ gv' * dv'/ds unless detached);
// gh = gs_total * sg + gv' * dv'/dh ; gI = gh ; gv = beta * gh ; gr = gamma * gr'.
template <typename F, int RESET, int DETACH, int SURR>
__global__ void pc_bwd(const F* __restrict__ gs, const F* __restrict__ gv_out,
                       const F* __restrict__ gr_out, const F* __restrict__ h,
                       F* __restrict__ gI, F* __restrict__ gv, F* __restrict__ gr, long long n,
                       F beta, F theta, F gamma, F omg, F sa, F sb) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const F gro = gr_out[i];
  F g = gv_out[i];
  const F gh = lif_bwd_step<F, RESET, DETACH, SURR>(gs[i] + omg * gro, h[i], g, beta, theta,
                                                    sa, sb);
  gI[i] = gh;
  gv[i] = g;
  gr[i] = gamma * gro;
}

#ifdef HL_CPU_SHIM
// ---- CPU schedule (compiled only by the shim): the same step functions, time-major over a
// tile of HL_TILE consecutive neurons, so each step streams contiguous memory and the lane
// loop vectorises. Launch with block = 1 and grid = ceil(N / HL_TILE).
#ifndef HL_TILE
#define HL_TILE 1024
#endif

template <typename F, int DYN, int RESET, int SAVE_H>
__global__ void lif_fwd_tile(const F* __restrict__ x, F* __restrict__ s, F* __restrict__ h,
                             int T, long long N, F beta, F theta) {
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  F v[HL_TILE], sp[HL_TILE];
  for (int l = 0; l < n; ++l) v[l] = sp[l] = F(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i0;
    const F* __restrict__ xt = x + o;
    F* __restrict__ st = s + o;
    F* __restrict__ ht = h + o;
#pragma omp simd
    for (int l = 0; l < n; ++l) {
      const F hh = lif_fwd_step<F, DYN, RESET>(xt[l], v[l], sp[l], beta, theta);
      st[l] = sp[l];
      if (SAVE_H) ht[l] = hh;
    }
  }
}

template <typename F, int RESET, int DETACH, int SURR>
__global__ void lif_bwd_tile(const F* __restrict__ gs, const F* __restrict__ h,
                             F* __restrict__ gx, int T, long long N, F beta, F theta, F sa,
                             F sb) {
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  F gv[HL_TILE];
  for (int l = 0; l < n; ++l) gv[l] = F(0);
  for (int t = T - 1; t >= 0; --t) {
    const long long o = (long long)t * N + i0;
    const F* __restrict__ gst = gs + o;
    const F* __restrict__ ht = h + o;
    F* __restrict__ gxt = gx + o;
#pragma omp simd
    for (int l = 0; l < n; ++l) {
      gxt[l] = lif_bwd_step<F, RESET, DETACH, SURR>(gst[l], ht[l], gv[l], beta, theta, sa, sb);
    }
  }
}
// pc_fwd / pc_bwd over a tile of HL_TILE consecutive neurons (same step functions).
template <typename F, int RESET>
__global__ void pc_fwd_tile(const F* __restrict__ I, const F* __restrict__ v,
                            const F* __restrict__ r, F* __restrict__ s, F* __restrict__ v_out,
                            F* __restrict__ r_out, F* __restrict__ h_out, long long n, F beta,
                            F theta, F gamma, F omg) {
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= n) return;
  const int m = (n - i0 < HL_TILE) ? (int)(n - i0) : HL_TILE;
#pragma omp simd
  for (int l = 0; l < m; ++l) {
    const long long i = i0 + l;
    F vi = v[i], sp = F(0);
    const F h = lif_fwd_step<F, 0, RESET>(I[i], vi, sp, beta, theta);
    s[i] = sp;
    v_out[i] = vi;
    r_out[i] = mul_rn(gamma, r[i]) + mul_rn(omg, sp);
    h_out[i] = h;
  }
}

template <typename F, int RESET, int DETACH, int SURR>
__global__ void pc_bwd_tile(const F* __restrict__ gs, const F* __restrict__ gv_out,
                            const F* __restrict__ gr_out, const F* __restrict__ h,
                            F* __restrict__ gI, F* __restrict__ gv, F* __restrict__ gr,
                            long long n, F beta, F theta, F gamma, F omg, F sa, F sb) {
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= n) return;
  const int m = (n - i0 < HL_TILE) ? (int)(n - i0) : HL_TILE;
#pragma omp simd
  for (int l = 0; l < m; ++l) {
    const long long i = i0 + l;
    const F gro = gr_out[i];
    F g = gv_out[i];
    const F gh = lif_bwd_step<F, RESET, DETACH, SURR>(gs[i] + omg * gro, h[i], g, beta, theta,
                                                      sa, sb);
    gI[i] = gh;
    gv[i] = g;
    gr[i] = gamma * gro;
  }
}
#endif  // HL_CPU_SHIM

}  // namespace hl
