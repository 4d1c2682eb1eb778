// Warp-level building blocks of the attention kernels: tile loads (cp.async), fragment loads
// (ldmatrix) and the m16n8k16 tensor-core MMA, through CuTe's SM75/SM80 instruction atoms.
//
// Fragment layout (PTX ISA, mma.m16n8k16 with 16-bit inputs and float32 accumulators).
// Within a warp, lane = 4*g + t (g = lane/4 in 0..7, t = lane%4 in 0..3).
//   A (16x16, row-major)  4 regs of 2 elements:
//        reg0 = A[g][2t..2t+1]     reg1 = A[g+8][2t..2t+1]
//        reg2 = A[g][2t+8..2t+9]   reg3 = A[g+8][2t+8..2t+9]
//   B (16x8, k x n)       2 regs:  reg0 = B[2t..2t+1][g]   reg1 = B[2t+8..2t+9][g]
//   C (16x8, float)       4 values: c0,c1 = C[g][2t..2t+1]   c2,c3 = C[g+8][2t..2t+1]
// Consequence used everywhere: the C fragments of two neighbouring 8-column tiles (2s, 2s+1)
// are, element for element, the A fragment of the 16-column slice s. So a probability tile
// computed as an accumulator feeds the next MMA as its A operand without leaving registers.
//
// Shared memory tiles are row-major [rows][pitch] with pitch = D + 8 elements (tiling.h).
#pragma once

#include <stdint.h>

#include <atomic>

#if defined(DISTATTN_EMULATE)
// The host build (backend "emulate"): host models of the CUDA types and intrinsics and of the
// CuTe atoms below, running on the CTA emulator (csrc/emulate/). Everything else is this text.
#include "emulate/device.h"
#define DISTATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::distattn::emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#define DISTATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include "distattn/fragments.h"
#include "distattn/params.h"
#include "distattn/softmax.h"
#include "distattn/tiling.h"

namespace distattn {
namespace kern {

// ---- element types -------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
};

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// ---- launch helpers ------------------------------------------------------------------------
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per kernel and device (the attribute
// lives in the device's context; a driver call on every launch is wasted time). A kernel
// instantiation always asks for the same size, so "done" is the size already allowed.
template <auto Kernel>
cudaError_t allow_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> allowed[kMaxDevices];  // zero-initialised: nothing allowed yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && allowed[device].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) allowed[device].store(bytes, std::memory_order_release);
  return err;
}

// ---- pieces and scores ----------------------------------------------------------------------
// The piece a CTA works on: the last piece whose first tile is <= `tile` (each piece's tiles
// are consecutive in the grid, see assign_tiles). Unrolled over constant indices, so the
// parameters are read where they are (a dynamic index would copy them to local memory).
__device__ __forceinline__ PieceParams piece_of_tile(const Problem& pr, int tile, bool by_keys) {
  PieceParams pc = pr.pieces[0];
#pragma unroll
  for (int i = 1; i < kMaxPieces; ++i) {
    const int begin = by_keys ? pr.pieces[i].k_tile_begin : pr.pieces[i].q_tile_begin;
    if (i < pr.num_pieces && begin <= tile) pc = pr.pieces[i];
  }
  return pc;
}

// The query tile of BM rows that a CTA of a query-tiled kernel owns (fwd_kernel, bwd_q_kernel,
// fwd_sm90_kernel, bwd_q_sm90_kernel; the grid of launch_grid / assign_tiles): blockIdx.x
// counts the call's query tiles heaviest first (under a causal band the last query tiles see
// the most keys, so tile gridDim.x - 1 - blockIdx.x is launched first), blockIdx.y is the
// query head, blockIdx.z the batch. Kernels bind the fields in this order,
//   const auto [pc, sq, sk, h, b, hk, m0, keys] = query_tile_of_cta<BM, BN>(pr);
// so keep it (and the types) when changing the struct.
struct QueryTile {
  PieceParams pc;  // the piece the tile lies in
  index_t sq, sk;  // the piece's query and key lengths
  int h, b;        // query head, batch
  int hk;          // K/V head of h (GQA: an index mapping, K/V are never expanded)
  index_t m0;      // the tile's first row, in the piece's rows (rows of the piece from here on)
  TileRange keys;  // key tiles of BN keys that some in-bounds row of the tile sees
};

template <int BM, int BN>
__device__ __forceinline__ QueryTile query_tile_of_cta(const Problem& pr) {
  const int tile = int(gridDim.x) - 1 - int(blockIdx.x);
  const PieceParams pc = piece_of_tile(pr, tile, false);
  const index_t m0 = index_t(tile - pc.q_tile_begin) * BM;
  const int h = blockIdx.y;
  return {pc,
          pc.seqlen_q,
          pc.seqlen_k,
          h,
          int(blockIdx.z),
          h / (pr.heads_q / pr.heads_kv),
          m0,
          key_tiles_for_query_tile(m0, BM, BN, pc.seqlen_q, pc.seqlen_k, pc.band)};
}

// Scores in the kernels: the MMA gives s = q.k; the softmax wants the scaled score
// u = scale * s, or with softcap c > 0, c * tanh(u / c), in log2 units. A kernel keeps a "raw"
// score and one multiplier to log2 units: raw = s and mul = scale * log2(e) without softcap
// (the fast path, one FMA later), raw = tanh(u / c) and mul = c * log2(e) with it.
struct ScoreScale {
  float mul;     // raw -> log2 units
  float cap_in;  // scale / c, 0 without softcap
  __device__ __forceinline__ ScoreScale(float scale, float softcap)
      : mul((softcap > 0.f ? softcap : scale) * kLog2e),
        cap_in(softcap > 0.f ? scale / softcap : 0.f) {}
  // q.k -> raw score; `slope` = d(capped score)/du = 1 - tanh^2 (1 without softcap), the
  // factor the backward multiplies into dS.
  __device__ __forceinline__ float raw(float s, float& slope) const {
    if (cap_in == 0.f) {
      slope = 1.f;
      return s;
    }
    const float th = tanhf(s * cap_in);
    slope = 1.f - th * th;
    return th;
  }
};

// ---- scalar shared-memory accesses -----------------------------------------------------------
// Shared memory that is not written by cp.async or read by ldmatrix is accessed through these
// two, so that the emulator's race check sees every shared-memory access.
template <typename X>
__device__ __forceinline__ X ld_shared(const X* p) {
#if defined(DISTATTN_EMULATE)
  emu::shared_read(p, sizeof(X));
#endif
  return *p;
}
template <typename X>
__device__ __forceinline__ void st_shared(X* p, X value) {
#if defined(DISTATTN_EMULATE)
  emu::shared_write(p, sizeof(X));
#endif
  *p = value;
}

// ---- global -> shared tile copy --------------------------------------------------------------
// Copies rows [row0, row0 + ROWS) of a [S, D] slice (row `r` at gmem + r * row_stride) into
// smem[ROWS][pitch] with 16-byte cp.async. Rows >= seqlen are zero-filled (src-size 0), so
// out-of-bounds keys/values/queries are exact zeros, never garbage that could become NaN.
// All threads of the CTA take part. The caller commits and waits (cp_async_fence/wait).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, index_t row_stride,
                                                index_t row0, index_t seqlen) {
  constexpr int kChunksPerRow = D * int(sizeof(T)) / 16;
  constexpr int kElemsPerChunk = 16 / int(sizeof(T));
  constexpr int kPitch = smem_pitch(D);
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += blockDim.x) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kElemsPerChunk;
    const index_t row = row0 + r;
    const bool in_bounds = row < seqlen;
    // An out-of-bounds chunk reads nothing; its source address stays a valid one anyway.
    const T* src = gmem + (in_bounds ? row * row_stride : index_t(0)) + col;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(smem + r * kPitch + col), in_bounds);
  }
}

__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
__device__ __forceinline__ void cp_async_wait_all() { cute::cp_async_wait<0>(); }

// ---- shared -> register fragments (ldmatrix.x4) ---------------------------------------------
// ldmatrix.x4: lane L gives the address of row (L % 8) of 8x8 matrix (L / 8); register i of
// every lane receives matrix i. Non-transposed, lane (g, t) gets row g, columns 2t..2t+1;
// transposed, it gets rows 2t..2t+1 of column g.

// A fragment of the 16x16 block at (row0, col0) of a row-major tile.
// Matrices: 0 = rows 0-7/cols 0-7, 1 = rows 8-15/cols 0-7, 2 = rows 0-7/cols 8-15,
// 3 = rows 8-15/cols 8-15, which are A's reg0..reg3.
template <typename T, int PITCH>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const frag::RowCol at = frag::ldsm_a_addr(threadIdx.x % 32);
  const T* p = tile + (row0 + at.row) * PITCH + col0 + at.col;
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), a[0], a[1], a[2],
                                a[3]);
}

// B fragments for two 8-column n-tiles (n0 and n0 + 8) over k in [k0, k0 + 16), where the
// tile is stored n-major: B[k][n] = tile[n][k] (K for S = Q K^T, V for dP = dO V^T).
// Matrices: 0 = n 0-7/k 0-7, 1 = n 0-7/k 8-15, 2 = n 8-15/k 0-7, 3 = n 8-15/k 8-15.
// Result: b[0], b[1] = n-tile n0; b[2], b[3] = n-tile n0 + 8.
template <typename T, int PITCH>
__device__ __forceinline__ void ldsm_b_nmajor(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const frag::RowCol at = frag::ldsm_b_nmajor_addr(threadIdx.x % 32);
  const T* p = tile + (n0 + at.row) * PITCH + k0 + at.col;
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), b[0], b[1], b[2],
                                b[3]);
}

// B fragments for two n-tiles (n0, n0 + 8) over k in [k0, k0 + 16), where the tile is stored
// k-major: B[k][n] = tile[k][n] (V for O = P V, dO for dV = P^T dO, K for dQ = dS K, ...).
// Transposed load. Matrices: 0 = k 0-7/n 0-7, 1 = k 8-15/n 0-7, 2 = k 0-7/n 8-15,
// 3 = k 8-15/n 8-15. Result: b[0], b[1] = n-tile n0; b[2], b[3] = n-tile n0 + 8.
template <typename T, int PITCH>
__device__ __forceinline__ void ldsm_b_kmajor(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const frag::RowCol at = frag::ldsm_b_kmajor_addr(threadIdx.x % 32);
  const T* p = tile + (k0 + at.row) * PITCH + n0 + at.col;
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(p), b[0], b[1], b[2],
                                b[3]);
}

// ---- MMA ------------------------------------------------------------------------------------
// c += A(16x16) * B(16x8).
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  Elem<T>::Mma::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2],
                    c[3]);
}

// acc[M-rows 16][N] += A-tile (rows row0.., all K) * B, where
//   A comes from `a_tile` (row-major, [rows][K]) and B from `b_tile` stored n-major
//   ([N][K], B = b_tile^T). N_TILES8 8-column accumulator tiles, K a multiple of 16.
template <typename T, int PITCH, int K, int N_TILES8>
__device__ __forceinline__ void gemm_smem_a_nmajor_b(float (&acc)[N_TILES8][4], const T* a_tile,
                                                     int row0, const T* b_tile) {
  static_assert(N_TILES8 % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldsm_a<T, PITCH>(a, a_tile, row0, 16 * kk);
#pragma unroll
    for (int nn = 0; nn < N_TILES8 / 2; ++nn) {
      uint32_t b[4];
      ldsm_b_nmajor<T, PITCH>(b, b_tile, 16 * nn, 16 * kk);
      mma<T>(acc[2 * nn], a, b[0], b[1]);
      mma<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc[16][N] += A * B where A is given as register fragments (K_SLICES slices of 16 columns)
// and B comes from `b_tile` stored k-major ([K][N], rows k0.. of the tile).
template <typename T, int PITCH, int K_SLICES, int N_TILES8>
__device__ __forceinline__ void gemm_rega_kmajor_b(float (&acc)[N_TILES8][4],
                                                   const uint32_t (&a)[K_SLICES][4],
                                                   const T* b_tile) {
  static_assert(N_TILES8 % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < K_SLICES; ++kk) {
#pragma unroll
    for (int nn = 0; nn < N_TILES8 / 2; ++nn) {
      uint32_t b[4];
      ldsm_b_kmajor<T, PITCH>(b, b_tile, 16 * kk, 16 * nn);
      mma<T>(acc[2 * nn], a[kk], b[0], b[1]);
      mma<T>(acc[2 * nn + 1], a[kk], b[2], b[3]);
    }
  }
}

// Accumulator tiles (float, 8 columns each) -> A fragments of 16-column slices, in T.
template <typename T, int N_TILES8>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[N_TILES8 / 2][4],
                                         const float (&c)[N_TILES8][4]) {
#pragma unroll
  for (int s = 0; s < N_TILES8 / 2; ++s)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float(&c2)[4] = c[2 * s + frag::acc_tile(q)];
      a[s][q] = Elem<T>::pack(c2[frag::acc_elem(q, 0)], c2[frag::acc_elem(q, 1)]);
    }
}

template <int N, int M>
__device__ __forceinline__ void zero(float (&x)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) x[i][j] = 0.f;
}

// Reductions over the 4 lanes (t = 0..3) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace kern
}  // namespace distattn
