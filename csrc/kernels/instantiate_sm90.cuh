// Explicit instantiation of the Hopper entry points, one per TU: the forward in
// fwd_sm90_<dtype>_hd<D>.cu, the backward (dQ and dK/dV) in bwd_sm90_<dtype>_hd<D>.cu (a TU whose
// head dim is switched off in distattn/tiling.h compiles to nothing).
#pragma once

#include "distattn/api.h"
#include "bwd_sm90_kernel.cuh"
#include "fwd_sm90_kernel.cuh"

namespace distattn {
template <typename T, int D, int Dv>
cudaError_t run_fwd_sm90(const FwdParams& params, cudaStream_t stream, bool* ran) {
  return kern::launch_fwd_sm90_kernel<T, D, Dv>(params, stream, ran);
}
template <typename T, int D, int Dv>
cudaError_t run_bwd_sm90(const BwdParams& params, cudaStream_t stream, bool* ran) {
  return kern::launch_bwd_sm90_kernels<T, D, Dv>(params, stream, ran);
}
}  // namespace distattn

#define DISTATTN_INSTANTIATE_FWD_SM90(T, D, Dv)                                           \
  template cudaError_t distattn::run_fwd_sm90<T, D, Dv>(const distattn::FwdParams&,      \
                                                        cudaStream_t, bool*);
#define DISTATTN_INSTANTIATE_BWD_SM90(T, D, Dv)                                           \
  template cudaError_t distattn::run_bwd_sm90<T, D, Dv>(const distattn::BwdParams&,      \
                                                        cudaStream_t, bool*);
