// The backward kernel translation units, compiled for the host CTA emulator (backend
// "emulate"): the same files nvcc compiles, with DISTATTN_EMULATE set by the build.
#include "../kernels/bwd_bf16_hd128.cu"
#include "../kernels/bwd_bf16_hd192_128.cu"
#include "../kernels/bwd_bf16_hd256.cu"
#include "../kernels/bwd_bf16_hd64.cu"
#include "../kernels/bwd_fp16_hd128.cu"
#include "../kernels/bwd_fp16_hd192_128.cu"
#include "../kernels/bwd_fp16_hd256.cu"
#include "../kernels/bwd_fp16_hd64.cu"
#include "../kernels/bwd_sm90_bf16_hd128.cu"
#include "../kernels/bwd_sm90_bf16_hd64.cu"
#include "../kernels/bwd_sm90_fp16_hd128.cu"
#include "../kernels/bwd_sm90_fp16_hd64.cu"
