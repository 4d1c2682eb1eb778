// Forward block attention with LSE, plain or accumulating ("fused ring step").
//
// One CTA per (query tile of BM rows of a piece, query head, batch); 4 warps, each owning 16
// query rows. The pieces of a launch (params.h: rows disjoint, each with its band) share the
// grid's x dimension, piece after piece ("varlen"). The CTA loops over the key tiles its rows
// can see (tiling.h: key_tiles_for_query_tile), with FlashAttention-2's online softmax:
//
//   S = Q K^T (fp32) -> softcap -> mask (partial tiles only) -> running row max m (log2 units)
//   P = exp2(S * scale * log2(e) - m); rescale O and the row sums l; O += P V (P in T)
//
// D is q/k's head dim (S = Q K^T), Dv v's and out's (O = P V); they differ for MLA.
// Pipeline (cp.async, single buffer per operand): V_j is loaded while S_j is computed, and
// K_{j+1} while P_j V_j is computed. Empty rows (no visible key) end with l = 0 and get
// out = 0, lse = -inf. In accumulate mode the epilogue merges (out, lse) of this block into
// the float32 running (out_acc, lse_acc) instead of writing out/lse.
#pragma once

#include "fwd_epilogue.cuh"

namespace distattn {
namespace kern {

template <typename T, int D, int Dv>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams p) {
  constexpr int BM = fwd_block_m(D, Dv), BN = fwd_block_n(D, Dv);
  constexpr int PITCH = smem_pitch(D), PITCH_V = smem_pitch(Dv);
  static_assert(D % 16 == 0 && Dv % 16 == 0 && BN % 16 == 0 && BM == 16 * kWarps,
                "tile shape");
  constexpr int NT = BN / 8;   // 8-column tiles of S
  constexpr int DVT = Dv / 8;  // 8-column tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][PITCH]
  T* sK = sQ + BM * PITCH;                 // [BN][PITCH]
  T* sV = sK + BN * PITCH;                 // [BN][PITCH_V]

  const Problem& pr = p.prob;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // Heaviest (causal) tiles first; m0 in rows of the piece, hk = K/V head of h (GQA).
  const auto [pc, sq, sk, h, b, hk, m0, keys] = query_tile_of_cta<BM, BN>(pr);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
               pc.q0 * p.q_stride.seq;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head +
               pc.k0 * p.k_stride.seq;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head +
               pc.k0 * p.v_stride.seq;

  const ScoreScale score(pr.scale, pr.softcap);

  float o[DVT][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units, already scaled
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums (quad-reduced at end)
  uint32_t qf[D / 16][4];                     // this warp's Q rows as A fragments

  if (keys.first < keys.last) {
    load_tile_async<T, D, BM>(sQ, q, p.q_stride.seq, m0, sq);
    load_tile_async<T, D, BN>(sK, k, p.k_stride.seq, keys.first * BN, sk);
    cp_async_commit();
  }

  for (index_t it = keys.first; it < keys.last; ++it) {
    const index_t n0 = it * BN;
    cp_async_wait_all();
    __syncthreads();  // K_it (and Q) landed; every warp is done with V_{it-1}
    if (it == keys.first) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_a<T, PITCH>(qf[kk], sQ, 16 * warp, 16 * kk);
    }
    load_tile_async<T, Dv, BN>(sV, v, p.v_stride.seq, n0, sk);
    cp_async_commit();

    // S = Q K^T for this warp's 16 rows.
    float s[NT][4];
    zero(s);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t bf[4];
        ldsm_b_nmajor<T, PITCH>(bf, sK, 16 * nn, 16 * kk);
        mma<T>(s[2 * nn], qf[kk], bf[0], bf[1]);
        mma<T>(s[2 * nn + 1], qf[kk], bf[2], bf[3]);
      }
    }

    if (score.cap_in != 0.f) {  // softcap, before the mask (which must win: tanh(-inf) = -1)
      float slope;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = score.raw(s[j][e], slope);
    }
    if (classify_tile(m0, BM, n0, BN, sq, sk, pc.band) != kFull) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const index_t row = m0 + 16 * warp + g + 8 * (e / 2);
          const index_t col = n0 + 8 * j + 2 * t + (e % 2);
          // Rows >= Sq are never written; keys are bounds-checked here.
          if (col >= sk || !in_band(row, col, pc.band)) s[j][e] = -INFINITY;
        }
    }

    // Online softmax. r = 0: row g, r = 1: row g + 8.
    const float scale_log2 = score.mul;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(mx) * scale_log2);
      // A row that has seen nothing yet keeps max -inf; shift by 0 so exp2(-inf) = 0.
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[r] - shift);  // 0 when row_max was -inf
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = exp2f(fmaf(s[j][e], scale_log2, -shift));
          sum += s[j][e];
        }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int d = 0; d < DVT; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_it landed; every warp is done with K_it
    if (it + 1 < keys.last) {
      load_tile_async<T, D, BN>(sK, k, p.k_stride.seq, n0 + BN, sk);
      cp_async_commit();
    }

    // O += P V.
    uint32_t pf[NT / 2][4];
    acc_to_a<T, NT>(pf, s);
    gemm_rega_kmajor_b<T, PITCH_V, NT / 2, DVT>(o, pf, sV);
  }

  // ---- epilogue ----------------------------------------------------------------------------
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t row_in_piece = m0 + 16 * warp + g + 8 * r;
    store_fwd_row<T, Dv>(p, b, h, t, pc.q0 + row_in_piece, row_in_piece < sq, row_max[r],
                         row_sum[r], [&](int d, int j) { return o[d][2 * r + j]; });
  }
}

template <typename T, int D, int Dv>
cudaError_t launch_fwd_kernel(const FwdParams& p, cudaStream_t stream) {
  FwdParams lp = p;
  assign_tiles(lp.prob, fwd_block_m(D, Dv), fwd_block_n(D, Dv));
  const LaunchConfig cfg = fwd_launch_config(lp.prob, int(sizeof(T)));
  auto kernel = fwd_kernel<T, D, Dv>;
  const cudaError_t err = allow_dynamic_smem<fwd_kernel<T, D, Dv>>(cfg.smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(cfg.grid_x), unsigned(cfg.grid_y), unsigned(cfg.grid_z));
  DISTATTN_LAUNCH(kernel, grid, cfg.threads, cfg.smem_bytes, stream, lp);
  return cudaGetLastError();
}

}  // namespace kern
}  // namespace distattn
