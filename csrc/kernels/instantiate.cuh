// Explicit instantiation of the per-(dtype, head_dim) entry points. Each translation unit
// fwd_<dtype>_hd<D>.cu / bwd_<dtype>_hd<D>.cu instantiates exactly one of them, so the
// expensive kernel builds run in parallel. A TU whose head dim is switched off in
// distattn/tiling.h (DISTATTN_HD<D> 0) compiles to nothing.
#pragma once

#include "distattn/api.h"
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace distattn {
template <typename T, int D>
cudaError_t run_fwd(const FwdParams& params, cudaStream_t stream) {
  return kern::launch_fwd_kernel<T, D>(params, stream);
}
template <typename T, int D>
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream) {
  return kern::launch_bwd_kernels<T, D>(params, stream);
}
}  // namespace distattn

#define DISTATTN_INSTANTIATE_FWD(T, D) \
  template cudaError_t distattn::run_fwd<T, D>(const distattn::FwdParams&, cudaStream_t);
#define DISTATTN_INSTANTIATE_BWD(T, D) \
  template cudaError_t distattn::run_bwd<T, D>(const distattn::BwdParams&, cudaStream_t);
