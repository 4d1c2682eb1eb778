// Standalone online-softmax merge: (out_acc, lse_acc) <- merge((out_acc, lse_acc),
// (out_blk, lse_blk)), float32 accumulators, out_blk in float16, bfloat16 or float32.
//
// Memory-bound; one warp per (b, s, h) row: every lane reads both lse values, computes the
// guarded weights (kern::merge_lse: -inf on either side exact, never NaN), updates its share
// of the head_dim elements, and lane 0 writes the new lse after the warp has read the old one.
// A dead accumulator (weight 0) is never read, so garbage in it cannot become NaN.
#include "distattn/api.h"
#include "distattn/checks.h"
#include "mma.cuh"

namespace distattn {
namespace kern {

template <typename TB>
__global__ void __launch_bounds__(kRowKernelThreads) merge_kernel(const MergeParams p) {
  const int lane = threadIdx.x % 32;
  const index_t idx = index_t(blockIdx.x) * (kRowKernelThreads / 32) + threadIdx.x / 32;
  if (idx >= index_t(p.batch) * p.seqlen * p.heads) return;
  const index_t h = idx % p.heads;
  const index_t s = (idx / p.heads) % p.seqlen;
  const index_t b = idx / (index_t(p.heads) * p.seqlen);

  float* lse_acc =
      p.lse_acc + b * p.lse_acc_stride.batch + h * p.lse_acc_stride.head + s * p.lse_acc_stride.seq;
  const float lse_b =
      p.lse_blk[b * p.lse_blk_stride.batch + h * p.lse_blk_stride.head + s * p.lse_blk_stride.seq];
  const float lse_a = *lse_acc;
  __syncwarp();  // all lanes have read lse_acc before lane 0 may overwrite it
  if (lse_b == -INFINITY) return;  // the block saw nothing for this row: unchanged

  float w_acc, w_blk;
  const float merged = merge_lse(lse_a, lse_b, w_acc, w_blk);
  float* acc = p.out_acc + b * p.out_acc_stride.batch + s * p.out_acc_stride.seq +
               h * p.out_acc_stride.head;
  const TB* blk = static_cast<const TB*>(p.out_blk) + b * p.out_blk_stride.batch +
                  s * p.out_blk_stride.seq + h * p.out_blk_stride.head;
  for (int d = lane; d < p.head_dim; d += 32) {
    const float old = w_acc != 0.f ? acc[d] * w_acc : 0.f;
    acc[d] = old + load_as_float(blk + d) * w_blk;
  }
  if (lane == 0) *lse_acc = merged;
}

}  // namespace kern

cudaError_t launch_merge(const MergeParams& p, DType blk_dtype, cudaStream_t stream) {
  if (!check_merge(p).empty()) return cudaErrorInvalidValue;
  const LaunchConfig cfg = row_launch_config(index_t(p.batch) * p.seqlen * p.heads);
  const unsigned grid = unsigned(cfg.grid_x);
  switch (blk_dtype) {
    case DType::kFloat16:
      DISTATTN_LAUNCH(kern::merge_kernel<__half>, grid, cfg.threads, 0, stream, p);
      break;
    case DType::kBFloat16:
      DISTATTN_LAUNCH(kern::merge_kernel<__nv_bfloat16>, grid, cfg.threads, 0, stream, p);
      break;
    case DType::kFloat32:
      DISTATTN_LAUNCH(kern::merge_kernel<float>, grid, cfg.threads, 0, stream, p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace distattn
