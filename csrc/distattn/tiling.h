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
// The mask of a piece is a band (params.h): key j visible to query i iff lo <= j - i <= hi.
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

// Head dims with compiled kernels. (D, D) for q/k and v alike: enabling another (e.g. 256) is
// this one line: the kernels' tile sizes are functions of the head dims below, and the
// translation units for 256 already exist (they compile to nothing while the flag is 0).
// DISTATTN_HD192_128 is MLA's pair (DeepSeek V2/V3, Kimi K2): q/k head dim 192, v/out 128.
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
#ifndef DISTATTN_HD192_128
#define DISTATTN_HD192_128 1
#endif

namespace distattn {

// ------------------------------------------------------------------------------------------
// Tile sizes. Each warp owns 16 rows of its CTA's tile (one m16n8k16 MMA row block).
// ------------------------------------------------------------------------------------------
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// Tile sizes are functions of D (q/k: the score GEMMs, dQ, dK) and Dv (v/out: the output
// GEMMs, dO, dV). What bounds them is registers: per thread, a warp's 16 x N float32
// accumulator takes N / 2 registers and a 16 x N 16-bit A fragment N / 4, and each kernel keeps
//   forward  Q fragments D / 4 + O Dv / 2    + S  BN / 2   (per key tile)
//   dK/dV    dK D / 2 + dV Dv / 2            + S^T, dP^T BM (per query tile)
//   dQ       dQ D / 2                        + S, dP BN     (per key tile)
// live across its loop. The loop's tile is 64 while the fixed part is at most one that ptxas
// (nvcc 13.0, sm_80 and sm_90a) has compiled without spills at a 64 tile, else 32. The
// thresholds are such measured footprints (docs/KERNELS.md has the registers): forward 112
// (MLA's (192, 128), 218 registers on sm_80), dK/dV 64 (D = Dv = 64, 185), dQ 96 ((192, 128),
// 244); larger ones have not been tried at 64. So D = Dv = 64 / 128 keep the tiles they were
// tuned with, and (192, 128) gets forward 64 x 64, dK/dV 64 keys x 32 queries, dQ 64 x 64.
// Forward: CTA = (query tile, q head, batch); it loops over key tiles.
DA_HD constexpr int fwd_block_m(int /*d*/, int /*dv*/) { return 16 * kWarps; }
DA_HD constexpr int fwd_block_n(int d, int dv) { return d / 4 + dv / 2 <= 112 ? 64 : 32; }
// Backward dK/dV kernel: CTA = (key tile, kv head, batch); it loops over the group's q heads
// and their query tiles.
DA_HD constexpr int bwd_kv_block_n(int /*d*/, int /*dv*/) { return 16 * kWarps; }
DA_HD constexpr int bwd_kv_block_m(int d, int dv) { return d / 2 + dv / 2 <= 64 ? 64 : 32; }
// Backward dQ kernel: CTA = (query tile, q head, batch); it loops over key tiles.
DA_HD constexpr int bwd_q_block_m(int /*d*/, int /*dv*/) { return 16 * kWarps; }
DA_HD constexpr int bwd_q_block_n(int d, int /*dv*/) { return d / 2 <= 96 ? 64 : 32; }
// Shared-memory row pitch in elements of a tile with `cols` columns (D or Dv): 16 bytes of
// padding per row make the 8 rows read by one ldmatrix phase start on 8 different 4-bank
// groups (conflict-free), no swizzle needed.
DA_HD constexpr int smem_pitch(int cols) { return cols + 8; }

// Whether (D, Dv) has compiled kernels.
inline bool head_dims_supported(int d, int dv) {
  if (d == dv)
    return (DISTATTN_HD64 && d == 64) || (DISTATTN_HD128 && d == 128) ||
           (DISTATTN_HD256 && d == 256);
  return DISTATTN_HD192_128 && d == 192 && dv == 128;
}

DA_HD constexpr index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
DA_HD constexpr index_t imin(index_t a, index_t b) { return a < b ? a : b; }
DA_HD constexpr index_t imax(index_t a, index_t b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------
// Visibility and tile classification, for one piece (sq x sk, band in piece coordinates).
// ------------------------------------------------------------------------------------------
DA_HD bool in_band(index_t row, index_t col, Band band) {
  return col - row >= band.lo && col - row <= band.hi;
}

DA_HD bool visible(index_t row, index_t col, index_t sq, index_t sk, Band band) {
  return row < sq && col < sk && in_band(row, col, band);
}

enum TileKind : int { kSkip = 0, kPartial = 1, kFull = 2 };

// Kind of the tile [m0, m0+bm) x [n0, n0+bn). Requires 0 <= m0 < sq and 0 <= n0.
// In-bounds rows m0..m_last: the first sees the leftmost keys (j <= m0 + hi is the tightest
// upper bound), the last sees the rightmost (j >= m_last + lo the tightest lower bound).
DA_HD TileKind classify_tile(index_t m0, int bm, index_t n0, int bn, index_t sq, index_t sk,
                             Band band) {
  const index_t m_last = imin(m0 + bm, sq) - 1;
  const index_t n_last = imin(n0 + bn, sk) - 1;  // last in-bounds key
  if (n0 >= sk) return kSkip;
  if (n0 > m_last + band.hi) return kSkip;       // every key right of every row's band
  if (n_last < m0 + band.lo) return kSkip;       // every key left of every row's band
  const bool keys_in_bounds = n0 + bn <= sk;
  const bool all_rows_see_all = n0 + bn - 1 <= m0 + band.hi && n0 >= m_last + band.lo;
  return (keys_in_bounds && all_rows_see_all) ? kFull : kPartial;
}

// A half-open range of tile indices.
struct TileRange {
  index_t first;
  index_t last;
};

// Key tiles a query tile starting at m0 visits: [first, last) are exactly its non-skipped
// tiles (the keys some in-bounds row sees form one interval).
DA_HD TileRange key_tiles_for_query_tile(index_t m0, int bm, int bn, index_t sq, index_t sk,
                                         Band band) {
  const index_t m_last = imin(m0 + bm, sq) - 1;
  const index_t j_begin = imax(index_t(0), m0 + band.lo);      // first key some row sees
  const index_t j_end = imin(sk, imax(index_t(0), m_last + band.hi + 1));
  if (j_begin >= j_end) return {0, 0};
  return {j_begin / bn, ceil_div(j_end, bn)};
}

// Query tiles a key tile starting at n0 meets: [first, last) are exactly its non-skipped ones.
DA_HD TileRange query_tiles_for_key_tile(index_t n0, int bn, int bm, index_t sq, index_t sk,
                                         Band band) {
  if (n0 >= sk) return {0, 0};
  const index_t n_last = imin(n0 + bn, sk) - 1;
  const index_t i_begin = imax(index_t(0), n0 - band.hi);      // first row that sees a key
  const index_t i_end = imin(sq, imax(index_t(0), n_last - band.lo + 1));
  if (i_begin >= i_end) return {0, 0};
  return {i_begin / bm, ceil_div(i_end, bm)};
}

// Number of tiles of `size` a launch needs over its pieces' rows (keys == false) or keys.
inline index_t total_tiles(const Problem& p, int size, bool keys) {
  index_t n = 0;
  for (int i = 0; i < p.num_pieces; ++i)
    n += ceil_div(keys ? p.pieces[i].seqlen_k : p.pieces[i].seqlen_q, size);
  return n;
}

// Fill each piece's first CTA for a launch with bm-row query tiles and bn-key key tiles.
inline void assign_tiles(Problem& p, int bm, int bn) {
  int q = 0, k = 0;
  for (int i = 0; i < p.num_pieces; ++i) {
    p.pieces[i].q_tile_begin = q;
    p.pieces[i].k_tile_begin = k;
    q += int(ceil_div(p.pieces[i].seqlen_q, bm));
    k += int(ceil_div(p.pieces[i].seqlen_k, bn));
  }
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

// Shared memory of each kernel (bytes, 16-bit elements of `elem_bytes`): row-major tiles of
// D or Dv columns at their smem_pitch, plus the dK/dV kernel's lse and delta rows (float32).
DA_HD constexpr int fwd_smem_bytes(int d, int dv, int elem_bytes) {
  return ((fwd_block_m(d, dv) + fwd_block_n(d, dv)) * smem_pitch(d) +  // Q, K
          fwd_block_n(d, dv) * smem_pitch(dv)) * elem_bytes;            // V
}
DA_HD constexpr int bwd_kv_smem_bytes(int d, int dv, int elem_bytes) {
  return ((bwd_kv_block_n(d, dv) + bwd_kv_block_m(d, dv)) * smem_pitch(d) +    // K, Q
          (bwd_kv_block_n(d, dv) + bwd_kv_block_m(d, dv)) * smem_pitch(dv)) *  // V, dO
             elem_bytes +
         2 * bwd_kv_block_m(d, dv) * 4;  // lse, delta
}
DA_HD constexpr int bwd_q_smem_bytes(int d, int dv, int elem_bytes) {
  return ((bwd_q_block_m(d, dv) + bwd_q_block_n(d, dv)) * smem_pitch(d) +    // Q, K
          (bwd_q_block_m(d, dv) + bwd_q_block_n(d, dv)) * smem_pitch(dv)) *  // dO, V
         elem_bytes;
}

// grid_x: the query (or key) tiles of all pieces; see assign_tiles.
inline LaunchConfig fwd_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, dv = p.head_dim_v;
  return {total_tiles(p, fwd_block_m(d, dv), false), p.heads_q, p.batch, kThreads,
          fwd_smem_bytes(d, dv, elem_bytes)};
}

inline LaunchConfig bwd_kv_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, dv = p.head_dim_v;
  return {total_tiles(p, bwd_kv_block_n(d, dv), true), p.heads_kv, p.batch, kThreads,
          bwd_kv_smem_bytes(d, dv, elem_bytes)};
}

inline LaunchConfig bwd_q_launch_config(const Problem& p, int elem_bytes) {
  const int d = p.head_dim, dv = p.head_dim_v;
  return {total_tiles(p, bwd_q_block_m(d, dv), false), p.heads_q, p.batch, kThreads,
          bwd_q_smem_bytes(d, dv, elem_bytes)};
}

// One warp per (b, h, row) for the row-wise kernels (delta preprocessing, merge).
constexpr int kRowKernelThreads = 256;
inline LaunchConfig row_launch_config(index_t rows) {
  const index_t per_block = kRowKernelThreads / 32;
  return {ceil_div(rows, per_block), 1, 1, kRowKernelThreads, 0};
}

// Grid limits of CUDA (x: 2^31-1, y and z: 65535) and the opt-in shared memory per CTA of
// sm_80 (163 KiB; sm_90 allows 227 KiB). The sm_80 build also runs on sm_86 / sm_89, which
// allow 99 KiB: every compiled instantiation stays within that (test_checks.cpp).
constexpr index_t kMaxGridX = 2147483647;
constexpr index_t kMaxGridYZ = 65535;
constexpr int kMaxSmemBytesSm80 = 163 * 1024;
constexpr int kMaxSmemBytesSm86 = 99 * 1024;

}  // namespace distattn
