// Explicit instantiation of the per-(dtype, D, Dv) entry points. Each translation unit
// fwd_<dtype>_hd<D>.cu / bwd_<dtype>_hd<D>.cu (D == Dv) or fwd_<dtype>_hd<D>_<Dv>.cu /
// bwd_<dtype>_hd<D>_<Dv>.cu (MLA) instantiates exactly one of them, so the expensive kernel
// builds run in parallel. A TU whose head dims are switched off in distattn/tiling.h
// (DISTATTN_HD<D> or DISTATTN_HD<D>_<Dv> 0) compiles to nothing.
#pragma once

#include "distattn/api.h"
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace distattn {
template <typename T, int D, int Dv>
cudaError_t run_fwd(const FwdParams& params, cudaStream_t stream) {
  return kern::launch_fwd_kernel<T, D, Dv>(params, stream);
}
template <typename T, int D, int Dv>
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream) {
  return kern::launch_bwd_kernels<T, D, Dv>(params, stream);
}
}  // namespace distattn

#define DISTATTN_INSTANTIATE_FWD(T, D, Dv) \
  template cudaError_t distattn::run_fwd<T, D, Dv>(const distattn::FwdParams&, cudaStream_t);
#define DISTATTN_INSTANTIATE_BWD(T, D, Dv) \
  template cudaError_t distattn::run_bwd<T, D, Dv>(const distattn::BwdParams&, cudaStream_t);
