// bwd kernels for __half, head_dim 256 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD256
DISTATTN_INSTANTIATE_BWD(__half, 256, 256)
#endif
