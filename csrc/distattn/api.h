// Launchers of distattn's kernels: the only entry points the binding calls.
//
// Each launcher takes a plain params struct (params.h), validated beforehand with checks.h,
// and a CUDA stream, enqueues its kernels and returns the launch status. None of them
// synchronises or allocates; `BwdParams::delta` is a workspace the caller provides.
#pragma once

#if defined(DISTATTN_EMULATE)
#include "emulate/cuda_runtime.h"  // host build: launches run on the CTA emulator
#else
#include <cuda_runtime_api.h>
#endif

#include "params.h"

namespace distattn {

// Forward of one block (plain or accumulating, see FwdParams). q/k/v dtype: kFloat16 or
// kBFloat16. Returns cudaErrorInvalidValue for a (dtype, head_dim, head_dim_v) without a
// compiled kernel.
cudaError_t launch_fwd(const FwdParams& params, DType dtype, cudaStream_t stream);

// Backward of one block: delta preprocessing, then the dK/dV kernel and the dQ kernel.
// Deterministic: no atomics; every gradient element is owned by exactly one thread.
cudaError_t launch_bwd(const BwdParams& params, DType dtype, cudaStream_t stream);

// Standalone merge; `blk_dtype` is the dtype of out_blk (any of the three).
cudaError_t launch_merge(const MergeParams& params, DType blk_dtype, cudaStream_t stream);

// Per-(dtype, D, Dv) entry points (D: q/k head dim, Dv: v/out head dim), explicitly
// instantiated in csrc/kernels/*.cu.
template <typename T, int D, int Dv>
cudaError_t run_fwd(const FwdParams& params, cudaStream_t stream);
template <typename T, int D, int Dv>
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream);
// The Hopper forward (csrc/kernels/fwd_sm90_kernel.cuh, D = Dv = 64 and 128): launches it and
// sets *ran when this device and build run it (see fwd_sm90_available), else leaves *ran false
// and launches nothing, and launch_fwd runs run_fwd's mma.sync kernel instead.
template <typename T, int D, int Dv>
cudaError_t run_fwd_sm90(const FwdParams& params, cudaStream_t stream, bool* ran);
// The Hopper backward (delta and dQ as run_bwd's, dK/dV by csrc/kernels/bwd_sm90_kernel.cuh,
// D = Dv = 64 and 128), same *ran rule as run_fwd_sm90.
template <typename T, int D, int Dv>
cudaError_t run_bwd_sm90(const BwdParams& params, cudaStream_t stream, bool* ran);

#if defined(DISTATTN_EMULATE)
// Which kernels the emulator's launch_fwd runs: 80 (default: the mma.sync kernels) or 90 (the
// Hopper forward where one exists). Per process; distattn/kernels/emulate.py sets it.
void set_emulated_arch(int arch);
int emulated_arch();
#endif

}  // namespace distattn
