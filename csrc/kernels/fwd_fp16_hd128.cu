// fwd kernels for __half, head_dim 128 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD128
DISTATTN_INSTANTIATE_FWD(__half, 128, 128)
#endif
