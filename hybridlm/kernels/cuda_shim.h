// cuda_shim.h: compile CUDA C kernels as plain C++ for the CPU.
//
// __global__/__device__ vanish, the built-in index variables become thread-local variables
// set by the launcher, atomicAdd becomes an OpenMP atomic, and what a CPU cannot emulate
// faithfully (shared memory, barriers, warp intrinsics) fails at compile time with a name
// that says why. hl_shim::launch runs a grid like cudaLaunchKernel: blocks in parallel
// (OpenMP), the threads of a block one after another, arguments as an array of pointers to
// the values. hl_shim::signature describes a kernel's parameters so the Python launcher can
// insist on exactly typed scalars (CuPy passes a Python int as int64).
#pragma once

#define HL_CPU_SHIM 1

#include <immintrin.h>  // F16C conversions of the CPU-only fp16 paths

#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

#define __shared__ HL_SHIM_UNSUPPORTED_shared_memory_has_no_cpu_equivalent
#define __syncthreads() HL_SHIM_UNSUPPORTED_syncthreads_has_no_cpu_equivalent()
#define __syncwarp(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __shfl_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __shfl_down_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __shfl_up_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __shfl_xor_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __ballot_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __any_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()
#define __all_sync(...) HL_SHIM_UNSUPPORTED_warp_intrinsics_have_no_cpu_equivalent()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// initial-exec: plain TLS loads instead of a __tls_get_addr call per access (the library is
// small enough for glibc's static TLS reserve for dlopen'ed objects).
inline thread_local __attribute__((tls_model("initial-exec"))) dim3 threadIdx, blockIdx,
    blockDim, gridDim;

// Round-to-nearest multiplies that CUDA never contracts into an FMA; the shim is built with
// -ffp-contract=off so a * b + c is two roundings here too.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

template <typename T>
inline T atomicAdd(T* address, T val) {
  T old;
#pragma omp atomic capture
  {
    old = *address;
    *address += val;
  }
  return old;
}

namespace hl_shim {

template <typename T>
struct scalar_name;
template <> struct scalar_name<float> { static const char* get() { return "float32"; } };
template <> struct scalar_name<double> { static const char* get() { return "float64"; } };
template <> struct scalar_name<int> { static const char* get() { return "int32"; } };
template <> struct scalar_name<unsigned> { static const char* get() { return "uint32"; } };
template <> struct scalar_name<long long> { static const char* get() { return "int64"; } };
template <> struct scalar_name<unsigned char> { static const char* get() { return "uint8"; } };

template <typename T>
struct param_name {
  static std::string get() { return scalar_name<T>::get(); }
};
template <typename T>
struct param_name<T*> {
  static std::string get() {
    return std::string(scalar_name<typename std::remove_cv<T>::type>::get()) + "*";
  }
};

// "float32*,float32*,int32,int64,float32" for void k(const float*, float*, int, ...).
template <typename... A>
std::string signature(void (*)(A...)) {
  std::string s;
  ((s += (s.empty() ? "" : ","), s += param_name<typename std::remove_cv<A>::type>::get()), ...);
  return s;
}

template <typename... A, std::size_t... I>
inline void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
}

// grid and block are 3 unsigned each, args[i] points at the value of parameter i; blocks run
// in parallel when par != 0.
template <typename... A>
void launch(void (*f)(A...), const unsigned* grid, const unsigned* block, void** args,
            int par) {
  const long long gx = grid[0], gy = grid[1], gz = grid[2];
  const long long nblocks = gx * gy * gz;
#pragma omp parallel for schedule(static) if (par)
  for (long long b = 0; b < nblocks; ++b) {
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    blockIdx = dim3{(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / (gx * gy))};
    for (unsigned z = 0; z < block[2]; ++z)
      for (unsigned y = 0; y < block[1]; ++y)
        for (unsigned x = 0; x < block[0]; ++x) {
          threadIdx = dim3{x, y, z};
          call(f, args, std::index_sequence_for<A...>{});
        }
  }
}

}  // namespace hl_shim
