// Hopper (sm_90a) forward block attention with LSE, plain or accumulating: the contract of
// fwd_kernel.cuh (same FwdParams, pieces/bands, softcap, GQA, fused ring-step epilogue), in
// FlashAttention-3's structure: warp specialisation, TMA, mbarriers, wgmma.
//
// CTA = 3 warpgroups (384 threads) per (query tile of 128 rows of a piece, q head, batch):
//   warpgroup 0  producer: setmaxnreg.dec to 24; one thread issues the TMA loads: Q once (two
//                64-row halves), then K_j and V_j of every key tile into a kStages ring of
//                128-byte-swizzled buffers. full barriers (K and V apart: S_j can start before
//                V_j lands) carry the transaction bytes; it refills a stage after the stage's
//                empty barrier completes (all 256 consumer threads arrived).
//   warpgroups 1, 2  consumers, setmaxnreg.inc to 240, each owning 64 query rows:
//                S = Q K^T by wgmma SS (m64n128k16, K-major Q and K), softcap, mask, online
//                softmax in registers (fwd_kernel's guards), P converted in place to the A
//                operand of O += P V by wgmma RS (m64nDvk16, V MN-major), then the stage is
//                released. Ping-pong: two named barriers hand the tensor cores from one
//                consumer warpgroup to the other, so that one's softmax overlaps the other's
//                GEMMs (FA3's inter-warpgroup schedule; no intra-warpgroup overlap yet).
// Shared memory (1024-aligned, 128-byte swizzle, K-major atoms of 8 rows x 64 elements):
//   Q  [2 halves][D/64][64 rows][64]   K [kStages][D/64][BN][64]   V [kStages][Dv/64][BN][64]
//   then the mbarriers.
// TMA tensors are [B, S, H, D] viewed as 4D (D, H, S, B) with boxes (64, 1, rows, 1); rows past
// the tensor are zero-filled by the TMA unit. Keys of a neighbouring piece inside a last tile
// are read (scores masked, probabilities 0): unlike fwd_kernel, which zero-fills past the
// piece, a non-finite K/V value there would reach O as 0 * inf = NaN.
//
// Compiled only for sm_90a (elsewhere the kernel body is empty and the launcher is never
// chosen, see dispatch.cu). NOTHING of this has run on a GPU: it is verified on the CTA
// emulator's sm_90a models (csrc/emulate/sm90_*.h) and compiled with ptxas (docs/KERNELS.md).
#pragma once

#include <cstdlib>
#include <type_traits>
#include <utility>

#include "fwd_epilogue.cuh"

#if defined(DISTATTN_EMULATE)
#include "emulate/sm90_device.h"
#else
#include <cuda.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#endif

#if defined(DISTATTN_EMULATE) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define DISTATTN_SM90_BODY 1
#else
#define DISTATTN_SM90_BODY 0
#endif

namespace distattn {
namespace kern {

namespace sm90 {
constexpr int kConsumers = 2;                    // consumer warpgroups, 64 query rows each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kBlockM = 64 * kConsumers;
constexpr int kBlockN = 128;
constexpr int kStages = 2;
constexpr uint64_t kEvictNormal = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);  // L2 policy
constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 24 + 2 * 240 = 504 <= 65536 / 128
static_assert(kProducerRegs + kConsumers * kConsumerRegs <= 512, "setmaxnreg budget");

DA_HD constexpr int smem_bytes(int d, int dv) {
  return 1024 /* alignment slack */ + 2 * (kBlockM * d + kStages * kBlockN * (d + dv)) +
         8 * (1 + 3 * kStages);
}

// Shared-memory matrix descriptor, 128-byte swizzle, base offset 0 (PTX ISA, "Matrix
// Descriptor Format"): start, leading and stride byte offsets in 16-byte units.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t start, uint32_t lbo, uint32_t sbo) {
  return uint64_t((start >> 4) & 0x3fff) | uint64_t((lbo >> 4) & 0x3fff) << 16 |
         uint64_t((sbo >> 4) & 0x3fff) << 32 | uint64_t(1) << 62;
}

template <typename T, int N>
struct Gmma;
#define DISTATTN_GMMA(T, N, NAME)                                                            \
  template <>                                                                                \
  struct Gmma<T, N> {                                                                        \
    using SS = cute::SM90::GMMA::MMA_64x##N##x16_F32##NAME##_SS<cute::SM90::GMMA::Major::K,  \
                                                                cute::SM90::GMMA::Major::K>; \
    using RS = cute::SM90::GMMA::MMA_64x##N##x16_F32##NAME##_RS<cute::SM90::GMMA::Major::K,  \
                                                                cute::SM90::GMMA::Major::MN>;\
  };
DISTATTN_GMMA(__nv_bfloat16, 64, BF16BF16)
DISTATTN_GMMA(__nv_bfloat16, 128, BF16BF16)
DISTATTN_GMMA(__half, 64, F16F16)
DISTATTN_GMMA(__half, 128, F16F16)
#undef DISTATTN_GMMA

// acc (N / 2 floats of this thread) = or += A B: the atoms take the registers one by one.
template <class Atom, int M, std::size_t... I>
__device__ __forceinline__ void ss(uint64_t da, uint64_t db, float (&acc)[M], bool add,
                                   std::index_sequence<I...>) {
  Atom::fma(da, db, acc[I]...,
            add ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
template <class Atom, int M, std::size_t... I>
__device__ __forceinline__ void rs(const uint32_t (&a)[4], uint64_t db, float (&acc)[M],
                                   std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, acc[I]..., cute::SM90::GMMA::ScaleOut::One);
}

template <int M>
__device__ __forceinline__ void fence_operands(float (&x)[M]) {
#pragma unroll
  for (int i = 0; i < M; ++i) cute::warpgroup_fence_operand(x[i]);
}

// A consumer thread of the Hopper kernels' warp specialisation (warpgroup 0 produces,
// warpgroups 1 .. kConsumers consume): raises the warpgroup's register budget to Regs
// (setmaxnreg.inc; the whole warpgroup calls it) and names the thread's place: consumer c =
// wg - 1, warp in the warpgroup, lane, and the accumulator fragment's coordinates g = lane / 4
// (rows g and g + 8 of the warp's 16) and t = lane % 4 (column pair). Kernels bind them as
//   const auto [c, warp, lane, g, t] = sm90::enter_consumer<kConsumerRegs>(wg);
struct ConsumerThread {
  int c, warp, lane, g, t;
};
template <int Regs>
__device__ __forceinline__ ConsumerThread enter_consumer(int wg) {
  cutlass::arch::warpgroup_reg_alloc<Regs>();
  const int lane = int(threadIdx.x) % 32;
  return {wg - 1, (int(threadIdx.x) % 128) / 32, lane, lane / 4, lane % 4};
}

// ---- the Q + K/V ring of fwd_sm90_kernel and bwd_q_sm90_kernel -------------------------------
// One producer thread TMA-loads the CTA's query rows once (q_full) and the K and V tiles of
// its key tiles into Stages ring stages; Consumers warpgroups read stage s and release it
// (every consumer thread arrives on empty[s]). The mbarriers, 1 + 3 * Stages of them in shared
// memory from `bars` on (smem_bytes counts them) in this order:
//   q_full     1 arrival (the producer's expect-tx) + the query rows' transaction bytes
//   k_full[s]  1 arrival + K tile bytes;  v_full[s]  1 arrival + V tile bytes
//   empty[s]   Consumers * 128 arrivals
// Kernels bind them as const auto [q_full, k_full, v_full, empty] = init_kv_ring<...>(bars).
struct KvRingBarriers {
  uint64_t& q_full;
  uint64_t* k_full;
  uint64_t* v_full;
  uint64_t* empty;
};

// Called by every thread of the CTA before any use of the barriers: thread 0 initialises them,
// then __syncthreads.
template <int Stages, int Consumers>
__device__ __forceinline__ KvRingBarriers init_kv_ring(uint64_t* bars) {
  const KvRingBarriers r{bars[0], bars + 1, bars + 1 + Stages, bars + 1 + 2 * Stages};
  if (threadIdx.x == 0) {
    cute::initialize_barrier(r.q_full, 1);
#pragma unroll
    for (int s = 0; s < Stages; ++s) {
      cute::initialize_barrier(r.k_full[s], 1);
      cute::initialize_barrier(r.v_full[s], 1);
      cute::initialize_barrier(r.empty[s], Consumers * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  return r;
}

// The producer's K/V side of the ring, by its one TMA thread: key tile `it` of `keys` (i-th,
// from 0) goes to stage s = i % Stages once the consumers released the stage's previous round
// (from round 1 on); K rows k0 + it * BN .. + BN of K/V head hk, batch b, all D columns, into
// sK stage s ([Stages][D/64][BN][64], 128-byte swizzle by the descriptor), V likewise into sV
// ([Stages][Dv/64][BN][64]); each arms its full barrier with the tile's bytes.
template <typename T, int D, int Dv, int BN, int Stages>
__device__ __forceinline__ void load_kv_ring(const cute::TmaDescriptor* tma_k,
                                             const cute::TmaDescriptor* tma_v, T* sK, T* sV,
                                             uint64_t* k_full, uint64_t* v_full, uint64_t* empty,
                                             TileRange keys, index_t k0, int hk, int b) {
  for (index_t it = keys.first; it < keys.last; ++it) {
    const int i = int(it - keys.first), s = i % Stages, round = i / Stages;
    if (round > 0) cute::wait_barrier(empty[s], (round - 1) & 1);
    const int row = int(k0 + it * BN);
    cute::set_barrier_transaction_bytes(k_full[s], uint32_t(BN * D * sizeof(T)));
#pragma unroll
    for (int kb = 0; kb < D / 64; ++kb)
      cute::SM90_TMA_LOAD_4D::copy(tma_k, &k_full[s], kEvictNormal,
                                   sK + (s * (D / 64) + kb) * BN * 64, 64 * kb, hk, row, b);
    cute::set_barrier_transaction_bytes(v_full[s], uint32_t(BN * Dv * sizeof(T)));
#pragma unroll
    for (int kb = 0; kb < Dv / 64; ++kb)
      cute::SM90_TMA_LOAD_4D::copy(tma_v, &v_full[s], kEvictNormal,
                                   sV + (s * (Dv / 64) + kb) * BN * 64, 64 * kb, hk, row, b);
  }
}
}  // namespace sm90

struct FwdSm90Args {
  FwdParams p;
  cute::TmaDescriptor tma_q, tma_k, tma_v;
};

template <typename T, int D, int Dv>
__global__ void __launch_bounds__(sm90::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ FwdSm90Args args) {
#if DISTATTN_SM90_BODY
  using namespace sm90;
  constexpr int BM = kBlockM, BN = kBlockN;
  static_assert(D % 64 == 0 && Dv % 64 == 0 && (Dv == 64 || Dv == 128), "head dims");
  using GemmS = typename Gmma<T, BN>::SS;
  using GemmO = typename Gmma<T, Dv>::RS;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = uint32_t(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (1024 - raw_addr % 1024) % 1024;
  T* sQ = reinterpret_cast<T*>(smem);  // [kConsumers][D/64][64][64]
  T* sK = sQ + BM * D;                 // [kStages][D/64][BN][64]
  T* sV = sK + kStages * BN * D;       // [kStages][Dv/64][BN][64]
  uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kStages * BN * Dv);

  const FwdParams& p = args.p;
  const Problem& pr = p.prob;
  // Heaviest causal tiles first; m0 in rows of the piece.
  const auto [pc, sq, sk, h, b, hk, m0, keys] = query_tile_of_cta<BM, BN>(pr);
  const int wg = int(threadIdx.x) / 128;
  const auto [q_full, k_full, v_full, empty] = init_kv_ring<kStages, kConsumers>(bars);

  if (wg == 0) {
    // ---- producer ----------------------------------------------------------------------------
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0 && keys.first < keys.last) {
      cute::set_barrier_transaction_bytes(q_full, uint32_t(BM * D * sizeof(T)));
#pragma unroll
      for (int c = 0; c < kConsumers; ++c)
#pragma unroll
        for (int kb = 0; kb < D / 64; ++kb)
          cute::SM90_TMA_LOAD_4D::copy(&args.tma_q, &q_full, kEvictNormal,
                                       sQ + (c * (D / 64) + kb) * 64 * 64, 64 * kb, h,
                                       int(pc.q0 + m0 + 64 * c), b);
      load_kv_ring<T, D, Dv, BN, kStages>(&args.tma_k, &args.tma_v, sK, sV, k_full, v_full, empty,
                                           keys, pc.k0, hk, b);
    }
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  const auto [c, warp, lane, g, t] = enter_consumer<kConsumerRegs>(wg);
  const index_t m_wg = m0 + 64 * c;  // this warpgroup's first row (of the piece)
  const ScoreScale score(pr.scale, pr.softcap);
  const uint32_t q_addr = uint32_t(__cvta_generic_to_shared(sQ + c * 64 * D));
  const uint32_t k_addr0 = uint32_t(__cvta_generic_to_shared(sK));
  const uint32_t v_addr0 = uint32_t(__cvta_generic_to_shared(sV));

  float o[Dv / 2];  // accumulator: value v = 4p + 2h + j at row g + 8h, column 8p + 2t + j
#pragma unroll
  for (int i = 0; i < Dv / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units, already scaled
  float row_sum[2] = {0.f, 0.f};

  // Ping-pong: named barrier 1 + c is "consumer c may issue its GEMMs"; consumer 1 lets
  // consumer 0 go first, and each hands over after issuing its S GEMM.
  const bool pingpong = keys.last - keys.first > 0;
  if (pingpong && c == 1) cutlass::arch::NamedBarrier::arrive(2 * 128, 1);

  if (keys.first < keys.last) cute::wait_barrier(q_full, 0);
  for (index_t it = keys.first; it < keys.last; ++it) {
    const int i = int(it - keys.first), s = i % kStages, round = i / kStages;
    const index_t n0 = it * BN;
    const uint32_t k_addr = k_addr0 + uint32_t(s * BN * D * sizeof(T));
    const uint32_t v_addr = v_addr0 + uint32_t(s * BN * Dv * sizeof(T));

    // S = Q K^T (64 x BN per warpgroup).
    float sacc[BN / 2];
    cutlass::arch::NamedBarrier::sync(2 * 128, 1 + c);
    cute::wait_barrier(k_full[s], round & 1);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t kbyte = uint32_t((kk % 4) * 32);  // 16 k values = 32 B into the row
      const uint64_t da = desc_sw128(q_addr + uint32_t((kk / 4) * 64 * 128) + kbyte, 16, 1024);
      const uint64_t db = desc_sw128(k_addr + uint32_t((kk / 4) * BN * 128) + kbyte, 16, 1024);
      ss<GemmS>(da, db, sacc, kk > 0, std::make_index_sequence<BN / 2>{});
    }
    cute::warpgroup_commit_batch();
    // The other consumer's turn at the tensor cores (its last arrival is never awaited).
    if (!(c == 1 && it + 1 == keys.last))
      cutlass::arch::NamedBarrier::arrive(2 * 128, 1 + (1 - c));
    cute::warpgroup_wait<0>();
    fence_operands(sacc);

    if (score.cap_in != 0.f) {  // softcap, before the mask (which must win: tanh(-inf) = -1)
      float slope;
#pragma unroll
      for (int v = 0; v < BN / 2; ++v) sacc[v] = score.raw(sacc[v], slope);
    }
    const bool full = m_wg < sq && classify_tile(m_wg, 64, n0, BN, sq, sk, pc.band) == kFull;
    if (!full) {
#pragma unroll
      for (int v = 0; v < BN / 2; ++v) {
        const index_t row = m_wg + 16 * warp + g + 8 * ((v / 2) % 2);
        const index_t col = n0 + 8 * (v / 4) + 2 * t + (v % 2);
        if (col >= sk || !in_band(row, col, pc.band)) sacc[v] = -INFINITY;
      }
    }

    // Online softmax (fwd_kernel's, on the wgmma accumulator layout). r: row g, g + 8.
    const float scale_log2 = score.mul;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int pp = 0; pp < BN / 8; ++pp)
        mx = fmaxf(mx, fmaxf(sacc[4 * pp + 2 * r], sacc[4 * pp + 2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(mx) * scale_log2);
      const float shift = new_max == -INFINITY ? 0.f : new_max;  // no -inf - -inf
      const float alpha = exp2f(row_max[r] - shift);             // 0 when row_max was -inf
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int pp = 0; pp < BN / 8; ++pp)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float& x = sacc[4 * pp + 2 * r + j];
          x = exp2f(fmaf(x, scale_log2, -shift));
          sum += x;
        }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int pp = 0; pp < Dv / 8; ++pp) {
        o[4 * pp + 2 * r] *= alpha;
        o[4 * pp + 2 * r + 1] *= alpha;
      }
    }

    // P -> A operand registers: k-slice ks's values are the accumulator's 8ks .. 8ks + 7.
    uint32_t pf[BN / 16][4];
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks)
#pragma unroll
      for (int rr = 0; rr < 4; ++rr)
        pf[ks][rr] = Elem<T>::pack(sacc[8 * ks + 2 * rr], sacc[8 * ks + 2 * rr + 1]);

    // O += P V; V is MN-major: 8-key groups 1024 B apart (SBO), 64-column blocks BN*128 (LBO).
    cute::wait_barrier(v_full[s], round & 1);
    fence_operands(o);
    cute::warpgroup_arrive();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const uint64_t db = desc_sw128(v_addr + uint32_t(ks * 2048), uint32_t(BN * 128), 1024);
      rs<GemmO>(pf[ks], db, o, std::make_index_sequence<Dv / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_operands(o);
    cute::arrive_barrier(empty[s]);  // this thread is done with stage s
  }

  // ---- epilogue (fwd_epilogue.cuh, shared with fwd_kernel) ------------------------------------
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t row_in_piece = m_wg + 16 * warp + g + 8 * r;
    store_fwd_row<T, Dv>(p, b, h, t, pc.q0 + row_in_piece, row_in_piece < sq, row_max[r],
                         row_sum[r], [&](int d, int j) { return o[4 * d + 2 * r + j]; });
  }
#endif  // DISTATTN_SM90_BODY
}

// ---- host side ---------------------------------------------------------------------------------
// A 4D TMA descriptor over a [B, S, H, D] tensor viewed as (D, H, S, B), box (64, 1, rows, 1),
// 128-byte swizzle, out-of-bounds elements zero-filled. False when the tensor does not qualify
// (alignment, strides), and then the caller runs the mma.sync kernel.
template <typename T>
inline bool make_tma_4d(cute::TmaDescriptor* desc, const void* base, const SeqStrides& st,
                        index_t seqlen, int heads, int batch, int dim, int box_rows) {
  const uint64_t eb = sizeof(T);
  const uint64_t dims[4] = {uint64_t(dim), uint64_t(heads), uint64_t(seqlen), uint64_t(batch)};
  // A dimension of extent 1 is never stepped along: give it the dense stride (the binding
  // may pass 0 there, which TMA does not take).
  uint64_t strides[3] = {uint64_t(st.head) * eb, uint64_t(st.seq) * eb, uint64_t(st.batch) * eb};
  uint64_t dense = uint64_t(dim) * eb;
  for (int i = 0; i < 3; ++i) {
    if (dims[i + 1] == 1) strides[i] = dense;
    dense = strides[i] * dims[i + 1];
  }
  const uint32_t box[4] = {64, 1, uint32_t(box_rows), 1};
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (strides[i] % 16 != 0 || strides[i] == 0 || strides[i] >= (uint64_t(1) << 40)) return false;
#if defined(DISTATTN_EMULATE)
  emu::TmaDesc d;
  d.base = base;
  d.rank = 4;
  d.elem_bytes = int(eb);
  d.strides[0] = eb;
  for (int i = 0; i < 4; ++i) {
    d.dims[i] = dims[i];
    d.box[i] = box[i];
  }
  for (int i = 0; i < 3; ++i) d.strides[i + 1] = strides[i];
  d.swizzle_bytes = 128;
  *desc = d;
  return true;
#else
  // cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda needed).
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return false;
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = std::is_same<T, __half>::value
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(desc, type, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
#endif
}

// Whether this build and device run the Hopper kernel ``Kernel``: the emulator when asked
// (set_emulated_arch(90)); on CUDA an sm_90 device with sm_90a code for the kernel (UNVERIFIED:
// no GPU has run this path), unless DISTATTN_DISABLE_SM90=1 (which keeps the mma.sync kernels
// on Hopper too, to compare the two).
template <auto Kernel>
inline bool sm90_kernel_available() {
#if defined(DISTATTN_EMULATE)
  return emulated_arch() == 90;
#else
  static const bool disabled = [] {
    const char* e = std::getenv("DISTATTN_DISABLE_SM90");
    return e != nullptr && e[0] == '1';
  }();
  if (disabled) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major != 9)
    return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, Kernel) != cudaSuccess) return false;
  return attr.binaryVersion == 90;
#endif
}

template <typename T, int D, int Dv>
inline bool fwd_sm90_available() {
  return sm90_kernel_available<fwd_sm90_kernel<T, D, Dv>>();
}

// Runs the Hopper kernel when available; *ran = false (and nothing launched) otherwise.
template <typename T, int D, int Dv>
cudaError_t launch_fwd_sm90_kernel(const FwdParams& p, cudaStream_t stream, bool* ran) {
  *ran = false;
  if (!fwd_sm90_available<T, D, Dv>()) return cudaSuccess;
  FwdSm90Args a;
  a.p = p;
  Problem& pr = a.p.prob;
  if (!make_tma_4d<T>(&a.tma_q, p.q, p.q_stride, pr.seqlen_q, pr.heads_q, pr.batch, D, 64) ||
      !make_tma_4d<T>(&a.tma_k, p.k, p.k_stride, pr.seqlen_k, pr.heads_kv, pr.batch, D,
                      sm90::kBlockN) ||
      !make_tma_4d<T>(&a.tma_v, p.v, p.v_stride, pr.seqlen_k, pr.heads_kv, pr.batch, Dv,
                      sm90::kBlockN))
    return cudaSuccess;
  assign_tiles(pr, sm90::kBlockM, sm90::kBlockN);
  const int smem = sm90::smem_bytes(D, Dv);
  auto kernel = fwd_sm90_kernel<T, D, Dv>;
#if defined(DISTATTN_EMULATE)
  emu::allow_sm90_smem(reinterpret_cast<const void*>(kernel));
#endif
  const cudaError_t err = allow_dynamic_smem<fwd_sm90_kernel<T, D, Dv>>(smem);
  if (err != cudaSuccess) return err;
  *ran = true;
  const dim3 grid(unsigned(total_tiles(pr, sm90::kBlockM, false)), unsigned(pr.heads_q),
                  unsigned(pr.batch));
  DISTATTN_LAUNCH(kernel, grid, sm90::kThreads, smem, stream, a);
  return cudaGetLastError();
}

}  // namespace kern
}  // namespace distattn
