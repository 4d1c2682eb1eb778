// The merge kernel and the (dtype, head_dim) dispatch, compiled for the host CTA emulator
// (backend "emulate"): the same files nvcc compiles, with DISTATTN_EMULATE set by the build.
#include "../kernels/dispatch.cu"
#include "../kernels/merge.cu"
