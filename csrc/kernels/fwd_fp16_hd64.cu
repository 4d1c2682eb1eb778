// fwd kernels for __half, head_dim 64 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD64
DISTATTN_INSTANTIATE_FWD(__half, 64, 64)
#endif
