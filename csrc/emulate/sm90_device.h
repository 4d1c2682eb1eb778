// Host stand-ins for the sm_90a (Hopper) names the Hopper kernels take from CuTe and CUTLASS,
// for DISTATTN_EMULATE builds: the kernel text (csrc/kernels/fwd_sm90_kernel.cuh) is the same
// under nvcc (real CuTe: <cute/arch/mma_sm90_gmma.hpp>, <cute/arch/copy_sm90_tma.hpp>,
// <cute/arch/copy_sm90_desc.hpp>, <cutlass/arch/barrier.h>, <cutlass/arch/reg_reconfig.h>)
// and here, where each name calls the CTA emulator's model (runtime.h, "sm_90a"):
//
//   cute::warpgroup_arrive / warpgroup_commit_batch / warpgroup_wait<N>   wgmma.fence / commit / wait
//   cute::warpgroup_fence_operand                                          (a compiler fence: no-op)
//   cute::SM90::GMMA::MMA_64x{64,128}x16_F32{BF16BF16,F16F16}_{SS,RS}      wgmma.mma_async ::fma
//   cute::SM90::GMMA::MMA_64x32x16_F32{BF16BF16,F16F16}_SS                 (the hd128 backward)
//   cute::SM90_TMA_LOAD_{2D,3D,4D}::copy, cute::TmaDescriptor              TMA tiled loads
//   cute::initialize_barrier / set_barrier_transaction_bytes / wait_barrier / arrive_barrier
//   cutlass::arch::NamedBarrier::{sync,arrive}, warpgroup_reg_{alloc,dealloc}, fence_view_async_shared
//   __cvta_generic_to_shared, cute::cast_smem_ptr_to_uint, __grid_constant__
//
// Signatures are CuTe 4.2's (the same argument lists, so a call that compiles here compiles
// there). Only what the kernels use is modelled; a shape not listed is a compile error here.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "emulate/runtime.h"

#define __grid_constant__

inline std::size_t __cvta_generic_to_shared(const void* p) {
  return distattn::emu::smem_address(p);
}

namespace cute {

using TmaDescriptor = distattn::emu::TmaDesc;

inline uint32_t cast_smem_ptr_to_uint(void const* p) { return distattn::emu::smem_address(p); }

// ---- wgmma ordering ----------------------------------------------------------------------------
inline void warpgroup_arrive() { distattn::emu::wgmma_fence(); }
inline void warpgroup_commit_batch() { distattn::emu::wgmma_commit(); }
template <int N>
inline void warpgroup_wait() {
  static_assert(N >= 0 && N <= 7, "WGMMA wait: N must be in range [0, 7]");
  distattn::emu::wgmma_wait(N);
}
inline void warpgroup_fence_operand(uint32_t&) {}
inline void warpgroup_fence_operand(float&) {}

namespace SM90 {
namespace GMMA {

enum class Major { K = 0, MN = 1 };
enum class ScaleOut { Zero = 0, One = 1 };
enum class ScaleIn { Neg = -1, One = 1 };

namespace detail {
// Collects the accumulator references (and the optional trailing ScaleOut) of an fma call.
template <int N>
struct Acc {
  float* d[N / 2] = {};
  int count = 0;
  ScaleOut scale = ScaleOut::One;
  void take(float& x) { d[count++] = &x; }
  void take(ScaleOut s) { scale = s; }
};

template <distattn::emu::MmaType kType, int N, Major kA, Major kB, class... Args>
void issue(bool a_regs, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, Args&&... args) {
  static_assert(sizeof...(Args) == N / 2 || sizeof...(Args) == N / 2 + 1,
                "wgmma m64nNk16 f32: N / 2 accumulator registers (and an optional ScaleOut)");
  Acc<N> acc;
  (acc.take(std::forward<Args>(args)), ...);
  distattn::emu::WgmmaIssue w;
  w.type = kType;
  w.n = N;
  w.a_mn_major = kA == Major::MN;
  w.b_mn_major = kB == Major::MN;
  w.scale_d = acc.scale == ScaleOut::One;
  w.a_from_regs = a_regs;
  w.desc_a = desc_a;
  w.desc_b = desc_b;
  if (a_regs)
    for (int i = 0; i < 4; ++i) w.a_regs[i] = a[i];
  w.d = acc.d;
  distattn::emu::wgmma(w);
}

// A and B from shared memory (descriptors).
template <distattn::emu::MmaType kType, int N, Major kA, Major kB>
struct EmulatedSS {
  template <class... Args>
  static void fma(uint64_t const& desc_a, uint64_t const& desc_b, Args&&... args) {
    issue<kType, N, kA, kB>(false, nullptr, desc_a, desc_b, std::forward<Args>(args)...);
  }
};
// A from registers (K-major by definition), B from shared memory.
template <distattn::emu::MmaType kType, int N, Major kA, Major kB>
struct EmulatedRS {
  static_assert(kA == Major::K, "Register source operand A must have K major layout.");
  template <class... Args>
  static void fma(uint32_t const& a00, uint32_t const& a01, uint32_t const& a02,
                  uint32_t const& a03, uint64_t const& desc_b, Args&&... args) {
    const uint32_t a[4] = {a00, a01, a02, a03};
    issue<kType, N, kA, kB>(true, a, 0, desc_b, std::forward<Args>(args)...);
  }
};
}  // namespace detail

#define DISTATTN_EMU_GMMA(NAME, TYPE, N, KIND)                                              \
  template <Major tnspA, Major tnspB, ScaleIn scaleA = ScaleIn::One,                      \
            ScaleIn scaleB = ScaleIn::One>                                                \
  struct NAME : detail::KIND<distattn::emu::MmaType::TYPE, N, tnspA, tnspB> {                \
    static_assert(scaleA == ScaleIn::One && scaleB == ScaleIn::One,                       \
                  "the emulator models scale 1 only");                                     \
  };
DISTATTN_EMU_GMMA(MMA_64x32x16_F32BF16BF16_SS, kBF16, 32, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x32x16_F32F16F16_SS, kF16, 32, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x64x16_F32BF16BF16_SS, kBF16, 64, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x128x16_F32BF16BF16_SS, kBF16, 128, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x64x16_F32F16F16_SS, kF16, 64, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x128x16_F32F16F16_SS, kF16, 128, EmulatedSS)
DISTATTN_EMU_GMMA(MMA_64x64x16_F32BF16BF16_RS, kBF16, 64, EmulatedRS)
DISTATTN_EMU_GMMA(MMA_64x128x16_F32BF16BF16_RS, kBF16, 128, EmulatedRS)
DISTATTN_EMU_GMMA(MMA_64x64x16_F32F16F16_RS, kF16, 64, EmulatedRS)
DISTATTN_EMU_GMMA(MMA_64x128x16_F32F16F16_RS, kF16, 128, EmulatedRS)
#undef DISTATTN_EMU_GMMA

}  // namespace GMMA
}  // namespace SM90

// ---- TMA ------------------------------------------------------------------------------------
namespace TMA {
enum class CacheHintSm90 : uint64_t {
  EVICT_NORMAL = 0x1000000000000000,
  EVICT_FIRST = 0x12F0000000000000,
  EVICT_LAST = 0x14F0000000000000,
};
}  // namespace TMA

namespace detail {
// The L2 cache-policy operand of the TMA load must be a policy (createpolicy / CuTe's
// CacheHintSm90 values); 0 is not one.
inline void check_cache_hint(uint64_t hint) {
  if (hint != uint64_t(TMA::CacheHintSm90::EVICT_NORMAL) &&
      hint != uint64_t(TMA::CacheHintSm90::EVICT_FIRST) &&
      hint != uint64_t(TMA::CacheHintSm90::EVICT_LAST))
    distattn::emu::report_misuse("TMA load with an L2 cache hint that is not a cache policy "
                                 "(use cute::TMA::CacheHintSm90)");
}
}  // namespace detail

struct SM90_TMA_LOAD_2D {
  static void copy(void const* desc_ptr, uint64_t* mbar_ptr, uint64_t cache_hint,
                   void* smem_ptr, int32_t const& crd0, int32_t const& crd1) {
    detail::check_cache_hint(cache_hint);
    const int32_t crd[2] = {crd0, crd1};
    distattn::emu::tma_load(static_cast<const TmaDescriptor*>(desc_ptr), mbar_ptr, smem_ptr, crd);
  }
};
struct SM90_TMA_LOAD_3D {
  static void copy(void const* desc_ptr, uint64_t* mbar_ptr, uint64_t cache_hint,
                   void* smem_ptr, int32_t const& crd0, int32_t const& crd1,
                   int32_t const& crd2) {
    detail::check_cache_hint(cache_hint);
    const int32_t crd[3] = {crd0, crd1, crd2};
    distattn::emu::tma_load(static_cast<const TmaDescriptor*>(desc_ptr), mbar_ptr, smem_ptr, crd);
  }
};
struct SM90_TMA_LOAD_4D {
  static void copy(void const* desc_ptr, uint64_t* mbar_ptr, uint64_t cache_hint,
                   void* smem_ptr, int32_t const& crd0, int32_t const& crd1,
                   int32_t const& crd2, int32_t const& crd3) {
    detail::check_cache_hint(cache_hint);
    const int32_t crd[4] = {crd0, crd1, crd2, crd3};
    distattn::emu::tma_load(static_cast<const TmaDescriptor*>(desc_ptr), mbar_ptr, smem_ptr, crd);
  }
};

// ---- mbarrier -------------------------------------------------------------------------------
inline void initialize_barrier(uint64_t& smem_barrier, int thread_count = 1) {
  distattn::emu::mbar_init(&smem_barrier, thread_count);
}
inline void set_barrier_transaction_bytes(uint64_t& smem_barrier, uint32_t bytes) {
  distattn::emu::mbar_arrive(&smem_barrier, int(bytes));
}
inline void wait_barrier(uint64_t& smem_barrier, int phase_bit) {
  distattn::emu::mbar_wait(&smem_barrier, phase_bit);
}
inline void arrive_barrier(uint64_t& smem_barrier) { distattn::emu::mbar_arrive(&smem_barrier, 0); }

}  // namespace cute

namespace cutlass {
namespace arch {

// User barrier ids start after CUTLASS's reserved ones, as in <cutlass/arch/barrier.h>.
class NamedBarrier {
 public:
  static constexpr uint32_t ReservedNamedBarrierCount = 8;
  static void sync(uint32_t num_threads, uint32_t barrier_id) {
    distattn::emu::named_barrier_sync(int(barrier_id + ReservedNamedBarrierCount), int(num_threads));
  }
  static void arrive_and_wait(uint32_t num_threads, uint32_t barrier_id) {
    sync(num_threads, barrier_id);
  }
  static void arrive(uint32_t num_threads, uint32_t barrier_id) {
    distattn::emu::named_barrier_arrive(int(barrier_id + ReservedNamedBarrierCount),
                                        int(num_threads));
  }
};

template <uint32_t RegCount>
inline void warpgroup_reg_alloc() {
  distattn::emu::setmaxnreg(int(RegCount), true);
}
template <uint32_t RegCount>
inline void warpgroup_reg_dealloc() {
  distattn::emu::setmaxnreg(int(RegCount), false);
}

inline void fence_view_async_shared() { distattn::emu::fence_proxy_async(); }
// fence.mbarrier_init.release.cluster: orders mbarrier.init before other threads' (and the
// TMA unit's) use; the emulator's mbarriers exist once initialised, so nothing to model.
inline void fence_barrier_init() {}

}  // namespace arch
}  // namespace cutlass
