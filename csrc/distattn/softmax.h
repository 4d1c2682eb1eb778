// Scalar softmax-statistics helpers shared by the kernels and the host tests.
#pragma once

#include <cmath>

#include "tiling.h"

namespace distattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Guarded stable merge of two log-sum-exps a, b (natural log):
//   m = max(a, b); lse = m + log(exp(a - m) + exp(b - m))
// and the normalised weights wa = exp(a - lse), wb = exp(b - lse). -inf on either side is
// exact (weight exactly 0, the other weight exactly 1); both -inf gives lse = -inf and zero
// weights. Never NaN for inputs in [-inf, +inf).
DA_HD float merge_lse(float a, float b, float& wa, float& wb) {
  const float m = fmaxf(a, b);
  if (m == -INFINITY) {
    wa = 0.f;
    wb = 0.f;
    return -INFINITY;
  }
  const float ea = expf(a - m), eb = expf(b - m);  // one of them is exactly 1
  const float sum = ea + eb;
  wa = ea / sum;
  wb = eb / sum;
  return m + logf(sum);
}

// lse (natural log) of a row -> the value the backward kernels subtract in exp2 units. A row
// that sees nothing (lse = -inf) maps to +inf, which makes every probability exp2(-inf) = 0.
DA_HD float lse_for_exp2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

}  // namespace distattn
