// fwd kernels for __nv_bfloat16, head_dim 128 (one translation unit per dtype x head_dim x direction).
#include "instantiate.cuh"
#if DISTATTN_HD128
DISTATTN_INSTANTIATE_FWD(__nv_bfloat16, 128, 128)
#endif
