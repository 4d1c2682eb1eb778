// Tile sizes, masked-tile arithmetic and launch configuration of distattn's kernels.
//
// Everything here is plain integer arithmetic shared by the kernels (device) and the host
// (binding, C++ unit tests, which compile it with g++ and compare it with brute force).
//
// Vocabulary. A kernel walks a (query tile) x (key tile) grid. Query tile rows are
// [m0, m0 + bm), key tile columns [n0, n0 + bn). Rows >= Sq and columns >= Sk lie outside the
// problem ("out of bounds"). For one tile:
//   kSkip    no in-bounds (row, column) pair is visible: the tile is never computed;
//   kFull    every in-bounds row sees every one of the bn columns, and all bn columns are in
//            bounds: no mask is applied;
//   kPartial anything else: computed with the mask applied elementwise.
// Out-of-bounds *rows* do not make a tile partial: the kernels never write them, and give
// them zero probability where they could leak into other results (see the kernels).
#pragma once

#include <cstdint>

#include "params.h"

#if defined(__CUDACC__)
#define DA_HD __host__ __device__ __forceinline__
#else
#define DA_HD inline
#endif

// Head dims with compiled kernels. Enabling another (e.g. 256) is this one line: the
// kernels' tile sizes are functions of D below, and the translation units for 256 already
// exist (they compile to nothing while the flag is 0).
// (Each can also be overridden from the compiler command line, e.g. -DDISTATTN_HD256=1.)
#ifndef DISTATTN_HD64
#define DISTATTN_HD64 1
#endif
#ifndef DISTATTN_HD128
#define DISTATTN_HD128 1
#endif
#ifndef DISTATTN_HD256
#define DISTATTN_HD256 0
#endif

namespace distattn {

// ------------------------------------------------------------------------------------------
// Tile sizes. Each warp owns 16 rows of its CTA's tile (one m16n8k16 MMA row block).
// ------------------------------------------------------------------------------------------
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// Forward: CTA = (query tile, q head, batch); it loops over key tiles.
DA_HD constexpr int fwd_block_m(int /*d*/) { return 16 * kWarps; }
DA_HD constexpr int fwd_block_n(int d) { return d <= 128 ? 64 : 32; }
// Backward dK/dV kernel: CTA = (key tile, kv head, batch); it loops over the group's q heads
// and their query tiles.
DA_HD constexpr int bwd_kv_block_n(int /*d*/) { return 16 * kWarps; }
DA_HD constexpr int bwd_kv_block_m(int d) { return d <= 64 ? 64 : 32; }
// Backward dQ kernel: CTA = (query tile, q head, batch); it loops over key tiles.
DA_HD constexpr int bwd_q_block_m(int /*d*/) { return 16 * kWarps; }
DA_HD constexpr int bwd_q_block_n(int d) { return d <= 128 ? 64 : 32; }
// Shared-memory row pitch in elements: 16 bytes of padding per row make the 8 rows read by
// one ldmatrix phase start on 8 different 4-bank groups (conflict-free), no swizzle needed.
DA_HD constexpr int smem_pitch(int d) { return d + 8; }

inline bool head_dim_supported(int d) {
  return (DISTATTN_HD64 && d == 64) || (DISTATTN_HD128 && d == 128) ||
         (DISTATTN_HD256 && d == 256);
}

DA_HD constexpr index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
DA_HD constexpr index_t imin(index_t a, index_t b) { return a < b ? a : b; }
DA_HD constexpr index_t imax(index_t a, index_t b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------
// Visibility and tile classification.
// ------------------------------------------------------------------------------------------
DA_HD bool visible(index_t row, index_t col, index_t sq, index_t sk, bool causal,
                   index_t offset) {
  return row < sq && col < sk && (!causal || col <= row + offset);
}

enum TileKind : int { kSkip = 0, kPartial = 1, kFull = 2 };

// Kind of the tile [m0, m0+bm) x [n0, n0+bn). Requires 0 <= m0 < sq and 0 <= n0.
DA_HD TileKind classify_tile(index_t m0, int bm, index_t n0, int bn, index_t sq, index_t sk,
                             bool causal, index_t offset) {
  const index_t m_last = imin(m0 + bm, sq) - 1;  // the least restricted in-bounds row
  if (n0 >= sk) return kSkip;
  if (causal && n0 > m_last + offset) return kSkip;
  const bool keys_in_bounds = n0 + bn <= sk;
  const bool first_row_sees_all = !causal || n0 + bn - 1 <= m0 + offset;
  return (keys_in_bounds && first_row_sees_all) ? kFull : kPartial;
}

// Number of key tiles a query tile starting at m0 visits: tiles [0, count) are exactly its
// non-skipped tiles (tiles are top-left aligned and nothing hides keys on the left).
DA_HD index_t key_tiles_for_query_tile(index_t m0, int bm, int bn, index_t sq, index_t sk,
                                       bool causal, index_t offset) {
  index_t n_end = sk;  // exclusive end of the keys visible to some in-bounds row
  if (causal) {
    const index_t m_last = imin(m0 + bm, sq) - 1;
    n_end = imin(sk, imax(index_t(0), m_last + offset + 1));
  }
  return ceil_div(n_end, bn);
}

// Query tiles a key tile starting at n0 meets: [first, last) are exactly its non-skipped ones.
struct TileRange {
  index_t first;
  index_t last;
};
DA_HD TileRange query_tiles_for_key_tile(index_t n0, int bn, int bm, index_t sq, index_t sk,
                                         bool causal, index_t offset) {
  (void)bn;
  const index_t n_tiles = ceil_div(sq, bm);
  if (n0 >= sk) return {n_tiles, n_tiles};
  index_t m_begin = 0;  // first row that sees the tile's first key
  if (causal) m_begin = imin(sq, imax(index_t(0), n0 - offset));
  return {m_begin / bm, m_begin >= sq ? m_begin / bm : n_tiles};
}

// ------------------------------------------------------------------------------------------
// Launch configuration (host side; the C++ tests check it, the launchers use it).
// ------------------------------------------------------------------------------------------
struct LaunchConfig {
  index_t grid_x = 0;
  index_t grid_y = 0;
  index_t grid_z = 0;
  int threads = 0;
  int smem_bytes = 0;
};

inline LaunchConfig fwd_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, bm = fwd_block_m(d), bn = fwd_block_n(d);
  return {ceil_div(p.seqlen_q, bm), p.heads_q, p.batch, kThreads,
          (bm + 2 * bn) * smem_pitch(d) * elem_bytes};
}

inline LaunchConfig bwd_kv_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, bn = bwd_kv_block_n(d), bm = bwd_kv_block_m(d);
  return {ceil_div(p.seqlen_k, bn), p.heads_kv, p.batch, kThreads,
          (2 * bn + 2 * bm) * smem_pitch(d) * elem_bytes + 2 * bm * 4};
}

inline LaunchConfig bwd_q_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, bm = bwd_q_block_m(d), bn = bwd_q_block_n(d);
  return {ceil_div(p.seqlen_q, bm), p.heads_q, p.batch, kThreads,
          (2 * bm + 2 * bn) * smem_pitch(d) * elem_bytes};
}

// One warp per (b, h, row) for the row-wise kernels (delta preprocessing, merge).
constexpr int kRowKernelThreads = 256;
inline LaunchConfig row_launch_config(index_t rows) {
  const index_t per_block = kRowKernelThreads / 32;
  return {ceil_div(rows, per_block), 1, 1, kRowKernelThreads, 0};
}

// Grid limits of CUDA (x: 2^31-1, y and z: 65535) and the opt-in shared memory of sm_80
// (163 KiB; sm_90 allows 227 KiB).
constexpr index_t kMaxGridX = 2147483647;
constexpr index_t kMaxGridYZ = 65535;
constexpr int kMaxSmemBytesSm80 = 163 * 1024;

}  // namespace distattn
