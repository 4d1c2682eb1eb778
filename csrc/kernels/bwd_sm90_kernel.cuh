// Hopper (sm_90a) dK/dV kernel: the contract of bwd_kv_kernel (bwd_kernel.cuh: same BwdParams,
// pieces/bands, softcap slope, GQA groups, plain or accumulating epilogue), with warp
// specialisation, TMA, mbarriers and wgmma. The delta and dQ kernels stay bwd_kernel.cuh's.
//
// CTA = 3 warpgroups (384 threads) per (key tile of 128 keys of a piece, kv head, batch):
//   warpgroup 0  producer, setmaxnreg.dec to 32.
//                thread 0: K and V of the key tile once by TMA (one barrier, kv_full), then
//                  Q_i and dO_i (BM query rows: 64 at hd64, 32 at hd128) of every work item
//                  i = (q head of the group, query tile that sees the key tile: tiling.h's
//                  range) into a kStages ring of 128-byte-swizzled buffers, refilling stage s
//                  after empty[s].
//                warp 1: lse (as lse_for_exp2, +inf for rows past the piece) and delta of the
//                  item's BM rows into the stage with plain stores, then arrives on full[s]
//                  (full[s] = 1 expect-tx arrival + 32 arrivals + the TMA bytes).
//   warpgroups 1, 2  consumers, setmaxnreg.inc to 240, each owning 64 of the 128 keys:
//                S^T = K Q^T and dP^T = V dO^T by wgmma SS (m64nBMk16, all K-major), then in
//                registers bwd_kv_kernel's guards: softcap (raw score and slope), key bound and
//                band mask, P^T = exp2(S^T*scale - lse), dS^T = P^T (dP^T - delta) slope;
//                P^T and dS^T are packed in place into A fragments, and dV += P^T dO,
//                dK += dS^T Q run as wgmma RS (m64nDk16, dO and Q MN-major in the same stage).
//                Then every consumer thread arrives on empty[s].
//   No ping-pong between the consumers (they share every stage); the dK/dV accumulators
//   (D/2 + Dv/2 floats a thread) stay in registers until the epilogue (bwd_kv_kernel's).
// Shared memory (1024-aligned, 128-byte swizzle, K-major atoms of 8 rows x 64 elements):
//   K [D/64][128][64]  V [Dv/64][128][64]  Q [kStages][D/64][BM][64]  dO [kStages][Dv/64][BM][64]
//   lse, delta [kStages][BM] floats, then the mbarriers.
// Rows of a neighbouring piece inside a tile are read by TMA (their probabilities are 0): as in
// the Hopper forward, a non-finite value there would reach dK/dV as 0 * inf = NaN.
//
// Compiled only for sm_90a. NOTHING of this has run on a GPU: it is verified on the CTA
// emulator's sm_90a models and compiled with ptxas (docs/KERNELS.md).
#pragma once

#include "bwd_kernel.cuh"
#include "fwd_sm90_kernel.cuh"

namespace distattn {
namespace kern {

namespace sm90bwd {
constexpr int kConsumers = 2;  // consumer warpgroups, 64 keys each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kBlockN = 64 * kConsumers;  // keys of a CTA
// Query rows of a stage: 64 at hd64; 32 at hd128, where the consumer's dK and dV accumulators
// (128 floats a thread) plus 64-row S^T and dP^T (64 more) spilled at 240 registers.
DA_HD constexpr int block_m(int d) { return d > 64 ? 32 : 64; }
constexpr int kStages = 2;
// The producer's TMA loop spills at the forward's 24 registers (two loaders, 64-bit row
// arithmetic): 32 + 2 * 240 = 512.
constexpr int kProducerRegs = 32, kConsumerRegs = 240;
static_assert(kProducerRegs + kConsumers * kConsumerRegs <= 512, "setmaxnreg budget");

// Hides a loop-invariant shared address from the compiler, so that the wgmma descriptors built
// from it are recomputed in each iteration (a few integer adds) instead of being hoisted and
// kept live across the loop (2 * D / 16 64-bit values: the hd128 consumer spilled them).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
#if !defined(DISTATTN_EMULATE)
  asm volatile("" : "+r"(x));
#endif
  return x;
}

DA_HD constexpr int smem_bytes(int d, int dv, int elem) {
  return 1024 + elem * (kBlockN * (d + dv) + kStages * block_m(d) * (d + dv)) +
         4 * 2 * kStages * block_m(d) + 8 * (1 + 2 * kStages);
}

// S^T, dP^T: 64 keys x BM queries, both operands K-major.
template <typename T, int N>
struct GemmSS;
#define DISTATTN_GMMA_SS(T, N, NAME)                                                   \
  template <>                                                                          \
  struct GemmSS<T, N> {                                                                \
    using type = cute::SM90::GMMA::MMA_64x##N##x16_F32##NAME##_SS<                     \
        cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;                       \
  };
DISTATTN_GMMA_SS(__nv_bfloat16, 32, BF16BF16)
DISTATTN_GMMA_SS(__nv_bfloat16, 64, BF16BF16)
DISTATTN_GMMA_SS(__half, 32, F16F16)
DISTATTN_GMMA_SS(__half, 64, F16F16)
#undef DISTATTN_GMMA_SS
}  // namespace sm90bwd

struct BwdSm90Args {
  BwdParams p;
  cute::TmaDescriptor tma_q, tma_k, tma_v, tma_do;
};

template <typename T, int D, int Dv>
__global__ void __launch_bounds__(sm90bwd::kThreads, 1)
    bwd_kv_sm90_kernel(const __grid_constant__ BwdSm90Args args) {
#if DISTATTN_SM90_BODY
  using namespace sm90bwd;
  constexpr int BM = block_m(D), BN = kBlockN;
  static_assert(D == Dv && (D == 64 || D == 128), "head dims");
  using GemmS = typename GemmSS<T, BM>::type;     // S^T, dP^T: 64 keys x BM queries
  using GemmK = typename sm90::Gmma<T, D>::RS;    // dK: 64 keys x D
  using GemmV = typename sm90::Gmma<T, Dv>::RS;   // dV: 64 keys x Dv

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = uint32_t(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (1024 - raw_addr % 1024) % 1024;
  T* sK = reinterpret_cast<T*>(smem);   // [D/64][BN][64]
  T* sV = sK + BN * D;                  // [Dv/64][BN][64]
  T* sQ = sV + BN * Dv;                 // [kStages][D/64][BM][64]
  T* sdO = sQ + kStages * BM * D;       // [kStages][Dv/64][BM][64]
  float* sLse = reinterpret_cast<float*>(sdO + kStages * BM * Dv);  // [kStages][BM]
  float* sDelta = sLse + kStages * BM;                              // [kStages][BM]
  uint64_t* bars = reinterpret_cast<uint64_t*>(sDelta + kStages * BM);
  uint64_t& kv_full = bars[0];
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;

  const BwdParams& p = args.p;
  const Problem& pr = p.prob;
  const PieceParams pc = piece_of_tile(pr, int(blockIdx.x), true);
  const index_t sq = pc.seqlen_q, sk = pc.seqlen_k;
  const index_t n0 = index_t(int(blockIdx.x) - pc.k_tile_begin) * BN;  // keys of the piece
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = pr.heads_q / pr.heads_kv;
  const TileRange range = query_tiles_for_key_tile(n0, BN, BM, sq, sk, pc.band);
  const int tiles = int(range.last - range.first);
  const int items = range.first < range.last ? group * tiles : 0;
  const int wg = int(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    cute::initialize_barrier(kv_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      cute::initialize_barrier(full[s], 1 + 32);
      cute::initialize_barrier(empty[s], kConsumers * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----------------------------------------------------------------------------
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0 && items > 0) {
      const int krow = int(pc.k0 + n0);
      cute::set_barrier_transaction_bytes(kv_full, uint32_t(BN * (D + Dv) * sizeof(T)));
#pragma unroll
      for (int kb = 0; kb < D / 64; ++kb)
        cute::SM90_TMA_LOAD_4D::copy(&args.tma_k, &kv_full, sm90::kEvictNormal,
                                     sK + kb * BN * 64, 64 * kb, hk, krow, b);
#pragma unroll
      for (int kb = 0; kb < Dv / 64; ++kb)
        cute::SM90_TMA_LOAD_4D::copy(&args.tma_v, &kv_full, sm90::kEvictNormal,
                                     sV + kb * BN * 64, 64 * kb, hk, krow, b);
      for (int i = 0; i < items; ++i) {
        const int s = i % kStages, round = i / kStages;
        if (round > 0) cute::wait_barrier(empty[s], (round - 1) & 1);
        const int h = hk * group + i / tiles;
        const int row = int(pc.q0 + (range.first + i % tiles) * BM);
        cute::set_barrier_transaction_bytes(full[s], uint32_t(BM * (D + Dv) * sizeof(T)));
#pragma unroll
        for (int kb = 0; kb < D / 64; ++kb)
          cute::SM90_TMA_LOAD_4D::copy(&args.tma_q, &full[s], sm90::kEvictNormal,
                                       sQ + (s * (D / 64) + kb) * BM * 64, 64 * kb, h, row, b);
#pragma unroll
        for (int kb = 0; kb < Dv / 64; ++kb)
          cute::SM90_TMA_LOAD_4D::copy(&args.tma_do, &full[s], sm90::kEvictNormal,
                                       sdO + (s * (Dv / 64) + kb) * BM * 64, 64 * kb, h, row, b);
      }
    } else if (threadIdx.x / 32 == 1 && items > 0) {
      const int lane = int(threadIdx.x) % 32;
      for (int i = 0; i < items; ++i) {
        const int s = i % kStages, round = i / kStages;
        if (round > 0) cute::wait_barrier(empty[s], (round - 1) & 1);
        const int h = hk * group + i / tiles;
        const index_t m0 = (range.first + i % tiles) * BM;
#pragma unroll
        for (int r = 0; r < BM / 32; ++r) {  // BM is 32 or 64
          const index_t row = m0 + 32 * r + lane;  // of the piece
          const bool in_bounds = row < sq;
          const index_t grow = pc.q0 + row;
          sLse[s * BM + 32 * r + lane] =
              in_bounds ? lse_for_exp2(p.lse[b * p.lse_stride.batch + h * p.lse_stride.head +
                                             grow * p.lse_stride.seq])
                        : INFINITY;
          sDelta[s * BM + 32 * r + lane] =
              in_bounds ? p.delta[(index_t(b) * pr.heads_q + h) * pr.seqlen_q + grow] : 0.f;
        }
        cute::arrive_barrier(full[s]);  // release: the stores above are seen after the wait
      }
    }
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int c = wg - 1;
  const int warp = (int(threadIdx.x) % 128) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const index_t n_wg = n0 + 64 * c;  // this warpgroup's first key (of the piece)
  const ScoreScale score(pr.scale, pr.softcap);
  const uint32_t k_addr0 = uint32_t(__cvta_generic_to_shared(sK)) + uint32_t(c * 64 * 128);
  const uint32_t v_addr0 = uint32_t(__cvta_generic_to_shared(sV)) + uint32_t(c * 64 * 128);
  const uint32_t q_addr0 = uint32_t(__cvta_generic_to_shared(sQ));
  const uint32_t do_addr0 = uint32_t(__cvta_generic_to_shared(sdO));

  // accumulators: value v = 4p + 2h + j at key row g + 8h (of the warp's 16), column 8p + 2t + j
  float dk[D / 2], dv[Dv / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = 0.f;
#pragma unroll
  for (int i = 0; i < Dv / 2; ++i) dv[i] = 0.f;

  if (items > 0) cute::wait_barrier(kv_full, 0);
  for (int i = 0; i < items; ++i) {
    const int s = i % kStages, round = i / kStages;
    const index_t m0 = (range.first + i % tiles) * BM;
    const uint32_t q_addr = opaque(q_addr0) + uint32_t(s * BM * D * sizeof(T));
    const uint32_t do_addr = opaque(do_addr0) + uint32_t(s * BM * Dv * sizeof(T));
    const uint32_t k_addr = opaque(k_addr0), v_addr = opaque(v_addr0);
    const float* lse = sLse + s * BM;
    const float* delta = sDelta + s * BM;

    // S^T = K Q^T and dP^T = V dO^T (64 keys x BM queries per warpgroup).
    float st[BM / 2], dpt[BM / 2];
    cute::wait_barrier(full[s], round & 1);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t kbyte = uint32_t((kk % 4) * 32);  // 16 k values = 32 B into the row
      const uint64_t da = sm90::desc_sw128(k_addr + uint32_t((kk / 4) * BN * 128) + kbyte, 16, 1024);
      const uint64_t db = sm90::desc_sw128(q_addr + uint32_t((kk / 4) * BM * 128) + kbyte, 16, 1024);
      sm90::ss<GemmS>(da, db, st, kk > 0, std::make_index_sequence<BM / 2>{});
    }
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk) {
      const uint32_t kbyte = uint32_t((kk % 4) * 32);
      const uint64_t da = sm90::desc_sw128(v_addr + uint32_t((kk / 4) * BN * 128) + kbyte, 16, 1024);
      const uint64_t db = sm90::desc_sw128(do_addr + uint32_t((kk / 4) * BM * 128) + kbyte, 16, 1024);
      sm90::ss<GemmS>(da, db, dpt, kk > 0, std::make_index_sequence<BM / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    sm90::fence_operands(st);
    sm90::fence_operands(dpt);

    // P^T, dS^T (bwd_kv_kernel's guards; rows past the piece have lse = +inf, so P = 0). The
    // key bound and band become, per key row h of this thread, an interval [qlo, qhi] of
    // visible query columns of the tile (32-bit compares instead of 64-bit index math).
    const bool partial = classify_tile(m0, BM, n0, BN, sq, sk, pc.band) != kFull;
    int qlo[2] = {0, 0}, qhi[2] = {BM, BM};
    if (partial) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const index_t key = n_wg + 16 * warp + g + 8 * h, rel = key - m0;
        qhi[h] = key < sk ? int(imin(imax(rel - pc.band.lo, index_t(-1)), index_t(BM))) : -1;
        qlo[h] = int(imin(imax(rel - pc.band.hi, index_t(0)), index_t(BM)));
      }
    }
#pragma unroll
    for (int pp = 0; pp < BM / 8; ++pp) {
      const int qc0 = 8 * pp + 2 * t;  // query columns qc0, qc0 + 1 of the tile
      const float2 l2 = *reinterpret_cast<const float2*>(lse + qc0);
      const float2 d2 = *reinterpret_cast<const float2*>(delta + qc0);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int v = 4 * pp + 2 * h + j, qc = qc0 + j;
          float slope;
          float x = score.raw(st[v], slope);
          if (qc < qlo[h] || qc > qhi[h]) x = -INFINITY;
          const float prob = exp2f(fmaf(x, score.mul, -(j ? l2.y : l2.x)));
          st[v] = prob;
          dpt[v] = prob * (dpt[v] - (j ? d2.y : d2.x)) * slope;
        }
    }
    // -> A operand registers: k-slice ks (queries 16ks .. 16ks + 15) is values 8ks .. 8ks + 7.
    uint32_t pf[BM / 16][4], dsf[BM / 16][4];
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks)
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        pf[ks][rr] = Elem<T>::pack(st[8 * ks + 2 * rr], st[8 * ks + 2 * rr + 1]);
        dsf[ks][rr] = Elem<T>::pack(dpt[8 * ks + 2 * rr], dpt[8 * ks + 2 * rr + 1]);
      }

    // dV += P^T dO, dK += dS^T Q; dO and Q are MN-major here: 8-query groups 1024 B apart
    // (SBO), 64-column blocks BM*128 B apart (LBO).
    sm90::fence_operands(dv);
    sm90::fence_operands(dk);
    cute::warpgroup_arrive();
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      const uint64_t db = sm90::desc_sw128(do_addr + uint32_t(ks * 2048), uint32_t(BM * 128), 1024);
      sm90::rs<GemmV>(pf[ks], db, dv, std::make_index_sequence<Dv / 2>{});
    }
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      const uint64_t db = sm90::desc_sw128(q_addr + uint32_t(ks * 2048), uint32_t(BM * 128), 1024);
      sm90::rs<GemmK>(dsf[ks], db, dk, std::make_index_sequence<D / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    sm90::fence_operands(dv);
    sm90::fence_operands(dk);
    cute::arrive_barrier(empty[s]);  // this thread is done with stage s
  }

  // ---- epilogue (bwd_kv_kernel's): zeros when the tile saw no query (plain mode) ----------
  if (p.accumulate && items == 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t key_in_piece = n_wg + 16 * warp + g + 8 * r;
    if (key_in_piece >= sk) continue;
    store_dkdv_row<D, Dv>(p, b, hk, t, pc.k0 + key_in_piece,
                          [&](int d, int j) { return dk[4 * d + 2 * r + j]; },
                          [&](int d, int j) { return dv[4 * d + 2 * r + j]; });
  }
#endif  // DISTATTN_SM90_BODY
}

// ---- host side ---------------------------------------------------------------------------------
// Whether this build and device run the Hopper dK/dV kernel (sm90_kernel_available's rule,
// DISTATTN_DISABLE_SM90=1 included). UNVERIFIED on CUDA: no GPU has run this path.
template <typename T, int D, int Dv>
inline bool bwd_sm90_available() {
  return sm90_kernel_available<bwd_kv_sm90_kernel<T, D, Dv>>();
}

// The whole backward with the Hopper dK/dV kernel: delta, bwd_q_kernel (dQ), then dK/dV (last,
// so that the emulator's last_kernel() names it). *ran = false and nothing launched when the
// Hopper kernel is not available or a tensor does not qualify for TMA.
template <typename T, int D, int Dv>
cudaError_t launch_bwd_sm90_kernels(const BwdParams& p, cudaStream_t stream, bool* ran) {
  *ran = false;
  if (!bwd_sm90_available<T, D, Dv>()) return cudaSuccess;
  BwdSm90Args a;
  a.p = p;
  Problem& pr = a.p.prob;
  if (!make_tma_4d<T>(&a.tma_q, p.q, p.q_stride, pr.seqlen_q, pr.heads_q, pr.batch, D,
                      sm90bwd::block_m(D)) ||
      !make_tma_4d<T>(&a.tma_do, p.dout, p.dout_stride, pr.seqlen_q, pr.heads_q, pr.batch, Dv,
                      sm90bwd::block_m(D)) ||
      !make_tma_4d<T>(&a.tma_k, p.k, p.k_stride, pr.seqlen_k, pr.heads_kv, pr.batch, D,
                      sm90bwd::kBlockN) ||
      !make_tma_4d<T>(&a.tma_v, p.v, p.v_stride, pr.seqlen_k, pr.heads_kv, pr.batch, Dv,
                      sm90bwd::kBlockN))
    return cudaSuccess;
  *ran = true;
  cudaError_t err = launch_delta_and_dq<T, D, Dv>(p, stream);
  if (err != cudaSuccess) return err;
  assign_tiles(pr, sm90bwd::block_m(D), sm90bwd::kBlockN);
  const int smem = sm90bwd::smem_bytes(D, Dv, int(sizeof(T)));
  auto kernel = bwd_kv_sm90_kernel<T, D, Dv>;
#if defined(DISTATTN_EMULATE)
  emu::allow_sm90_smem(reinterpret_cast<const void*>(kernel));
#endif
  err = allow_dynamic_smem<bwd_kv_sm90_kernel<T, D, Dv>>(smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(total_tiles(pr, sm90bwd::kBlockN, true)), unsigned(pr.heads_kv),
                  unsigned(pr.batch));
  DISTATTN_LAUNCH(kernel, grid, sm90bwd::kThreads, smem, stream, a);
  return cudaGetLastError();
}

}  // namespace kern
}  // namespace distattn
