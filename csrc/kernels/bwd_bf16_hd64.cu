// bwd kernels for __nv_bfloat16, head_dim 64 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD64
DISTATTN_INSTANTIATE_BWD(__nv_bfloat16, 64, 64)
#endif
