// bwd kernels for __half, head_dim 192 (q/k) and 128 (v/out): MLA (one translation unit per
// dtype x head dims x direction).
#include "instantiate.cuh"
#if DISTATTN_HD192_128
DISTATTN_INSTANTIATE_BWD(__half, 192, 128)
#endif
