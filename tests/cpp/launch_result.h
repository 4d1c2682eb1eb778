// What the emulator tests ask of a launch (after kernels/mma.cuh, which brings the CUDA
// runtime stand-ins of DISTATTN_EMULATE builds).
#pragma once

#include <string>

namespace distattn {
namespace kern {

// The message of the last launch (empty on success).
inline std::string launch_result() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

inline bool contains(const std::string& s, const char* what) {
  return s.find(what) != std::string::npos;
}

}  // namespace kern
}  // namespace distattn
