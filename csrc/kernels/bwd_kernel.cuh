// Backward of block attention, deterministic (no atomics), in three kernels:
//
// 1. delta_kernel  delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]   (float32)
// 2. bwd_kv_kernel CTA = (key tile of a piece, kv head, batch), 4 warps x 16 key rows. It
//                  loops over the
//                  Hq/Hkv query heads of its group and over the query tiles that see its keys,
//                  and keeps dK, dV for its rows in registers:
//                    S^T = K Q^T, P^T = exp(S^T*scale - lse), dP^T = V dO^T,
//                    dS^T = P^T * (dP^T - delta), dV += P^T dO, dK += dS^T Q
//                  Computing the transposed tiles directly keeps P^T and dS^T in registers
//                  as the A operand of the next MMA (no shared-memory transpose).
// 3. bwd_q_kernel  CTA = (query tile of a piece, q head, batch), 4 warps x 16 query rows, loops
//                  over key tiles: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
// The pieces of a launch (params.h) have disjoint query rows and disjoint keys, so each
// gradient row still has one owner. With softcap, dS is multiplied by the cap's slope
// 1 - tanh^2 (ScoreScale in mma.cuh).
// Every gradient row is owned by exactly one CTA, which adds (or writes) it once with plain
// loads and stores, so results are bitwise reproducible. The price is recomputing S and dP
// in kernel 3 (7 instead of 5 GEMMs); an atomic-dQ variant is future work (docs/KERNELS.md).
//
// D is q/k's head dim (S, dQ, dK), Dv v's, out's and dO's (dP = dO V^T, dV); they differ for
// MLA.
// `lse` is the final lse of the queries. Rows with lse = -inf (they see nothing anywhere)
// and out-of-bounds query rows get probability exactly 0: their lse is replaced by +inf.
#pragma once

#include "mma.cuh"

namespace distattn {
namespace kern {

// ---- 1. delta = rowsum(dO * O) ---------------------------------------------------------------
template <typename T, typename TO>
__global__ void __launch_bounds__(kRowKernelThreads) delta_kernel(const BwdParams p) {
  const Problem& pr = p.prob;
  const int lane = threadIdx.x % 32;
  const index_t idx = index_t(blockIdx.x) * (kRowKernelThreads / 32) + threadIdx.x / 32;
  const index_t rows = index_t(pr.batch) * pr.heads_q * pr.seqlen_q;
  if (idx >= rows) return;
  const index_t i = idx % pr.seqlen_q;
  const index_t h = (idx / pr.seqlen_q) % pr.heads_q;
  const index_t b = idx / (index_t(pr.seqlen_q) * pr.heads_q);
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride.batch +
                  i * p.dout_stride.seq + h * p.dout_stride.head;
  const TO* out = static_cast<const TO*>(p.out) + b * p.out_stride.batch +
                  i * p.out_stride.seq + h * p.out_stride.head;
  float acc = 0.f;
  for (int d = lane; d < pr.head_dim_v; d += 32) acc += load_as_float(dout + d) * load_as_float(out + d);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[idx] = acc;  // [B, Hq, Sq] contiguous: idx = (b*Hq + h)*Sq + i
}

// Write or add a float accumulator row pair (float2) into a float32 gradient.
__device__ __forceinline__ void store_grad(float* dst, float x, float y, bool accumulate) {
  float2* d2 = reinterpret_cast<float2*>(dst);
  if (accumulate) {
    float2 cur = *d2;
    cur.x += x;
    cur.y += y;
    *d2 = cur;
  } else {
    *d2 = make_float2(x, y);
  }
}

// lse (as lse_for_exp2) and delta of query row `row` (of piece pc, q head h): the per-row inputs
// of P and dS, for the Hopper backward kernels (bwd_sm90_kernel.cuh). A row at or past the
// piece's end gets lse = +inf (probability exactly 0) and delta 0. The mma.sync kernels keep
// their own copy of these loads, because this call changed ptxas's allocation there (measured,
// nvcc 13.0): in bwd_kv_kernel's query-tile loop the MLA (192, 128) sm_80 build spilled 16 bytes
// at 255 registers; in bwd_q_kernel hd64 went from 128 to 168 registers on sm_90a (158 to 167 on
// sm_80), which costs the sm_90a fallback a CTA per SM.
__device__ __forceinline__ void load_row_stats(const BwdParams& p, const PieceParams& pc, int b,
                                               int h, index_t row, float& lse, float& delta) {
  const bool in_bounds = row < pc.seqlen_q;
  const index_t grow = pc.q0 + row;  // in the call's tensors
  lse = in_bounds ? lse_for_exp2(p.lse[b * p.lse_stride.batch + h * p.lse_stride.head +
                                       grow * p.lse_stride.seq])
                  : INFINITY;
  delta = in_bounds ? p.delta[(index_t(b) * p.prob.heads_q + h) * p.prob.seqlen_q + grow] : 0.f;
}

// P and dS of one score, the elementwise step of every backward kernel: `acc` = q.k, `dp` =
// dO.v, `lse` and `delta` the row's (load_row_stats). Softcap before the mask (which must win:
// tanh(-inf) = -1); a `hidden` score (band, key bound) gets probability exactly 0. Sets `prob`
// and returns dS = P (dP - delta) slope (unscaled: the epilogues multiply by scale).
__device__ __forceinline__ float grad_of_score(const ScoreScale& score, float acc, float dp,
                                               bool hidden, float lse, float delta,
                                               float& prob) {
  float slope;
  float x = score.raw(acc, slope);
  if (hidden) x = -INFINITY;
  prob = exp2f(fmaf(x, score.mul, -lse));
  return prob * (dp - delta) * slope;
}

// One query row of dQ (scaled), held by a quad of lanes (lane t: columns 8d + 2t and 8d + 2t + 1,
// ``dq(d, j)``), written or added into the float32 accumulator: the dQ epilogue of
// bwd_q_kernel and of the Hopper bwd_q_sm90_kernel.
template <int D, typename DQ>
__device__ __forceinline__ void store_dq_row(const BwdParams& p, int b, int h, int t, index_t row,
                                             DQ dq) {
  float* dq_row = p.dq_acc + b * p.dq_stride.batch + row * p.dq_stride.seq + h * p.dq_stride.head;
#pragma unroll
  for (int d = 0; d < D / 8; ++d)
    store_grad(dq_row + 8 * d + 2 * t, dq(d, 0) * p.prob.scale, dq(d, 1) * p.prob.scale,
               p.accumulate);
}

// One key row of dK (scaled) and dV, held by a quad of lanes (lane t: columns 8d + 2t and
// 8d + 2t + 1, ``dk(d, j)`` / ``dv(d, j)``), written or added into the float32 accumulators:
// the dK/dV epilogue of bwd_kv_kernel and of the Hopper bwd_kv_sm90_kernel.
template <int D, int Dv, typename DK, typename DV>
__device__ __forceinline__ void store_dkdv_row(const BwdParams& p, int b, int hk, int t,
                                               index_t key, DK dk, DV dv) {
  float* dk_row = p.dk_acc + b * p.dk_stride.batch + key * p.dk_stride.seq + hk * p.dk_stride.head;
  float* dv_row = p.dv_acc + b * p.dv_stride.batch + key * p.dv_stride.seq + hk * p.dv_stride.head;
#pragma unroll
  for (int d = 0; d < D / 8; ++d)
    store_grad(dk_row + 8 * d + 2 * t, dk(d, 0) * p.prob.scale, dk(d, 1) * p.prob.scale,
               p.accumulate);
#pragma unroll
  for (int d = 0; d < Dv / 8; ++d)
    store_grad(dv_row + 8 * d + 2 * t, dv(d, 0), dv(d, 1), p.accumulate);
}

// ---- 2. dK, dV -------------------------------------------------------------------------------
template <typename T, int D, int Dv>
__global__ void __launch_bounds__(kThreads) bwd_kv_kernel(const BwdParams p) {
  constexpr int BN = bwd_kv_block_n(D, Dv), BM = bwd_kv_block_m(D, Dv);
  constexpr int PITCH = smem_pitch(D), PITCH_V = smem_pitch(Dv);
  static_assert(D % 16 == 0 && Dv % 16 == 0 && BM % 16 == 0 && BN == 16 * kWarps,
                "tile shape");
  constexpr int MT = BM / 8;  // 8-column (query) tiles of S^T
  constexpr int DT = D / 8;   // 8-column tiles of dK
  constexpr int DVT = Dv / 8; // 8-column tiles of dV

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][PITCH]
  T* sV = sK + BN * PITCH;                 // [BN][PITCH_V]
  T* sQ = sV + BN * PITCH_V;               // [BM][PITCH]
  T* sdO = sQ + BM * PITCH;                // [BM][PITCH_V]
  float* sLse = reinterpret_cast<float*>(sdO + BM * PITCH_V);  // log2 units, +inf = "P is 0"
  float* sDelta = sLse + BM;

  const Problem& pr = p.prob;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const PieceParams pc = piece_of_tile(pr, int(blockIdx.x), true);
  const index_t sq = pc.seqlen_q, sk = pc.seqlen_k;
  const index_t n0 = index_t(int(blockIdx.x) - pc.k_tile_begin) * BN;  // keys of the piece
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = pr.heads_q / pr.heads_kv;
  const ScoreScale score(pr.scale, pr.softcap);
  const TileRange range = query_tiles_for_key_tile(n0, BN, BM, sq, sk, pc.band);

  float dk[DT][4], dv[DVT][4];
  zero(dk);
  zero(dv);

  if (range.first < range.last) {
    const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head +
                 pc.k0 * p.k_stride.seq;
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head +
                 pc.k0 * p.v_stride.seq;
    load_tile_async<T, D, BN>(sK, k, p.k_stride.seq, n0, sk);
    load_tile_async<T, Dv, BN>(sV, v, p.v_stride.seq, n0, sk);
    cp_async_commit();

    for (int gi = 0; gi < group; ++gi) {
      const int h = hk * group + gi;
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
                   pc.q0 * p.q_stride.seq;
      const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride.batch +
                      h * p.dout_stride.head + pc.q0 * p.dout_stride.seq;
      const float* lse =
          p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + pc.q0 * p.lse_stride.seq;
      const float* delta = p.delta + (index_t(b) * pr.heads_q + h) * pr.seqlen_q + pc.q0;

      for (index_t mt = range.first; mt < range.last; ++mt) {
        const index_t m0 = mt * BM;
        load_tile_async<T, D, BM>(sQ, q, p.q_stride.seq, m0, sq);
        load_tile_async<T, Dv, BM>(sdO, dout, p.dout_stride.seq, m0, sq);
        cp_async_commit();
        if (threadIdx.x < BM) {
          const index_t row = m0 + threadIdx.x;
          const bool in_bounds = row < sq;
          st_shared(sLse + threadIdx.x,
                    in_bounds ? lse_for_exp2(lse[row * p.lse_stride.seq]) : INFINITY);
          st_shared(sDelta + threadIdx.x, in_bounds ? delta[row] : 0.f);
        }
        cp_async_wait_all();
        __syncthreads();  // K, V, Q, dO, lse, delta are in shared memory

        float st[MT][4], dpt[MT][4];  // S^T and dP^T: rows = this warp's 16 keys, cols = queries
        zero(st);
        zero(dpt);
        gemm_smem_a_nmajor_b<T, PITCH, D, MT>(st, sK, 16 * warp, sQ);
        gemm_smem_a_nmajor_b<T, PITCH_V, Dv, MT>(dpt, sV, 16 * warp, sdO);

        const bool partial = classify_tile(m0, BM, n0, BN, sq, sk, pc.band) != kFull;
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qc = 8 * j + 2 * t + (e % 2);  // query column within the tile
            const index_t key = n0 + 16 * warp + g + 8 * (e / 2);
            const index_t query = m0 + qc;
            // Out-of-bounds queries already have sLse = +inf; bound keys and apply the band.
            float prob;
            dpt[j][e] = grad_of_score(score, st[j][e], dpt[j][e],
                                      partial && (key >= sk || !in_band(query, key, pc.band)),
                                      ld_shared(sLse + qc), ld_shared(sDelta + qc), prob);
            st[j][e] = prob;
          }

        uint32_t pf[MT / 2][4], dsf[MT / 2][4];
        acc_to_a<T, MT>(pf, st);
        acc_to_a<T, MT>(dsf, dpt);
        gemm_rega_kmajor_b<T, PITCH_V, MT / 2, DVT>(dv, pf, sdO);  // dV += P^T dO
        gemm_rega_kmajor_b<T, PITCH, MT / 2, DT>(dk, dsf, sQ);  // dK += dS^T Q
        __syncthreads();  // every warp is done with Q, dO before the next tile overwrites them
      }
    }
  }

  // ---- epilogue: rows of this warp; zeros when the tile saw no query (plain mode) --------
  if (p.accumulate && range.first >= range.last) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t key_in_piece = n0 + 16 * warp + g + 8 * r;
    if (key_in_piece >= sk) continue;
    store_dkdv_row<D, Dv>(p, b, hk, t, pc.k0 + key_in_piece,
                          [&](int d, int j) { return dk[d][2 * r + j]; },
                          [&](int d, int j) { return dv[d][2 * r + j]; });
  }
}

// ---- 3. dQ -----------------------------------------------------------------------------------
template <typename T, int D, int Dv>
__global__ void __launch_bounds__(kThreads) bwd_q_kernel(const BwdParams p) {
  constexpr int BM = bwd_q_block_m(D, Dv), BN = bwd_q_block_n(D, Dv);
  constexpr int PITCH = smem_pitch(D), PITCH_V = smem_pitch(Dv);
  static_assert(D % 16 == 0 && Dv % 16 == 0 && BN % 16 == 0 && BM == 16 * kWarps,
                "tile shape");
  constexpr int NT = BN / 8;
  constexpr int DT = D / 8;  // 8-column tiles of dQ

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][PITCH]
  T* sdO = sQ + BM * PITCH;                // [BM][PITCH_V]
  T* sK = sdO + BM * PITCH_V;              // [BN][PITCH]
  T* sV = sK + BN * PITCH;                 // [BN][PITCH_V]

  const Problem& pr = p.prob;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // Heaviest (causal) tiles first; m0 in rows of the piece.
  const auto [pc, sq, sk, h, b, hk, m0, keys] = query_tile_of_cta<BM, BN>(pr);
  const ScoreScale score(pr.scale, pr.softcap);

  float row_lse[2], row_delta[2];  // rows g and g + 8 of this warp
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t row = pc.q0 + m0 + 16 * warp + g + 8 * r;  // in the call's tensors
    const bool in_bounds = m0 + 16 * warp + g + 8 * r < sq;
    row_lse[r] = in_bounds ? lse_for_exp2(p.lse[b * p.lse_stride.batch + h * p.lse_stride.head +
                                                row * p.lse_stride.seq])
                           : INFINITY;
    row_delta[r] = in_bounds ? p.delta[(index_t(b) * pr.heads_q + h) * pr.seqlen_q + row] : 0.f;
  }

  float dq[DT][4];
  zero(dq);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head +
               pc.k0 * p.k_stride.seq;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head +
               pc.k0 * p.v_stride.seq;
  if (keys.first < keys.last) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
                 pc.q0 * p.q_stride.seq;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride.batch +
                    h * p.dout_stride.head + pc.q0 * p.dout_stride.seq;
    load_tile_async<T, D, BM>(sQ, q, p.q_stride.seq, m0, sq);
    load_tile_async<T, Dv, BM>(sdO, dout, p.dout_stride.seq, m0, sq);
  }

  for (index_t it = keys.first; it < keys.last; ++it) {
    const index_t n0 = it * BN;
    load_tile_async<T, D, BN>(sK, k, p.k_stride.seq, n0, sk);
    load_tile_async<T, Dv, BN>(sV, v, p.v_stride.seq, n0, sk);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();  // Q, dO (first time) and K_it, V_it are in shared memory

    float s[NT][4], dp[NT][4];
    zero(s);
    zero(dp);
    gemm_smem_a_nmajor_b<T, PITCH, D, NT>(s, sQ, 16 * warp, sK);   // S = Q K^T
    gemm_smem_a_nmajor_b<T, PITCH_V, Dv, NT>(dp, sdO, 16 * warp, sV);  // dP = dO V^T

    const bool partial = classify_tile(m0, BM, n0, BN, sq, sk, pc.band) != kFull;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const index_t row = m0 + 16 * warp + g + 8 * r;
        const index_t col = n0 + 8 * j + 2 * t + (e % 2);
        float prob;
        s[j][e] = grad_of_score(score, s[j][e], dp[j][e],  // dS
                                partial && (col >= sk || !in_band(row, col, pc.band)),
                                row_lse[r], row_delta[r], prob);
      }

    uint32_t dsf[NT / 2][4];
    acc_to_a<T, NT>(dsf, s);
    gemm_rega_kmajor_b<T, PITCH, NT / 2, DT>(dq, dsf, sK);  // dQ += dS K
    __syncthreads();  // every warp is done with K, V before the next tile overwrites them
  }

  if (p.accumulate && keys.first >= keys.last) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t row_in_piece = m0 + 16 * warp + g + 8 * r;
    if (row_in_piece >= sq) continue;
    store_dq_row<D>(p, b, h, t, pc.q0 + row_in_piece,
                    [&](int d, int j) { return dq[d][2 * r + j]; });
  }
}

// ---- launcher --------------------------------------------------------------------------------
template <auto Kernel>
cudaError_t launch_tiled(const LaunchConfig& cfg, const BwdParams& p, cudaStream_t stream) {
  auto kernel = Kernel;
  const cudaError_t err = allow_dynamic_smem<Kernel>(cfg.smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(cfg.grid_x), unsigned(cfg.grid_y), unsigned(cfg.grid_z));
  DISTATTN_LAUNCH(kernel, grid, cfg.threads, cfg.smem_bytes, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_delta(const BwdParams& p, cudaStream_t stream) {
  const Problem& pr = p.prob;
  const LaunchConfig rows =
      row_launch_config(index_t(pr.batch) * pr.heads_q * pr.seqlen_q);
  auto delta_fn = p.out_is_fp32 ? delta_kernel<T, float> : delta_kernel<T, T>;
  DISTATTN_LAUNCH(delta_fn, unsigned(rows.grid_x), rows.threads, 0, stream, p);
  return cudaGetLastError();
}

template <typename T, int D, int Dv>
cudaError_t launch_bwd_kernels(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err = launch_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  // The dQ kernel's grid runs over query tiles, the dK/dV kernel's over key tiles.
  BwdParams lp = p;
  assign_tiles(lp.prob, bwd_q_block_m(D, Dv), bwd_kv_block_n(D, Dv));
  err = launch_tiled<bwd_kv_kernel<T, D, Dv>>(bwd_kv_launch_config(lp.prob, int(sizeof(T))),
                                              lp, stream);
  if (err != cudaSuccess) return err;
  return launch_tiled<bwd_q_kernel<T, D, Dv>>(bwd_q_launch_config(lp.prob, int(sizeof(T))),
                                              lp, stream);
}

}  // namespace kern
}  // namespace distattn
