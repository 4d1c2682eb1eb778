// Host stand-ins for what the kernels take from the CUDA headers and from CuTe's instruction
// atoms, for DISTATTN_EMULATE builds (csrc/kernels/mma.cuh includes this instead of
// <cuda_fp16.h>, <cuda_bf16.h> and <cute/arch/...>). The kernel text is unchanged: only these
// definitions differ. Warp-collective instructions and barriers go to the CTA emulator
// (runtime.h); scalar arithmetic is the host's (IEEE float, no fast-math approximations).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emulate/cuda_runtime.h"
#include "emulate/float16.h"
#include "emulate/runtime.h"

// -- qualifiers and built-in variables --------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `extern __shared__ T smem_raw[]` becomes a thread-local array: all threads (fibers) of a CTA
// run on one OS thread, which runs one CTA at a time, so it is exactly the CTA's shared memory.
// runtime.cpp defines the array as distattn::kern::smem_raw, so kernels declare it by that name
// inside namespace distattn::kern (the namespace a block-scope extern declaration refers to).
// GNU __thread, not thread_local:
// a block-scope `extern thread_local` makes GCC call a TLS init function that does not exist.
#define __shared__ __thread
#define threadIdx (::distattn::emu::thread_idx())
#define blockIdx (::distattn::emu::block_idx())
#define blockDim (::distattn::emu::block_dim())
#define gridDim (::distattn::emu::grid_dim())

// -- 16-bit floating point types (bit layouts as CUDA's; conversions in emulate/float16.h) ----
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;  // x is the low 16 bits, as in CUDA
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};


inline float __half2float(__half h) { return distattn::emu::half_to_float(h.bits); }
inline float __bfloat162float(__nv_bfloat16 h) { return distattn::emu::bf16_to_float(h.bits); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {{distattn::emu::float_to_half(lo)}, {distattn::emu::float_to_half(hi)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{distattn::emu::float_to_bf16(lo)}, {distattn::emu::float_to_bf16(hi)}};
}

// -- vector types ------------------------------------------------------------------------------
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// -- warp and block synchronisation ----------------------------------------------------------
inline void __syncthreads() { distattn::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { distattn::emu::syncwarp(mask); }

template <typename X>
inline X __shfl_xor_sync(unsigned mask, X value, int lane_mask, int width = 32) {
  static_assert(sizeof(X) == 4, "the emulator models 32-bit shuffles");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = distattn::emu::shfl_xor(mask, bits, lane_mask, width);
  std::memcpy(&value, &bits, 4);
  return value;
}

// -- the CuTe atoms the kernels use ------------------------------------------------------------
namespace cute {

struct alignas(16) uint128_t {
  uint64_t lo, hi;
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
template <distattn::emu::MmaType kType>
struct EmulatedMma16x8x16 {
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                  uint32_t const& a1, uint32_t const& a2, uint32_t const& a3, uint32_t const& b0,
                  uint32_t const& b1, float const& c0, float const& c1, float const& c2,
                  float const& c3) {
    float d[4];
    distattn::emu::mma_m16n8k16(kType, d, {a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3});
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};
struct SM80_16x8x16_F32F16F16F32_TN : EmulatedMma16x8x16<distattn::emu::MmaType::kF16> {};
struct SM80_16x8x16_F32BF16BF16F32_TN : EmulatedMma16x8x16<distattn::emu::MmaType::kBF16> {};

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
template <bool kTrans>
struct EmulatedLdsmX4 {
  static void copy(uint128_t const& smem_src, uint32_t& dst0, uint32_t& dst1, uint32_t& dst2,
                   uint32_t& dst3) {
    uint32_t d[4];
    distattn::emu::ldmatrix_x4(&smem_src, kTrans, d);
    dst0 = d[0], dst1 = d[1], dst2 = d[2], dst3 = d[3];
  }
};
struct SM75_U32x4_LDSM_N : EmulatedLdsmX4<false> {};
struct SM75_U16x8_LDSM_T : EmulatedLdsmX4<true> {};

template <typename TS, typename TD = TS>
struct SM80_CP_ASYNC_CACHEGLOBAL_ZFILL {
  static_assert(sizeof(TS) == 16 && sizeof(TD) == 16, "the emulator models 16-byte cp.async");
  static void copy(TS const& gmem_src, TD& smem_dst, bool pred) {
    distattn::emu::cp_async_16(&smem_dst, &gmem_src, pred);
  }
};

inline void cp_async_fence() { distattn::emu::cp_async_commit(); }

template <int N>
inline void cp_async_wait() {
  distattn::emu::cp_async_wait(N);
}

}  // namespace cute
