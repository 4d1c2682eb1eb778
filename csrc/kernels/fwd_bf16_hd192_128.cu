// fwd kernels for __nv_bfloat16, head_dim 192 (q/k) and 128 (v/out): MLA (one translation unit per
// dtype x head dims x direction).
#include "instantiate.cuh"
#if DISTATTN_HD192_128
DISTATTN_INSTANTIATE_FWD(__nv_bfloat16, 192, 128)
#endif
