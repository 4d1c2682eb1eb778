// bwd kernels for __nv_bfloat16, head_dim 256 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD256
DISTATTN_INSTANTIATE_BWD(__nv_bfloat16, 256, 256)
#endif
