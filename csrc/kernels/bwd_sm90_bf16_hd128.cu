// Hopper (sm_90a) backward (dQ and dK/dV kernels) for __nv_bfloat16, head_dim 128 (one translation unit per instantiation).
#include "instantiate_sm90.cuh"
#if DISTATTN_HD128
DISTATTN_INSTANTIATE_BWD_SM90(__nv_bfloat16, 128, 128)
#endif
