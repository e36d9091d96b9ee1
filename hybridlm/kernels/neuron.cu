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
//     pass runs the forward and leaves the state entering each later segment in ck (in A,
//     (T - 1) / HL_SEG rows of N: a sixteenth of x's size in float); then, last segment
//     first, the segment's h is recomputed into registers (HL_SEG of them, unrolled) and the
//     segment is walked backward. T <= HL_SEG: x is read once, no first pass.
//   CPU (under the shim): the same, with a chunk of neurons (four 64-byte vectors: 64 floats,
//     32 doubles) in place of a thread and the 16 steps of a segment unrolled.
//
// Precisions: x, gs and gx are stored as S (float, double, hl::bf16, hl::f16); the state and
// all arithmetic are in A = acc_t<S> (float for the half types), so a half kernel computes
// exactly what the float kernel computes from the same (rounded) inputs, rounding only what
// it stores. Spikes are stored as O: S, or one byte (unsigned char, 0/1).
//
// Template parameters: S (storage), O (spike storage, forward only), DYN (0 standard,
// 1 snntorch), RESET (0 subtract, 1 zero), DETACH (reset carries no gradient; forced on for
// DYN = 1), SURR (0 atan, 1 fast_sigmoid).

namespace hl {

// ---- Storage types. A tensor is stored as S (float, double, bf16 or f16) and computed in
// acc_t<S>: double for double, float otherwise (half precisions accumulate in float32). The
// half types are raw bits with their own conversions (round to nearest even, as torch's
// .to()): NVRTC has no cuda_bf16.h / cuda_fp16.h without a CUDA include path, and the CPU
// build needs the same code anyway (GCC 12 does not vectorise _Float16 conversions; these
// integer ones it does).
struct bf16 {
  unsigned short bits;
};
struct f16 {
  unsigned short bits;
};

template <typename S>
struct acc_of {
  typedef S type;
};
template <>
struct acc_of<bf16> {
  typedef float type;
};
template <>
struct acc_of<f16> {
  typedef float type;
};

__device__ __forceinline__ float u32_as_float(unsigned u) {
#ifdef HL_CPU_SHIM
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

__device__ __forceinline__ unsigned float_as_u32(float f) {
#ifdef HL_CPU_SHIM
  unsigned u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}

// load(p): *p in its accumulation type; store(p, v): v rounded to *p's type. Spikes stored as
// one byte load as 0/1 (any value, exactly) and store as v != 0.
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const unsigned char* p) { return (float)*p; }
__device__ __forceinline__ float load(const bf16* p) {
  return u32_as_float((unsigned)p->bits << 16);
}
// IEEE half to float, exact: rebias the exponent; subnormals by a float subtraction (exact);
// Inf and NaN keep their payload.
__device__ __forceinline__ float load(const f16* p) {
  const unsigned h = p->bits;
  const unsigned em = (h & 0x7fffu) << 13;  // exponent and mantissa at float's positions
  const unsigned e = em & 0x0f800000u;
  float f;
  if (e == 0x0f800000u) {
    f = u32_as_float(em + 0x70000000u);  // Inf / NaN: exponent 31 -> 255
  } else if (e == 0) {
    f = u32_as_float(em + 0x38800000u) - u32_as_float(0x38800000u);  // zero, subnormal
  } else {
    f = u32_as_float(em + 0x38000000u);  // normal: exponent + (127 - 15)
  }
  return u32_as_float(float_as_u32(f) | ((h & 0x8000u) << 16));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
template <typename A>
__device__ __forceinline__ void store(unsigned char* p, A v) {
  *p = v != A(0);
}
__device__ __forceinline__ void store(bf16* p, float v) {
  const unsigned u = float_as_u32(v);
  p->bits = (unsigned short)((u & 0x7fffffffu) > 0x7f800000u
                                 ? (u >> 16) | 0x40u                        // quiet NaN
                                 : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
}
// float to IEEE half, nearest even; overflow to Inf, NaN to a quiet NaN; results below half's
// normal range rounded by a float addition of 0.5 (exact alignment of the mantissa).
__device__ __forceinline__ void store(f16* p, float v) {
  unsigned f = float_as_u32(v);
  const unsigned sign = f & 0x80000000u;
  f ^= sign;
  unsigned o;
  if (f >= 0x47800000u) {  // |v| >= 65536 (rounds to Inf), Inf or NaN
    o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 0x38800000u) {  // |v| < 2^-14: subnormal or zero
    o = float_as_u32(u32_as_float(f) + 0.5f) - 0x3f000000u;
  } else {
    const unsigned odd = (f >> 13) & 1u;
    f += 0xc8000fffu;  // exponent - (127 - 15), plus just under half a half-ulp
    f += odd;
    o = f >> 13;
  }
  p->bits = (unsigned short)(o | (sign >> 16));
}

}  // namespace hl

#ifdef HL_CPU_SHIM
namespace hl_shim {
template <> struct scalar_name<hl::bf16> { static const char* get() { return "bfloat16"; } };
template <> struct scalar_name<hl::f16> { static const char* get() { return "float16"; } };
}  // namespace hl_shim
#endif

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

template <typename S, typename O, int DYN, int RESET>
__global__ void lif_fwd(const S* __restrict__ x, O* __restrict__ s, int T, long long N,
                        typename acc_of<S>::type beta, typename acc_of<S>::type theta) {
  typedef typename acc_of<S>::type A;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  A v = A(0), sp = A(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i;
    lif_fwd_step<A, DYN, RESET>(load(x + o), v, sp, beta, theta);
    store(s + o, sp);
  }
}

// The state a segment starts from, as stored by the first pass: v (standard: v_{t0-1};
// snntorch: h_{t0-1}); the snntorch dynamics also need the previous spike, H(v - theta) with
// the forward's own expression (exact: v is that step's h).
template <typename F, int DYN>
__device__ __forceinline__ F lif_prev_spike(F v, F theta) {
  return (DYN == 1 && v - theta > F(0)) ? F(1) : F(0);
}

// The backward of neuron i (the GPU thread's work; on the CPU, the lanes left over by the
// vector chunks). The state entering segment k > 0 (time k * HL_SEG) is kept in ck row k - 1.
template <typename S, int DYN, int RESET, int DET, int SURR>
__device__ __forceinline__ void lif_bwd_neuron(const S* __restrict__ x, const S* __restrict__ gs,
                                               S* __restrict__ gx,
                                               typename acc_of<S>::type* __restrict__ ck, int T,
                                               long long N, long long i,
                                               typename acc_of<S>::type beta,
                                               typename acc_of<S>::type theta,
                                               typename acc_of<S>::type sa,
                                               typename acc_of<S>::type sb) {
  typedef typename acc_of<S>::type A;
  const int last = (T - 1) / HL_SEG * HL_SEG;  // first step of the last segment
  if (last > 0) {  // first pass: the checkpoints
    A v = A(0), sp = A(0);
    for (int t = 0; t < last; ++t) {
      if (t > 0 && t % HL_SEG == 0) ck[(long long)(t / HL_SEG - 1) * N + i] = v;
      lif_fwd_step<A, DYN, RESET>(load(x + (long long)t * N + i), v, sp, beta, theta);
    }
    ck[(long long)(last / HL_SEG - 1) * N + i] = v;
  }
  A gv = A(0);
  for (int t0 = last; t0 >= 0; t0 -= HL_SEG) {
    A v = t0 > 0 ? ck[(long long)(t0 / HL_SEG - 1) * N + i] : A(0);
    A sp = t0 > 0 ? lif_prev_spike<A, DYN>(v, theta) : A(0);
    A hr[HL_SEG];
#pragma unroll
    for (int j = 0; j < HL_SEG; ++j) {
      if (t0 + j < T)
        hr[j] = lif_fwd_step<A, DYN, RESET>(load(x + (long long)(t0 + j) * N + i), v, sp, beta,
                                            theta);
    }
#pragma unroll
    for (int j = HL_SEG - 1; j >= 0; --j) {
      if (t0 + j < T) {
        const long long o = (long long)(t0 + j) * N + i;
        store(gx + o, lif_bwd_step<A, RESET, DET, SURR>(load(gs + o), hr[j], gv, beta, theta, sa,
                                                        sb));
      }
    }
  }
}

// snntorch dynamics take DETACH = 1 (their reset is detached by construction; forced here).
template <typename S, int DYN, int RESET, int DETACH, int SURR>
__global__ void lif_bwd(const S* __restrict__ x, const S* __restrict__ gs, S* __restrict__ gx,
                        typename acc_of<S>::type* __restrict__ ck, int T, long long N,
                        typename acc_of<S>::type beta, typename acc_of<S>::type theta,
                        typename acc_of<S>::type sa, typename acc_of<S>::type sb) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  lif_bwd_neuron<S, DYN, RESET, (DYN == 1 ? 1 : DETACH), SURR>(x, gs, gx, ck, T, N, i, beta,
                                                               theta, sa, sb);
}

#ifdef HL_CPU_SHIM
// ---- CPU schedule (compiled only by the shim): the same step functions; each task takes a
// tile of HL_TILE consecutive neurons and walks it in vector-wide chunks (below). Launch with
// block = 1 and grid = ceil(N / HL_TILE).
#ifndef HL_TILE
#define HL_TILE 1024
#endif

// One 64-byte vector of the accumulation type (16 floats, 8 doubles): the unit of the
// conversions below and of the spike-coding kernels' sums.
template <typename F>
struct hl_chunk {
  static constexpr int VL = 64 / (int)sizeof(F);
};

// Lanes per LIF chunk: HL_LIF_VECS vectors. A neuron's step depends on its previous step
// (about 15 cycles of latency: mul, add, compare, masked subtract), so one vector per chunk
// left the core waiting; four independent vectors interleave their chains. With one, the
// half-precision kernels were compute-bound (bf16 at half of copy bandwidth, float32 near it).
#ifndef HL_LIF_VECS
#define HL_LIF_VECS 4
#endif
template <typename A>
struct hl_lif {
  static constexpr int VL = HL_LIF_VECS * hl_chunk<A>::VL;
};

// The CPU mirrors the GPU schedule with a chunk of VL neurons in place of a thread: a chunk
// walks all T rows (whole cache lines of each), its state in registers. Time goes in segments
// of 16 steps; a full segment is unrolled with no condition inside, so the loads of its 16
// rows issue together and the segment's h stays in registers or L1 (the last, partial segment
// of T % 16 steps takes plain loops). HL_SEG must be 16 for the unroll pragmas below.
static_assert(HL_SEG == 16, "the CPU chunk kernels unroll 16 steps");

// One vector of lanes (16 floats, 8 doubles) between storage and the accumulation type: a
// chunk converts whole rows, so the step loops see plain float arrays (converting lane by lane inside the
// unrolled loops made GCC take minutes to compile the half kernels). fp16 uses the F16C
// instructions where the CPU has them (exact, nearest even, as load/store).
template <typename A>
inline void load_lanes(const A* __restrict__ p, A* __restrict__ out) {
  __builtin_memcpy(out, p, sizeof(A) * hl_chunk<A>::VL);
}
template <typename A>
inline void store_lanes(A* __restrict__ p, const A* __restrict__ v) {
  __builtin_memcpy(p, v, sizeof(A) * hl_chunk<A>::VL);
}
template <typename A>
inline void store_lanes(unsigned char* __restrict__ p, const A* __restrict__ v) {
#pragma omp simd
  for (int l = 0; l < hl_chunk<A>::VL; ++l) p[l] = v[l] != A(0);
}
// One-byte spikes from float lanes: a compare into a mask, the mask into bytes (the plain
// loop above compiled to four compares and byte shuffles per row: slower than a bf16 store).
inline void store_lanes(unsigned char* __restrict__ p, const float* __restrict__ v) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
  _mm_storeu_si128((__m128i*)p, _mm_maskz_mov_epi8(m, _mm_set1_epi8(1)));
#else
#pragma omp simd
  for (int l = 0; l < 16; ++l) p[l] = v[l] != 0.0f;
#endif
}
// bf16 with AVX-512 integer ops: the same bit operations as load / store (the plain loops
// compiled to scalar code: bf16 ran at half float32's speed).
inline void load_lanes(const bf16* __restrict__ p, float* __restrict__ out) {
#if defined(__AVX512F__)
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  _mm512_storeu_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
#else
  for (int l = 0; l < 16; ++l) out[l] = load(p + l);
#endif
}
inline void store_lanes(bf16* __restrict__ p, const float* __restrict__ v) {
#if defined(__AVX512BF16__)
  // AVX512-BF16's conversion rounds as store() does (nearest even, NaN made quiet) except
  // that it flushes subnormals to zero: rows with a subnormal take the integer path below.
  const __m512 y = _mm512_loadu_ps(v);
  if (!_mm512_fpclass_ps_mask(y, 0x20)) {
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(y));
    return;
  }
#endif
#if defined(__AVX512F__)
  const __m512 x = _mm512_loadu_ps(v);
  const __m512i u = _mm512_castps_si512(x);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i rne =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __m512i qnan = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rne, qnan)));
#else
  for (int l = 0; l < 16; ++l) store(p + l, v[l]);
#endif
}
inline void load_lanes(const f16* __restrict__ p, float* __restrict__ out) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(out, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)));
#elif defined(__F16C__)
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)));
  _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8))));
#else
  for (int l = 0; l < 16; ++l) out[l] = load(p + l);
#endif
}
inline void store_lanes(f16* __restrict__ p, const float* __restrict__ v) {
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__)
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(_mm512_loadu_ps(v), R));
#elif defined(__F16C__)
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(_mm256_loadu_ps(v), R));
  _mm_storeu_si128((__m128i*)(p + 8), _mm256_cvtps_ph(_mm256_loadu_ps(v + 8), R));
#else
  for (int l = 0; l < 16; ++l) store(p + l, v[l]);
#endif
}

// A chunk row of VL lanes (a multiple of one vector), one vector at a time.
template <int VL, typename S, typename A>
inline void load_chunk(const S* __restrict__ p, A* __restrict__ out) {
  for (int k = 0; k < VL; k += hl_chunk<A>::VL) load_lanes(p + k, out + k);
}
template <int VL, typename S, typename A>
inline void store_chunk(S* __restrict__ p, const A* __restrict__ v) {
  for (int k = 0; k < VL; k += hl_chunk<A>::VL) store_lanes(p + k, v + k);
}

// LEN steps of the forward from row t0 (LEN = HL_SEG: unrolled; 0: len steps, a loop); with
// H, h_j is kept in hr[j]; with W, spikes are written to s.
template <typename S, typename O, int DYN, int RESET, int LEN, bool H, bool W>
__device__ __forceinline__ void lif_fwd_segment(
    const S* __restrict__ x, O* __restrict__ s,
    typename acc_of<S>::type (*__restrict__ hr)[hl_lif<typename acc_of<S>::type>::VL], int t0,
    int len, long long N, long long c, typename acc_of<S>::type* __restrict__ v,
    typename acc_of<S>::type* __restrict__ sp, typename acc_of<S>::type beta,
    typename acc_of<S>::type theta) {
  typedef typename acc_of<S>::type A;
  constexpr int VL = hl_lif<A>::VL;
  const int n = LEN ? LEN : len;
#pragma GCC unroll 16
  for (int j = 0; j < n; ++j) {
    const long long o = (long long)(t0 + j) * N + c;
    A xr[VL];
    load_chunk<VL>(x + o, xr);
#pragma omp simd
    for (int l = 0; l < VL; ++l) {
      const A h = lif_fwd_step<A, DYN, RESET>(xr[l], v[l], sp[l], beta, theta);
      if (H) hr[j][l] = h;
    }
    if (W) store_chunk<VL>(s + o, sp);
  }
}

template <typename S, int RESET, int DET, int SURR, int LEN>
__device__ __forceinline__ void lif_bwd_segment(
    const S* __restrict__ gs, S* __restrict__ gx,
    typename acc_of<S>::type (*__restrict__ hr)[hl_lif<typename acc_of<S>::type>::VL], int t0,
    int len, long long N, long long c, typename acc_of<S>::type* __restrict__ gv,
    typename acc_of<S>::type beta, typename acc_of<S>::type theta, typename acc_of<S>::type sa,
    typename acc_of<S>::type sb) {
  typedef typename acc_of<S>::type A;
  constexpr int VL = hl_lif<A>::VL;
  const int n = LEN ? LEN : len;
#pragma GCC unroll 16
  for (int j = n - 1; j >= 0; --j) {
    const long long o = (long long)(t0 + j) * N + c;
    A g[VL];
    load_chunk<VL>(gs + o, g);
#pragma omp simd
    for (int l = 0; l < VL; ++l)
      g[l] = lif_bwd_step<A, RESET, DET, SURR>(g[l], hr[j][l], gv[l], beta, theta, sa, sb);
    store_chunk<VL>(gx + o, g);
  }
}

template <typename S, typename O, int DYN, int RESET>
__device__ __forceinline__ void lif_fwd_chunk(const S* __restrict__ x, O* __restrict__ s, int T,
                                              long long N, long long c,
                                              typename acc_of<S>::type beta,
                                              typename acc_of<S>::type theta) {
  typedef typename acc_of<S>::type A;
  constexpr int VL = hl_lif<A>::VL;
  A v[VL], sp[VL];
#pragma omp simd
  for (int l = 0; l < VL; ++l) v[l] = sp[l] = A(0);
  int t0 = 0;
  for (; t0 + HL_SEG <= T; t0 += HL_SEG)
    lif_fwd_segment<S, O, DYN, RESET, HL_SEG, false, true>(x, s, nullptr, t0, 0, N, c, v, sp,
                                                           beta, theta);
  if (t0 < T)
    lif_fwd_segment<S, O, DYN, RESET, 0, false, true>(x, s, nullptr, t0, T - t0, N, c, v, sp,
                                                      beta, theta);
}

// Backward of one chunk, as lif_bwd_neuron: checkpoints of the state at segment starts in ck
// (only when T > 16), then per segment, last first: recompute h into registers, walk back.
template <typename S, int DYN, int RESET, int DET, int SURR>
__device__ __forceinline__ void lif_bwd_chunk(const S* __restrict__ x, const S* __restrict__ gs,
                                              S* __restrict__ gx,
                                              typename acc_of<S>::type* __restrict__ ck, int T,
                                              long long N, long long c,
                                              typename acc_of<S>::type beta,
                                              typename acc_of<S>::type theta,
                                              typename acc_of<S>::type sa,
                                              typename acc_of<S>::type sb) {
  typedef typename acc_of<S>::type A;
  constexpr int VL = hl_lif<A>::VL;
  const int last = (T - 1) / HL_SEG * HL_SEG;
  A v[VL], sp[VL], gv[VL];
  if (last > 0) {
#pragma omp simd
    for (int l = 0; l < VL; ++l) v[l] = sp[l] = A(0);
    for (int t0 = 0; t0 < last; t0 += HL_SEG) {
      if (t0 > 0) {
#pragma omp simd
        for (int l = 0; l < VL; ++l) ck[(long long)(t0 / HL_SEG - 1) * N + c + l] = v[l];
      }
      lif_fwd_segment<S, S, DYN, RESET, HL_SEG, false, false>(x, nullptr, nullptr, t0, 0, N, c,
                                                              v, sp, beta, theta);
    }
#pragma omp simd
    for (int l = 0; l < VL; ++l) ck[(long long)(last / HL_SEG - 1) * N + c + l] = v[l];
  }
#pragma omp simd
  for (int l = 0; l < VL; ++l) gv[l] = A(0);
  for (int t0 = last; t0 >= 0; t0 -= HL_SEG) {
#pragma omp simd
    for (int l = 0; l < VL; ++l) {
      v[l] = t0 > 0 ? ck[(long long)(t0 / HL_SEG - 1) * N + c + l] : A(0);
      sp[l] = t0 > 0 ? lif_prev_spike<A, DYN>(v[l], theta) : A(0);
    }
    // Separate arrays: the partial segment indexes its own by a runtime j, which would
    // otherwise keep the full segment's h on the stack too.
    if (t0 + HL_SEG <= T) {
      A hr[HL_SEG][VL];
      lif_fwd_segment<S, S, DYN, RESET, HL_SEG, true, false>(x, nullptr, hr, t0, 0, N, c, v, sp,
                                                             beta, theta);
      lif_bwd_segment<S, RESET, DET, SURR, HL_SEG>(gs, gx, hr, t0, 0, N, c, gv, beta, theta, sa,
                                                   sb);
    } else {
      A hp[HL_SEG][VL];
      lif_fwd_segment<S, S, DYN, RESET, 0, true, false>(x, nullptr, hp, t0, T - t0, N, c, v, sp,
                                                        beta, theta);
      lif_bwd_segment<S, RESET, DET, SURR, 0>(gs, gx, hp, t0, T - t0, N, c, gv, beta, theta, sa,
                                              sb);
    }
  }
}

// Tile kernels: HL_TILE neurons per block (launch with block = 1, grid = ceil(N / HL_TILE)),
// full chunks of VL lanes as above; the last n % VL lanes of the last tile take the per-neuron
// code (same step functions, same results).
template <typename S, typename O, int DYN, int RESET>
__global__ void lif_fwd_tile(const S* __restrict__ x, O* __restrict__ s, int T, long long N,
                             typename acc_of<S>::type beta, typename acc_of<S>::type theta) {
  typedef typename acc_of<S>::type A;
  constexpr int VL = hl_lif<A>::VL;
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  const int nfull = n / VL * VL;
  for (int c = 0; c < nfull; c += VL)
    lif_fwd_chunk<S, O, DYN, RESET>(x, s, T, N, i0 + c, beta, theta);
  const int m = n - nfull;
  if (m == 0) return;
  A v[VL], sp[VL];
  for (int l = 0; l < m; ++l) v[l] = sp[l] = A(0);
  for (int t = 0; t < T; ++t) {
    const long long o = (long long)t * N + i0 + nfull;
    for (int l = 0; l < m; ++l) {
      lif_fwd_step<A, DYN, RESET>(load(x + o + l), v[l], sp[l], beta, theta);
      store(s + o + l, sp[l]);
    }
  }
}

template <typename S, int DYN, int RESET, int DETACH, int SURR>
__global__ void lif_bwd_tile(const S* __restrict__ x, const S* __restrict__ gs,
                             S* __restrict__ gx, typename acc_of<S>::type* __restrict__ ck, int T,
                             long long N, typename acc_of<S>::type beta,
                             typename acc_of<S>::type theta, typename acc_of<S>::type sa,
                             typename acc_of<S>::type sb) {
  typedef typename acc_of<S>::type A;
  constexpr int DET = DYN == 1 ? 1 : DETACH;
  constexpr int VL = hl_lif<A>::VL;
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * HL_TILE;
  if (i0 >= N) return;
  const int n = (N - i0 < HL_TILE) ? (int)(N - i0) : HL_TILE;
  const int nfull = n / VL * VL;
  for (int c = 0; c < nfull; c += VL)
    lif_bwd_chunk<S, DYN, RESET, DET, SURR>(x, gs, gx, ck, T, N, i0 + c, beta, theta, sa, sb);
  for (int l = nfull; l < n; ++l)
    lif_bwd_neuron<S, DYN, RESET, DET, SURR>(x, gs, gx, ck, T, N, i0 + l, beta, theta, sa, sb);
}
#endif  // HL_CPU_SHIM

}  // namespace hl
