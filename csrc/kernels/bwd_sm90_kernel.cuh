// The Hopper (sm_90a) backward: bwd_kv_sm90_kernel (dK/dV, the contract of bwd_kv_kernel) and
// bwd_q_sm90_kernel (dQ, the contract of bwd_q_kernel; below), both with bwd_kernel.cuh's
// BwdParams, pieces/bands, softcap slope, GQA groups, P/dS step (grad_of_score) and plain or
// accumulating epilogues (store_dkdv_row, store_dq_row), with warp specialisation, TMA,
// mbarriers and wgmma. The delta kernel stays bwd_kernel.cuh's.
//
// dK/dV kernel:
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
        for (int r = 0; r < BM / 32; ++r)  // BM is 32 or 64
          load_row_stats(p, pc, b, h, m0 + 32 * r + lane, sLse[s * BM + 32 * r + lane],
                         sDelta[s * BM + 32 * r + lane]);
        cute::arrive_barrier(full[s]);  // release: the stores above are seen after the wait
      }
    }
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  const auto [c, warp, lane, g, t] = sm90::enter_consumer<kConsumerRegs>(wg);
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
          float prob;
          dpt[v] = grad_of_score(score, st[v], dpt[v], qc < qlo[h] || qc > qhi[h],
                                 j ? l2.y : l2.x, j ? d2.y : d2.x, prob);
          st[v] = prob;
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

// ---- dQ ----------------------------------------------------------------------------------------
namespace sm90dq {
constexpr int kConsumers = 2;  // consumer warpgroups, 64 query rows each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kBlockM = 64 * kConsumers;  // query rows of a CTA
// Keys of a ring stage: 128 at hd64; 64 at hd128 (docs/KERNELS.md has ptxas's registers for
// both: a consumer thread keeps dQ (D/2 floats) and S, dP (BN/2 each) live at once).
DA_HD constexpr int block_n(int d) { return d > 64 ? 64 : 128; }
constexpr int kStages = 2;
// One TMA thread in the producer: 24 (the forward's) compiles without spills too; 32 is the
// dK/dV kernel's budget, and 32 + 2 * 240 = 512 uses the whole register file.
constexpr int kProducerRegs = 32, kConsumerRegs = 240;
static_assert(kProducerRegs + kConsumers * kConsumerRegs <= 512, "setmaxnreg budget");

DA_HD constexpr int smem_bytes(int d, int dv, int elem) {
  return 1024 + elem * (kBlockM * (d + dv) + kStages * block_n(d) * (d + dv)) +
         8 * (1 + 3 * kStages);
}
}  // namespace sm90dq

// CTA = 3 warpgroups per (query tile of 128 rows of a piece, q head, batch), bwd_q_kernel's
// contract (heaviest causal tiles first):
//   warpgroup 0  producer, setmaxnreg.dec to 24; thread 0 issues TMA: Q and dO of the tile once
//                (q_full), then K_j and V_j of every key tile the query tile sees into a
//                kStages ring (k_full / v_full apart, so that S_j starts before V_j lands),
//                refilling stage s after empty[s] (all 256 consumer threads arrived).
//   warpgroups 1, 2  consumers, setmaxnreg.inc to 240, each owning 64 query rows; lse and delta
//                of their two rows a thread in registers (plain loads, as bwd_q_kernel):
//                S = Q K^T and dP = dO V^T by wgmma SS (m64nBNk16, all K-major), P and dS in
//                registers (grad_of_score, bwd_q_kernel's guards), dS packed in place into A
//                fragments, dQ += dS K by wgmma RS (m64nDk16, K MN-major: the same stage's
//                buffer read along keys), then the stage is released.
// Shared memory (1024-aligned, 128-byte swizzle, K-major atoms of 8 rows x 64 elements):
//   Q [2 halves][D/64][64][64]  dO [2 halves][Dv/64][64][64]  K [kStages][D/64][BN][64]
//   V [kStages][Dv/64][BN][64], then the mbarriers.
// Keys of a neighbouring piece inside a tile are read (dS there is 0): as in the Hopper forward,
// a non-finite K value there would reach dQ as 0 * inf = NaN.
template <typename T, int D, int Dv>
__global__ void __launch_bounds__(sm90dq::kThreads, 1)
    bwd_q_sm90_kernel(const __grid_constant__ BwdSm90Args args) {
#if DISTATTN_SM90_BODY
  using namespace sm90dq;
  constexpr int BM = kBlockM, BN = block_n(D);
  static_assert(D == Dv && (D == 64 || D == 128), "head dims");
  using GemmS = typename sm90::Gmma<T, BN>::SS;  // S, dP: 64 rows x BN keys
  using GemmQ = typename sm90::Gmma<T, D>::RS;   // dQ: 64 rows x D, B (K) MN-major

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = uint32_t(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (1024 - raw_addr % 1024) % 1024;
  T* sQ = reinterpret_cast<T*>(smem);  // [kConsumers][D/64][64][64]
  T* sdO = sQ + BM * D;                // [kConsumers][Dv/64][64][64]
  T* sK = sdO + BM * Dv;               // [kStages][D/64][BN][64]
  T* sV = sK + kStages * BN * D;       // [kStages][Dv/64][BN][64]
  uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kStages * BN * Dv);

  const BwdParams& p = args.p;
  const Problem& pr = p.prob;
  // Heaviest (causal) tiles first; m0 in rows of the piece.
  const auto [pc, sq, sk, h, b, hk, m0, keys] = query_tile_of_cta<BM, BN>(pr);
  const int wg = int(threadIdx.x) / 128;
  const auto [q_full, k_full, v_full, empty] = sm90::init_kv_ring<kStages, kConsumers>(bars);

  if (wg == 0) {
    // ---- producer ----------------------------------------------------------------------------
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0 && keys.first < keys.last) {
      cute::set_barrier_transaction_bytes(q_full, uint32_t(BM * (D + Dv) * sizeof(T)));
#pragma unroll
      for (int c = 0; c < kConsumers; ++c) {
        const int row = int(pc.q0 + m0 + 64 * c);
#pragma unroll
        for (int kb = 0; kb < D / 64; ++kb)
          cute::SM90_TMA_LOAD_4D::copy(&args.tma_q, &q_full, sm90::kEvictNormal,
                                       sQ + (c * (D / 64) + kb) * 64 * 64, 64 * kb, h, row, b);
#pragma unroll
        for (int kb = 0; kb < Dv / 64; ++kb)
          cute::SM90_TMA_LOAD_4D::copy(&args.tma_do, &q_full, sm90::kEvictNormal,
                                       sdO + (c * (Dv / 64) + kb) * 64 * 64, 64 * kb, h, row, b);
      }
      sm90::load_kv_ring<T, D, Dv, BN, kStages>(&args.tma_k, &args.tma_v, sK, sV, k_full, v_full,
                                                 empty, keys, pc.k0, hk, b);
    }
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  const auto [c, warp, lane, g, t] = sm90::enter_consumer<kConsumerRegs>(wg);
  const index_t m_wg = m0 + 64 * c;  // this warpgroup's first row (of the piece)
  const ScoreScale score(pr.scale, pr.softcap);
  const uint32_t q_addr0 = uint32_t(__cvta_generic_to_shared(sQ)) + uint32_t(c * 64 * D * sizeof(T));
  const uint32_t do_addr0 =
      uint32_t(__cvta_generic_to_shared(sdO)) + uint32_t(c * 64 * Dv * sizeof(T));
  const uint32_t k_addr0 = uint32_t(__cvta_generic_to_shared(sK));
  const uint32_t v_addr0 = uint32_t(__cvta_generic_to_shared(sV));

  float row_lse[2], row_delta[2];  // rows g and g + 8 of this warp's 16
#pragma unroll
  for (int r = 0; r < 2; ++r)
    load_row_stats(p, pc, b, h, m_wg + 16 * warp + g + 8 * r, row_lse[r], row_delta[r]);

  float dq[D / 2];  // accumulator: value v = 4p + 2r + j at row g + 8r, column 8p + 2t + j
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;

  if (keys.first < keys.last) cute::wait_barrier(q_full, 0);
  for (index_t it = keys.first; it < keys.last; ++it) {
    const int i = int(it - keys.first), s = i % kStages, round = i / kStages;
    const index_t n0 = it * BN;
    const uint32_t k_addr = sm90bwd::opaque(k_addr0) + uint32_t(s * BN * D * sizeof(T));
    const uint32_t v_addr = sm90bwd::opaque(v_addr0) + uint32_t(s * BN * Dv * sizeof(T));
    const uint32_t q_addr = sm90bwd::opaque(q_addr0), do_addr = sm90bwd::opaque(do_addr0);

    // S = Q K^T, dP = dO V^T (64 rows x BN keys per warpgroup), one batch.
    float sacc[BN / 2], dp[BN / 2];
    cute::wait_barrier(k_full[s], round & 1);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t kbyte = uint32_t((kk % 4) * 32);  // 16 k values = 32 B into the row
      const uint64_t da = sm90::desc_sw128(q_addr + uint32_t((kk / 4) * 64 * 128) + kbyte, 16, 1024);
      const uint64_t db = sm90::desc_sw128(k_addr + uint32_t((kk / 4) * BN * 128) + kbyte, 16, 1024);
      sm90::ss<GemmS>(da, db, sacc, kk > 0, std::make_index_sequence<BN / 2>{});
    }
    cute::wait_barrier(v_full[s], round & 1);
#pragma unroll
    for (int kk = 0; kk < Dv / 16; ++kk) {
      const uint32_t kbyte = uint32_t((kk % 4) * 32);
      const uint64_t da = sm90::desc_sw128(do_addr + uint32_t((kk / 4) * 64 * 128) + kbyte, 16, 1024);
      const uint64_t db = sm90::desc_sw128(v_addr + uint32_t((kk / 4) * BN * 128) + kbyte, 16, 1024);
      sm90::ss<GemmS>(da, db, dp, kk > 0, std::make_index_sequence<BN / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    sm90::fence_operands(sacc);
    sm90::fence_operands(dp);

    // dS (bwd_q_kernel's guards; rows past the piece have lse = +inf, so P = 0). The key bound
    // and band become, per row r of this thread, an interval [klo, khi] of visible key columns
    // of the tile (32-bit compares instead of 64-bit index math).
    const bool full = m_wg < sq && classify_tile(m_wg, 64, n0, BN, sq, sk, pc.band) == kFull;
    int klo[2] = {0, 0}, khi[2] = {BN, BN};
    if (!full) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const index_t rel = m_wg + 16 * warp + g + 8 * r - n0;  // row - n0
        klo[r] = int(imin(imax(rel + pc.band.lo, index_t(0)), index_t(BN)));
        khi[r] = int(imin(imax(imin(rel + pc.band.hi, sk - 1 - n0), index_t(-1)), index_t(BN)));
      }
    }
    // dS straight into A operand registers: k-slice ks (keys 16ks .. 16ks + 15) is values
    // 8ks .. 8ks + 7, value v = 4pp + 2r + j at row g + 8r, key column 8pp + 2t + j.
    uint32_t dsf[BN / 16][4];
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks)
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const int v = 8 * ks + 2 * rr, r = rr % 2, kc = 8 * (v / 4) + 2 * t;
        float ds[2], prob;
#pragma unroll
        for (int j = 0; j < 2; ++j)
          ds[j] = grad_of_score(score, sacc[v + j], dp[v + j],
                                kc + j < klo[r] || kc + j > khi[r], row_lse[r], row_delta[r],
                                prob);
        dsf[ks][rr] = Elem<T>::pack(ds[0], ds[1]);
      }

    // dQ += dS K; K is MN-major here: 8-key groups 1024 B apart (SBO), 64-column blocks
    // BN*128 B apart (LBO), as V in the forward's O += P V.
    sm90::fence_operands(dq);
    cute::warpgroup_arrive();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const uint64_t db = sm90::desc_sw128(k_addr + uint32_t(ks * 2048), uint32_t(BN * 128), 1024);
      sm90::rs<GemmQ>(dsf[ks], db, dq, std::make_index_sequence<D / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    sm90::fence_operands(dq);
    cute::arrive_barrier(empty[s]);  // this thread is done with stage s
  }

  // ---- epilogue (store_dq_row, shared with bwd_q_kernel): zeros when no key tile was seen
  // (plain mode) ------------------------------------------------------------------------------
  if (p.accumulate && keys.first >= keys.last) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t row_in_piece = m_wg + 16 * warp + g + 8 * r;
    if (row_in_piece >= sq) continue;
    store_dq_row<D>(p, b, h, t, pc.q0 + row_in_piece,
                    [&](int d, int j) { return dq[4 * d + 2 * r + j]; });
  }
#endif  // DISTATTN_SM90_BODY
}

// ---- host side ---------------------------------------------------------------------------------
// Whether this build and device run the Hopper backward, both its dQ and its dK/dV kernel
// (sm90_kernel_available's rule, DISTATTN_DISABLE_SM90=1 included). UNVERIFIED on CUDA: no GPU
// has run this path.
template <typename T, int D, int Dv>
inline bool bwd_sm90_available() {
  return sm90_kernel_available<bwd_q_sm90_kernel<T, D, Dv>>() &&
         sm90_kernel_available<bwd_kv_sm90_kernel<T, D, Dv>>();
}

// The TMA descriptors of one Hopper backward kernel: Q and dO in boxes of `q_rows`, K and V in
// boxes of `k_rows`. False when a tensor does not qualify (make_tma_4d).
template <typename T, int D, int Dv>
inline bool make_bwd_sm90_args(BwdSm90Args* a, const BwdParams& p, int q_rows, int k_rows) {
  a->p = p;
  const Problem& pr = p.prob;
  return make_tma_4d<T>(&a->tma_q, p.q, p.q_stride, pr.seqlen_q, pr.heads_q, pr.batch, D,
                        q_rows) &&
         make_tma_4d<T>(&a->tma_do, p.dout, p.dout_stride, pr.seqlen_q, pr.heads_q, pr.batch,
                        Dv, q_rows) &&
         make_tma_4d<T>(&a->tma_k, p.k, p.k_stride, pr.seqlen_k, pr.heads_kv, pr.batch, D,
                        k_rows) &&
         make_tma_4d<T>(&a->tma_v, p.v, p.v_stride, pr.seqlen_k, pr.heads_kv, pr.batch, Dv,
                        k_rows);
}

template <auto Kernel>
cudaError_t launch_sm90(const dim3& grid, int threads, int smem, cudaStream_t stream,
                        const BwdSm90Args& a) {
  auto kernel = Kernel;
#if defined(DISTATTN_EMULATE)
  emu::allow_sm90_smem(reinterpret_cast<const void*>(kernel));
#endif
  const cudaError_t err = allow_dynamic_smem<Kernel>(smem);
  if (err != cudaSuccess) return err;
  DISTATTN_LAUNCH(kernel, grid, threads, smem, stream, a);
  return cudaGetLastError();
}

// The whole Hopper backward: delta (bwd_kernel.cuh's), bwd_q_sm90_kernel (dQ), then
// bwd_kv_sm90_kernel (dK/dV; last, so that the emulator's last_kernel() names it, and
// recent_kernels() the dQ kernel before it). *ran = false and nothing launched when the Hopper
// kernels are not available or a tensor does not qualify for TMA.
template <typename T, int D, int Dv>
cudaError_t launch_bwd_sm90_kernels(const BwdParams& p, cudaStream_t stream, bool* ran) {
  *ran = false;
  if (!bwd_sm90_available<T, D, Dv>()) return cudaSuccess;
  BwdSm90Args q_args, kv_args;
  if (!make_bwd_sm90_args<T, D, Dv>(&q_args, p, 64, sm90dq::block_n(D)) ||
      !make_bwd_sm90_args<T, D, Dv>(&kv_args, p, sm90bwd::block_m(D), sm90bwd::kBlockN))
    return cudaSuccess;
  *ran = true;
  cudaError_t err = launch_delta<T>(p, stream);
  if (err != cudaSuccess) return err;

  Problem& qp = q_args.p.prob;
  assign_tiles(qp, sm90dq::kBlockM, sm90dq::block_n(D));
  err = launch_sm90<bwd_q_sm90_kernel<T, D, Dv>>(
      dim3(unsigned(total_tiles(qp, sm90dq::kBlockM, false)), unsigned(qp.heads_q),
           unsigned(qp.batch)),
      sm90dq::kThreads, sm90dq::smem_bytes(D, Dv, int(sizeof(T))), stream, q_args);
  if (err != cudaSuccess) return err;

  Problem& kp = kv_args.p.prob;
  assign_tiles(kp, sm90bwd::block_m(D), sm90bwd::kBlockN);
  return launch_sm90<bwd_kv_sm90_kernel<T, D, Dv>>(
      dim3(unsigned(total_tiles(kp, sm90bwd::kBlockN, true)), unsigned(kp.heads_kv),
           unsigned(kp.batch)),
      sm90bwd::kThreads, sm90bwd::smem_bytes(D, Dv, int(sizeof(T))), stream, kv_args);
}

}  // namespace kern
}  // namespace distattn
