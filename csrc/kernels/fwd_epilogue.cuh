// The forward epilogue of one query row, shared by fwd_kernel.cuh (mma.sync) and
// fwd_sm90_kernel.cuh (wgmma): both hold a row's unnormalised O = P V and its running max
// (log2 units) and partial sums in the four lanes of a quad, lane t owning columns 8d + 2t
// and 8d + 2t + 1 (``value(d, j)``, j = 0, 1).
//
// Plain: out = O / l in T and lse (natural log; -inf and out 0 for a row that saw nothing).
// Accumulating (the fused ring step): the block's (out, lse) folded into the float32 running
// (out_acc, lse_acc); a row that saw nothing leaves them untouched, and an accumulator whose
// weight is 0 is never read (0 * NaN = NaN). Every lane of the warp calls this (quad_sum and
// __syncwarp are warp-collective); rows at or past the piece's end (``in_bounds`` false)
// write nothing.
#pragma once

#include "mma.cuh"

namespace distattn {
namespace kern {

template <typename T, int Dv, typename Value>
__device__ __forceinline__ void store_fwd_row(const FwdParams& p, int b, int h, int t,
                                              index_t row, bool in_bounds, float row_max,
                                              float row_sum, Value value) {
  const float l = quad_sum(row_sum);
  const float lse = l > 0.f ? row_max * kLn2 + logf(l) : -INFINITY;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (!p.accumulate) {
    if (in_bounds) {
      T* out = static_cast<T*>(p.out) + b * p.out_stride.batch + row * p.out_stride.seq +
               h * p.out_stride.head;
#pragma unroll
      for (int d = 0; d < Dv / 8; ++d)
        *reinterpret_cast<uint32_t*>(out + 8 * d + 2 * t) =
            Elem<T>::pack(value(d, 0) * inv, value(d, 1) * inv);
      if (t == 0)
        p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row * p.lse_stride.seq] = lse;
    }
    return;
  }
  float* lse_acc = nullptr;
  float old_lse = -INFINITY;
  if (in_bounds) {
    lse_acc = p.lse_acc + b * p.lse_acc_stride.batch + h * p.lse_acc_stride.head +
              row * p.lse_acc_stride.seq;
    old_lse = *lse_acc;
  }
  __syncwarp();  // the quad has read lse_acc before lane t == 0 overwrites it
  if (in_bounds && lse != -INFINITY) {
    float w_old, w_new;
    const float merged = merge_lse(old_lse, lse, w_old, w_new);
    float* acc = p.out_acc + b * p.out_acc_stride.batch + row * p.out_acc_stride.seq +
                 h * p.out_acc_stride.head;
    w_new *= inv;  // value() is the unnormalised sum P V
#pragma unroll
    for (int d = 0; d < Dv / 8; ++d) {
      float2* a2 = reinterpret_cast<float2*>(acc + 8 * d + 2 * t);
      float2 cur = make_float2(0.f, 0.f);
      if (w_old != 0.f) cur = *a2;
      cur.x = cur.x * w_old + value(d, 0) * w_new;
      cur.y = cur.y * w_old + value(d, 1) * w_new;
      *a2 = cur;
    }
    if (t == 0) *lse_acc = merged;
  }
}

}  // namespace kern
}  // namespace distattn
