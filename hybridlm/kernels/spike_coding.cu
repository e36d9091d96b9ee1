// Spike-coding inference (the spiking predictive-coding layer, hybridlm/spiking.py): the T
// inner steps of every token in one launch, one thread per token. The math is
// reference.sc_inference_reference / sc_select_reference; per token and step t:
//
//   u = V - theta                               margins (candidates: u_i > 0)
//   level j = 0..6: P_j = {i : u_i > 0, u_i >= (1 - 2^-j) max u}
//       dF(P) = -delta sum_{i in P} u_i + delta^2 / 2 sum_{i in P} ((G 1_P)_i - G_ii)
//       the first P_j with dF < 0 is accepted
//   level 7: P = {argmax u} (lowest index on ties), dF = -delta max u < 0: always accepted
//   spikes_t = 1_P ; r += delta 1_P ; V <- V - delta G 1_P   (G = lateral, N x N)
//
// Event-driven: a level costs O(|P|) to filter and, for dF, the pair sum over members only:
// gathered G[i, P] (O(|P|^2)) for small sets, G's member rows summed over the membership mask
// (O(|P| N), streaming) when HL_SC_DENSE |P| > N. The update costs O(|P| N) (the G rows of
// the accepted neurons). The dense parts are the O(N) passes per step over the token's
// margins (max, candidates, outputs). The sets are nested (P_j is P_{j-1} filtered by a
// higher bar), so each level filters the previous level's member list in place, and a level
// that removes nobody is skipped: it is the rejected set again.
//
// Outputs: r (M, N) = r_T; spk (T, M, N) uint8 (during a step, the membership mask); dF
// (T, M), 0 where no neuron is above threshold; when save != 0, dsdu (T, M, N) =
// surrogate'(u_t) * keep_t with keep_t = accepted or u_t <= 0 (rejected candidates get no
// gradient): all the backward needs besides the spikes and G (ops._SCInference, dense torch).
//
// Rounding: each sum has one order on every backend (gathers: four partial sums by member
// rank; dense pair sums: 16 lane sums by index mod 16 and a fixed tree; the update: members
// in increasing index), dF = (-delta) su + (delta^2/2) sq and V_i - delta * (sum of G[l, i]),
// with the products as mul_rn so that no compiler fuses them into an FMA: the GPU kernel, its
// CPU twin and NVRTC with any --fmad give the same spikes, dF and r bit for bit. The
// plain-torch reference sums in BLAS's order, so float results agree with it to rounding
// (spikes equal unless a dF or a margin lands within rounding of 0).
//
// Scratch from the caller: V (M x N, F; M x 2N for the CPU twin) the membrane, P (M x N,
// int32) the member list. The GPU kernel stores both transposed (element i of token m at
// i * M + m) so that the threads of a warp, which walk i in step, touch consecutive words.
//
// Precisions: v1, G, r, dF and dsdu are stored as S (float, double, hl::bf16, hl::f16); the
// membrane V, r's running sum R and all arithmetic are in A = acc_t<S> (float for the half
// types), so a half kernel runs the float kernel on the rounded inputs and rounds what it
// stores. R is a scratch (M x N, A) for the half types; for float and double the caller
// passes r itself.
//
// Uses acc_of, load, store, mul_rn, surrogate_grad and hl_chunk from neuron.cu (same
// translation unit).

namespace hl {

#define HL_SC_LEVELS 8  // reference.SELECTION_LEVELS
#define HL_SC_LANES 16  // partial sums of a dense masked row sum (one float vector on a CPU)
#define HL_SC_DENSE 8   // a level with HL_SC_DENSE |P| > N sums G's rows densely (below)

// sum_{a < n} g[P[a * ps]]: four interleaved partial sums (a mod 4), combined as
// (s0 + s1) + (s2 + s3). Four chains instead of one: a CPU is latency-bound otherwise.
template <typename S>
__device__ __forceinline__ typename acc_of<S>::type sc_gather_sum(const S* __restrict__ g,
                                                                  const int* __restrict__ P,
                                                                  long long ps, int n) {
  typedef typename acc_of<S>::type F;
  F s0 = F(0), s1 = F(0), s2 = F(0), s3 = F(0);
  int a = 0;
  for (; a + 4 <= n; a += 4) {
    s0 += load(g + P[a * ps]);
    s1 += load(g + P[(a + 1) * ps]);
    s2 += load(g + P[(a + 2) * ps]);
    s3 += load(g + P[(a + 3) * ps]);
  }
  if (a < n) s0 += load(g + P[a * ps]);
  if (a + 1 < n) s1 += load(g + P[(a + 1) * ps]);
  if (a + 2 < n) s2 += load(g + P[(a + 2) * ps]);
  return (s0 + s1) + (s2 + s3);
}

// Sums the HL_SC_LANES lane sums of a dense masked row sum in a fixed tree (lane l += lane
// l + w for w = 8, 4, 2, 1).
// (Spelled out: with a loop over w, nvcc keeps the lanes in local memory.)
template <typename F>
__device__ __forceinline__ F sc_lane_tree(F* s) {
  static_assert(HL_SC_LANES == 16, "the tree halves 16 lanes");
#pragma unroll
  for (int l = 0; l < 8; ++l) s[l] += s[l + 8];
#pragma unroll
  for (int l = 0; l < 4; ++l) s[l] += s[l + 4];
  s[0] += s[2];
  s[1] += s[3];
  return s[0] + s[1];
}

// Pair sums of a level, sum_{i in P} ((G 1_P)_i - G_ii) with (G 1_P)_i read along G's row i.
// Small sets gather G[i, P] (O(|P|^2)); large ones (HL_SC_DENSE |P| > N) sum G's row i over
// the membership mask instead (O(|P| N), dense and streaming): sum_k mask_k G[i, k] as
// HL_SC_LANES lane sums (lane k mod 16, increasing k) and sc_lane_tree. The CPU twin computes
// the dense sums with vectors (sc_pairs_cpu), in exactly this order.
template <typename S>
struct sc_pairs_gpu {
  typedef typename acc_of<S>::type F;
  typedef unsigned char mask_t;  // the spike row itself
  __device__ static F dense(const S* __restrict__ G, const int* __restrict__ P, long long ps,
                            int n, const mask_t* __restrict__ mask, int N) {
    F sq = F(0);
    for (int a = 0; a < n; ++a) {
      const long long i = P[a * ps];
      const S* __restrict__ g = G + i * N;
      F s[HL_SC_LANES];
#pragma unroll
      for (int l = 0; l < HL_SC_LANES; ++l) s[l] = F(0);
      int k0 = 0;
      for (; k0 + HL_SC_LANES <= N; k0 += HL_SC_LANES) {
#pragma unroll
        for (int l = 0; l < HL_SC_LANES; ++l) s[l] += mask[k0 + l] ? load(g + k0 + l) : F(0);
      }
#pragma unroll
      for (int l = 0; l < HL_SC_LANES; ++l) {
        if (k0 + l < N) s[l] += mask[k0 + l] ? load(g + k0 + l) : F(0);
      }
      sq += sc_lane_tree<F>(s) - load(g + i);
    }
    return sq;
  }
};

// The level walk. On entry P[0..n) (stride ps) holds the candidates in increasing index and
// mask[0..N) is 1 exactly at them; their margins are V[i * vs] - theta; best = max u > 0 at
// index bi. On return P[0..k) holds the accepted set (increasing index) and mask marks it; k
// is returned and d is its dF. PAIRS computes the dense pair sums.
template <typename S, class PAIRS, typename F = typename acc_of<S>::type>
__device__ __forceinline__ int sc_select(const F* __restrict__ V, long long vs,
                                         int* __restrict__ P, long long ps,
                                         typename PAIRS::mask_t* __restrict__ mask, int n, F best,
                                         int bi, const S* __restrict__ G, int N, F theta, F nd,
                                         F hd2, F& d) {
  int prev = -1;
  for (int j = 0; j < HL_SC_LEVELS - 1; ++j) {
    const F thr = mul_rn(best, F(1) - F(1) / F(1 << j));  // (1 - 2^-j) is exact
    int k = 0;
    F su = F(0);
    for (int a = 0; a < n; ++a) {
      const int i = P[a * ps];
      const F u = V[i * vs] - theta;
      if (u >= thr) {
        P[k * ps] = i;
        ++k;
        su += u;
      } else {
        mask[i] = 0;
      }
    }
    n = k;
    if (n == prev) continue;  // nobody left: the set the level above rejected
    prev = n;
    F sq = F(0);
    if (HL_SC_DENSE * n > N) {
      sq = PAIRS::dense(G, P, ps, n, mask, N);
    } else {
      for (int a = 0; a < n; ++a) {
        const long long i = P[a * ps];
        sq += sc_gather_sum<S>(G + i * N, P, ps, n) - load(G + i * N + i);
      }
    }
    d = mul_rn(nd, su) + mul_rn(hd2, sq);
    if (d < F(0)) return n;
  }
  for (int a = 0; a < n; ++a) mask[P[a * ps]] = 0;
  mask[bi] = 1;
  P[0] = bi;  // the single best neuron: dF = -delta u_best
  d = mul_rn(nd, best) + mul_rn(hd2, F(0));
  return 1;
}

// GPU: one thread per token (m = blockIdx.x * blockDim.x + threadIdx.x), all T steps.
// nd = -delta and hd2 = delta^2 / 2 are rounded once on the host (as torch rounds Python
// scalars); (sa, sb) are the surrogate's constants (neuron.cu).
// R and r alias for float and double (no __restrict__ on them).
template <typename S, int SURR>
__global__ void sc_fwd(const S* __restrict__ v1, const S* __restrict__ G,
                       typename acc_of<S>::type* __restrict__ V, int* __restrict__ P,
                       typename acc_of<S>::type* R, S* r, unsigned char* __restrict__ spk,
                       S* __restrict__ dF, S* __restrict__ dsdu, int M, int N, int T,
                       typename acc_of<S>::type theta, typename acc_of<S>::type delta,
                       typename acc_of<S>::type nd, typename acc_of<S>::type hd2,
                       typename acc_of<S>::type sa, typename acc_of<S>::type sb, int save) {
  typedef typename acc_of<S>::type F;
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  const long long Ml = M;
  F* __restrict__ v = V + m;  // v[i * M]
  int* __restrict__ p = P + m;  // p[a * M]
  F* rr = R + (long long)m * N;
  for (int i = 0; i < N; ++i) {
    v[i * Ml] = load(v1 + (long long)m * N + i);
    rr[i] = F(0);
  }
  for (int t = 0; t < T; ++t) {
    const long long row = ((long long)t * M + m) * N;
    // best margin (lowest index on ties) and the candidates, in one pass
    F best = v[0] - theta;
    int bi = 0, n = 0;
    for (int i = 0; i < N; ++i) {
      const F u = v[i * Ml] - theta;
      if (u > best) {
        best = u;
        bi = i;
      }
      spk[row + i] = u > F(0);  // the membership mask during the level walk
      if (u > F(0)) {
        p[n * Ml] = i;
        ++n;
      }
    }
    F d = F(0);
    if (n > 0)
      n = sc_select<S, sc_pairs_gpu<S>>(v, Ml, p, Ml, spk + row, n, best, bi, G, N, theta, nd,
                                        hd2, d);
    store(dF + (long long)t * M + m, d);
    if (save) {  // the surrogate factor, from the margins before the update
      for (int i = 0; i < N; ++i) {
        const F u = v[i * Ml] - theta;
        store(dsdu + row + i,
              (spk[row + i] || u <= F(0)) ? surrogate_grad<F, SURR>(u, sa, sb) : F(0));
      }
    }
    if (n == 0) continue;  // settled: V stays
    for (int b = 0; b < n; ++b) rr[p[b * Ml]] += delta;
    for (int i = 0; i < N; ++i) {
      F acc = F(0);
      for (int b = 0; b < n; ++b) acc += load(G + (long long)p[b * Ml] * N + i);
      v[i * Ml] = v[i * Ml] - mul_rn(delta, acc);
    }
  }
  if ((const void*)rr != (const void*)(r + (long long)m * N))
    for (int i = 0; i < N; ++i) store(r + (long long)m * N + i, rr[i]);
}

#ifdef HL_CPU_SHIM
// The dense pair sums of sc_pairs_gpu with vectors: HL_SC_LANES lanes of F per row, four
// rows at a time (four independent chains), the same lane sums in the same order.
template <typename S>
struct sc_pairs_cpu {
  typedef typename acc_of<S>::type F;
  typedef F mask_t;  // 0 or 1 as F: a vector multiply masks (GCC 12 does not vectorise a
                     // uint8 -> F conversion)
  typedef F lanes __attribute__((vector_size(HL_SC_LANES * sizeof(F))));
  static_assert(sizeof(lanes) == HL_SC_LANES * sizeof(F), "one vector of lanes");

  static inline lanes lanes_of(const F* p) {
    lanes x;
    __builtin_memcpy(&x, p, sizeof x);
    return x;
  }
  template <typename T>  // a half type: 16 floats, converted as the LIF chunks do
  static inline lanes lanes_of(const T* p) {
    F t[HL_SC_LANES];
    load_lanes(p, t);
    return lanes_of(t);
  }

  static F dense(const S* __restrict__ G, const int* __restrict__ P, long long ps, int n,
                 const mask_t* __restrict__ mask, int N) {
    F sq = F(0);
    for (int a0 = 0; a0 < n; a0 += 4) {
      const int c = n - a0 < 4 ? n - a0 : 4;
      const S* g[4];
      for (int q = 0; q < 4; ++q) g[q] = G + (long long)P[(a0 + (q < c ? q : 0)) * ps] * N;
      lanes s0 = {}, s1 = {}, s2 = {}, s3 = {};
      int k0 = 0;
      for (; k0 + HL_SC_LANES <= N; k0 += HL_SC_LANES) {
        // x * 1 = x and s + x * 0 = s exactly (s is never -0): the GPU's masked add
        const lanes mf = lanes_of(mask + k0);
        s0 += lanes_of(g[0] + k0) * mf;
        s1 += lanes_of(g[1] + k0) * mf;
        s2 += lanes_of(g[2] + k0) * mf;
        s3 += lanes_of(g[3] + k0) * mf;
      }
      lanes* s[4] = {&s0, &s1, &s2, &s3};
      for (int q = 0; q < c; ++q) {
        if (k0 < N) {  // the last N mod 16 elements: lanes beyond N add 0
          F t[HL_SC_LANES] = {};
          for (int l = 0; k0 + l < N; ++l) t[l] = mask[k0 + l] ? hl::load(g[q] + k0 + l) : F(0);
          *s[q] += lanes_of(t);
        }
        sq += tree(*s[q]) - hl::load(g[q] + P[(a0 + q) * ps]);
      }
    }
    return sq;
  }

  // sc_lane_tree in registers: lane l += lane l + w for w = 8, 4, 2, 1
  static inline F tree(lanes s) {
    typedef F h8 __attribute__((vector_size(8 * sizeof(F))));
    typedef F h4 __attribute__((vector_size(4 * sizeof(F))));
    typedef F h2 __attribute__((vector_size(2 * sizeof(F))));
    static_assert(HL_SC_LANES == 16, "the tree below halves 16 lanes");
    const h8 a = __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);
    const h4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    const h2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
  }
};

// CPU twin of sc_fwd (compiled only by the shim): the same token loop with V and P as rows
// (element i of token m at m * N + i), the O(N) passes written to vectorise, and the update
// in vector-wide chunks of i with the members inside (per element the same sum, in the same
// order, as the GPU kernel). Launch with block = 1, grid = M.
template <typename F>
struct hl_vec64 {
  typedef F type __attribute__((vector_size(64)));
};

// sc_vec<F, V>::of(g): the 64-byte vector V of the VL values at g, in the accumulation type F.
template <typename F, typename V>
struct sc_vec {
  static inline V of(const F* g) {
    V x;
    __builtin_memcpy(&x, g, sizeof x);
    return x;
  }
  template <typename S>
  static inline V of(const S* g) {  // a half type: 16 floats, converted as the LIF chunks do
    F t[hl_chunk<F>::VL];
    load_lanes(g, t);
    return of(t);
  }
};

template <typename S, int SURR>
__global__ void sc_fwd_rows(const S* __restrict__ v1, const S* __restrict__ G,
                            typename acc_of<S>::type* __restrict__ V, int* __restrict__ P,
                            typename acc_of<S>::type* R, S* r, unsigned char* __restrict__ spk,
                            S* __restrict__ dF, S* __restrict__ dsdu, int M, int N, int T,
                            typename acc_of<S>::type theta, typename acc_of<S>::type delta,
                            typename acc_of<S>::type nd, typename acc_of<S>::type hd2,
                            typename acc_of<S>::type sa, typename acc_of<S>::type sb,
                            int save) {
  typedef typename acc_of<S>::type F;
  constexpr int VL = hl_chunk<F>::VL;
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  F* __restrict__ v = V + (long long)m * 2 * N;  // V is M x 2N here: the membrane,
  F* __restrict__ fm = v + N;                     // then the membership mask as F
  int* __restrict__ p = P + (long long)m * N;
  F* rr = R + (long long)m * N;
  const S* __restrict__ x = v1 + (long long)m * N;
#pragma omp simd
  for (int i = 0; i < N; ++i) {
    v[i] = load(x + i);
    rr[i] = F(0);
  }
  for (int t = 0; t < T; ++t) {
    const long long row = ((long long)t * M + m) * N;
    unsigned char* __restrict__ s = spk + row;
    F best = v[0] - theta;
#pragma omp simd reduction(max : best)
    for (int i = 0; i < N; ++i) {
      const F u = v[i] - theta;
      best = u > best ? u : best;
    }
    int n = 0;
    F d = F(0);
    if (best > F(0)) {
      int bi = 0;
      while (bi < N - 1 && v[bi] - theta != best) ++bi;  // the first maximum
#pragma omp simd
      for (int i = 0; i < N; ++i) fm[i] = v[i] - theta > F(0) ? F(1) : F(0);
      for (int i = 0; i < N; ++i) {  // branch-free compaction of the candidates
        p[n] = i;
        n += fm[i] != F(0);
      }
      n = sc_select<S, sc_pairs_cpu<S>>(v, 1, p, 1, fm, n, best, bi, G, N, theta, nd, hd2, d);
#pragma omp simd
      for (int i = 0; i < N; ++i) s[i] = fm[i] != F(0);
    } else {
#pragma omp simd
      for (int i = 0; i < N; ++i) s[i] = 0;
    }
    store(dF + (long long)t * M + m, d);
    if (save) {
      S* __restrict__ g = dsdu + row;
#pragma omp simd
      for (int i = 0; i < N; ++i) {
        const F u = v[i] - theta;
        store(g + i, (s[i] || u <= F(0)) ? surrogate_grad<F, SURR>(u, sa, sb) : F(0));
      }
    }
    if (n == 0) continue;  // settled: V stays
    for (int b = 0; b < n; ++b) rr[p[b]] += delta;
    // Four 64-byte vectors of lanes at a time: four independent add chains per member.
    // (Written with vector types: GCC interchanged the plain-loop version into scalar code.)
    // (through a struct: GCC drops vector_size on a local typedef of a dependent type)
    typedef typename hl_vec64<F>::type vec;
    static_assert(sizeof(vec) == 64, "one 64-byte vector");
    constexpr int W = 4 * VL;
    int i0 = 0;
    for (; i0 + W <= N; i0 += W) {
      vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int b = 0; b < n; ++b) {
        const S* __restrict__ gr = G + (long long)p[b] * N + i0;
        a0 += sc_vec<F, vec>::of(gr);
        a1 += sc_vec<F, vec>::of(gr + VL);
        a2 += sc_vec<F, vec>::of(gr + 2 * VL);
        a3 += sc_vec<F, vec>::of(gr + 3 * VL);
      }
      vec* acc[4] = {&a0, &a1, &a2, &a3};
      for (int k = 0; k < 4; ++k) {
        vec x;
        __builtin_memcpy(&x, v + i0 + k * VL, 64);
        x = x - delta * *acc[k];
        __builtin_memcpy(v + i0 + k * VL, &x, 64);
      }
    }
    for (int i = i0; i < N; ++i) {
      F acc = F(0);
      for (int b = 0; b < n; ++b) acc += load(G + (long long)p[b] * N + i);
      v[i] = v[i] - mul_rn(delta, acc);
    }
  }
  if ((const void*)rr != (const void*)(r + (long long)m * N)) {
    S* __restrict__ out = r + (long long)m * N;
#pragma omp simd
    for (int i = 0; i < N; ++i) store(out + i, rr[i]);
  }
}
#endif  // HL_CPU_SHIM

}  // namespace hl
