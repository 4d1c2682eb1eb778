// Links the host program against every compiled kernel translation unit, so a missing
// explicit instantiation (dispatch.cu naming a run_fwd/run_bwd<T, D> that no TU defines) fails
// the build here instead of at `import distattn._C` on a GPU machine. At run time it only calls
// the launchers with parameters the checks refuse: no CUDA API call is made, no GPU is needed.
#include "distattn/api.h"
#include "harness.h"

using namespace distattn;

int main() {
  FwdParams f;  // all zero: refused by check_fwd before any launch
  CHECK(launch_fwd(f, DType::kFloat16, nullptr) == cudaErrorInvalidValue);
  CHECK(launch_fwd(f, DType::kBFloat16, nullptr) == cudaErrorInvalidValue);
  BwdParams b;
  CHECK(launch_bwd(b, DType::kFloat16, nullptr) == cudaErrorInvalidValue);
  MergeParams m;
  CHECK(launch_merge(m, DType::kFloat32, nullptr) == cudaErrorInvalidValue);
  return harness::finish("test_link");
}
