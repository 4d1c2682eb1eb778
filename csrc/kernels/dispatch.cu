// Host-side dispatch from (dtype, head_dim, head_dim_v) to the per-TU entry points. Head dims
// come from the DISTATTN_HD<D> and DISTATTN_HD<D>_<Dv> switches in distattn/tiling.h.
#if defined(DISTATTN_EMULATE)
#include "emulate/device.h"  // the emulator's 16-bit types
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <atomic>

#include "distattn/api.h"
#include "distattn/checks.h"

namespace distattn {

namespace {

template <template <typename> class Run, typename Params>
cudaError_t by_dtype_and_head_dims(const Params& p, DType dtype, cudaStream_t stream) {
  const int d = p.prob.head_dim, dv = p.prob.head_dim_v;
#define DISTATTN_CASE(T, D, Dv) \
  if (d == D && dv == Dv) return Run<T>::template go<D, Dv>(p, stream);
  if (dtype == DType::kFloat16) {
#if DISTATTN_HD64
    DISTATTN_CASE(__half, 64, 64)
#endif
#if DISTATTN_HD128
    DISTATTN_CASE(__half, 128, 128)
#endif
#if DISTATTN_HD256
    DISTATTN_CASE(__half, 256, 256)
#endif
#if DISTATTN_HD192_128
    DISTATTN_CASE(__half, 192, 128)
#endif
  } else if (dtype == DType::kBFloat16) {
#if DISTATTN_HD64
    DISTATTN_CASE(__nv_bfloat16, 64, 64)
#endif
#if DISTATTN_HD128
    DISTATTN_CASE(__nv_bfloat16, 128, 128)
#endif
#if DISTATTN_HD256
    DISTATTN_CASE(__nv_bfloat16, 256, 256)
#endif
#if DISTATTN_HD192_128
    DISTATTN_CASE(__nv_bfloat16, 192, 128)
#endif
  }
#undef DISTATTN_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
struct RunFwd {
  template <int D, int Dv>
  static cudaError_t go(const FwdParams& p, cudaStream_t s) {
    // The Hopper kernel where it is compiled and runs on this device (or the emulator was
    // asked for it); the mma.sync kernel everywhere else.
    if constexpr (D == Dv && (D == 64 || D == 128)) {
      bool ran = false;
      const cudaError_t err = run_fwd_sm90<T, D, Dv>(p, s, &ran);
      if (ran || err != cudaSuccess) return err;
    }
    return run_fwd<T, D, Dv>(p, s);
  }
};
template <typename T>
struct RunBwd {
  template <int D, int Dv>
  static cudaError_t go(const BwdParams& p, cudaStream_t s) {
    // The Hopper dQ and dK/dV kernels under the forward's rule; the mma.sync kernels otherwise.
    if constexpr (D == Dv && (D == 64 || D == 128)) {
      bool ran = false;
      const cudaError_t err = run_bwd_sm90<T, D, Dv>(p, s, &ran);
      if (ran || err != cudaSuccess) return err;
    }
    return run_bwd<T, D, Dv>(p, s);
  }
};

}  // namespace

#if defined(DISTATTN_EMULATE)
namespace {
std::atomic<int> g_emulated_arch{80};
}
void set_emulated_arch(int arch) { g_emulated_arch = arch; }
int emulated_arch() { return g_emulated_arch; }
#endif

cudaError_t launch_fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  if (!check_fwd(p, dtype).empty()) return cudaErrorInvalidValue;
  return by_dtype_and_head_dims<RunFwd>(p, dtype, stream);
}

cudaError_t launch_bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (!check_bwd(p, dtype).empty()) return cudaErrorInvalidValue;
  return by_dtype_and_head_dims<RunBwd>(p, dtype, stream);
}

}  // namespace distattn
