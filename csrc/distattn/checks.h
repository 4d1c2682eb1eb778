// Host-side validation of kernel parameters.
//
// Each check returns an empty string when the parameters can be launched, else one sentence
// that names the offending argument and what it needs. The torch binding turns a non-empty
// answer into a Python exception (before any launch); the C++ tests call these directly.
// Header-only and free of CUDA and torch, so g++ can build the tests without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "params.h"
#include "tiling.h"

namespace distattn {

namespace detail {

inline bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline bool strides_multiple_of(const SeqStrides& s, index_t n) {
  return s.batch % n == 0 && s.seq % n == 0 && s.head % n == 0;
}

// Inputs read with 16-byte cp.async: base 16-byte aligned, every row start 16-byte aligned.
inline std::string check_vector_input(const char* name, const void* p, const SeqStrides& s,
                                      int elem_bytes) {
  const index_t per16 = 16 / elem_bytes;
  if (p == nullptr) return std::string(name) + " is null";
  if (!aligned(p, 16) || !strides_multiple_of(s, per16))
    return std::string(name) + " must be 16-byte aligned with batch/seq/head strides that are "
           "multiples of " + std::to_string(per16) + " elements (pass a contiguous tensor)";
  return {};
}

// Float32 accumulators updated two elements at a time (float2): 8-byte alignment.
inline std::string check_acc(const char* name, const void* p, const SeqStrides& s) {
  if (p == nullptr) return std::string(name) + " is null";
  if (!aligned(p, 8) || !strides_multiple_of(s, 2))
    return std::string(name) + " must be 8-byte aligned with even batch/seq/head strides";
  return {};
}

}  // namespace detail

inline std::string check_problem(const Problem& p) {
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.seqlen_k <= 0 || p.heads_q <= 0 || p.heads_kv <= 0)
    return "batch, seqlen_q, seqlen_k, heads_q and heads_kv must all be positive (empty "
           "problems are skipped before the launch)";
  if (p.heads_q % p.heads_kv != 0)
    return "heads_q (" + std::to_string(p.heads_q) + ") must be a multiple of heads_kv (" +
           std::to_string(p.heads_kv) + ")";
  if (!head_dim_supported(p.head_dim))
    return "head_dim " + std::to_string(p.head_dim) +
           " has no compiled kernel (enabled by DISTATTN_HD<D> in csrc/distattn/tiling.h)";
  if (!(std::isfinite(p.scale) && p.scale > 0.f))
    return "softmax scale must be finite and > 0";
  if (p.heads_q > kMaxGridYZ || p.batch > kMaxGridYZ)
    return "heads_q and batch must be <= 65535 (CUDA grid limit)";
  return {};
}

// Problem shape plus the q/k/v pointers and strides, which forward and backward share.
template <typename Params>
inline std::string check_problem_and_qkv(const Params& p, int elem_bytes) {
  std::string e = check_problem(p.prob);
  if (e.empty()) e = detail::check_vector_input("q", p.q, p.q_stride, elem_bytes);
  if (e.empty()) e = detail::check_vector_input("k", p.k, p.k_stride, elem_bytes);
  if (e.empty()) e = detail::check_vector_input("v", p.v, p.v_stride, elem_bytes);
  return e;
}

inline std::string check_fwd(const FwdParams& p, DType dtype) {
  if (dtype == DType::kFloat32) return "q/k/v must be float16 or bfloat16";
  std::string e = check_problem_and_qkv(p, dtype_size(dtype));
  if (!e.empty()) return e;
  if (p.accumulate) {
    if (e.empty()) e = detail::check_acc("out_acc", p.out_acc, p.out_acc_stride);
    if (e.empty() && p.lse_acc == nullptr) e = "lse_acc is null";
  } else {
    if (p.out == nullptr) return "out is null";
    // out is written two elements (4 bytes) at a time.
    if (!detail::aligned(p.out, 4) || !detail::strides_multiple_of(p.out_stride, 2))
      return "out must be 4-byte aligned with even batch/seq/head strides";
    if (p.lse == nullptr) return "lse is null";
  }
  return e;
}

inline std::string check_bwd(const BwdParams& p, DType dtype) {
  if (dtype == DType::kFloat32) return "q/k/v must be float16 or bfloat16";
  const int eb = dtype_size(dtype);
  std::string e = check_problem_and_qkv(p, eb);
  if (e.empty()) e = detail::check_vector_input("dout", p.dout, p.dout_stride, eb);
  if (e.empty() && p.out == nullptr) e = "out is null";
  if (e.empty() && p.lse == nullptr) e = "lse is null";
  if (e.empty() && p.delta == nullptr) e = "delta workspace is null";
  if (e.empty()) e = detail::check_acc("dq", p.dq_acc, p.dq_stride);
  if (e.empty()) e = detail::check_acc("dk", p.dk_acc, p.dk_stride);
  if (e.empty()) e = detail::check_acc("dv", p.dv_acc, p.dv_stride);
  return e;
}

inline std::string check_merge(const MergeParams& p) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.heads <= 0 || p.head_dim <= 0)
    return "merge: batch, seqlen, heads and head_dim must be positive";
  if (p.out_acc == nullptr || p.lse_acc == nullptr || p.out_blk == nullptr ||
      p.lse_blk == nullptr)
    return "merge: a tensor pointer is null";
  return {};
}

}  // namespace distattn
