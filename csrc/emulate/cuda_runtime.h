// The part of the CUDA runtime API the launchers use, for DISTATTN_EMULATE builds (stands in
// for <cuda_runtime_api.h>). Launches run synchronously on the host through runtime.h; errors
// are sticky per OS thread until cudaGetLastError() reads them, as with CUDA.
#pragma once

#include <cstddef>
#include <utility>

#include "emulate/runtime.h"

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

using cudaStream_t = struct CUstream_st*;

namespace distattn {
namespace emu {
cudaError_t& last_launch_error();  // this OS thread's pending error (runtime.cpp)
}  // namespace emu
}  // namespace distattn

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = distattn::emu::last_launch_error();
  distattn::emu::last_launch_error() = cudaSuccess;
  return e;
}

inline cudaError_t cudaPeekAtLastError() { return distattn::emu::last_launch_error(); }

// The detailed message of this thread's last failed launch, else the code's name.
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  const std::string& m = distattn::emu::last_error_message();
  return m.empty() ? "emulated launch failed" : m.c_str();
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cudaError_t(distattn::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel),
                                                         value));
}

namespace distattn {
namespace emu {
// kernel<<<grid, block, smem, stream>>>(args...): runs the grid now; errors as with CUDA
// (sticky until cudaGetLastError).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t,
            Args&&... args) {
  auto body = [&]() { kernel(args...); };
  const int err = run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, body);
  if (err != 0 && last_launch_error() == cudaSuccess) last_launch_error() = cudaError_t(err);
}
}  // namespace emu
}  // namespace distattn
