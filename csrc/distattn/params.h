// Plain parameter structs for distattn's CUDA kernels.
//
// These structs are the whole interface between the host (the torch binding, the C++ tests)
// and the kernels: pointers, sizes and element strides, nothing else. They include no torch
// and no CUDA header, so host-only code (tests/cpp) can build and check them with g++.
//
// Layouts (flash-attn's, docs/DESIGN.md, "Backends"):
//   q, out, dout, out_acc, dq_acc   [B, Sq, Hq, D]
//   k, v, dk_acc, dv_acc            [B, Sk, Hkv, D]        Hq % Hkv == 0, head h reads h / (Hq/Hkv)
//   lse, lse_acc, delta             [B, Hq, Sq]            float32, natural log
// Every stride is in elements of its own tensor. The last (head_dim) dimension is contiguous.
#pragma once

#include <cstdint>

namespace distattn {

using index_t = int64_t;

// Strides of a [B, S, H, D] tensor (D contiguous).
struct SeqStrides {
  index_t batch = 0;
  index_t seq = 0;
  index_t head = 0;
};

// Strides of a [B, H, S] tensor.
struct RowStrides {
  index_t batch = 0;
  index_t head = 0;
  index_t seq = 0;
};

// The sizes of one block-attention call and its mask. `causal == false` means Mask.none();
// Mask.empty() never reaches a kernel (the host skips the launch).
struct Problem {
  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int head_dim = 0;
  bool causal = false;
  // Key j is visible to query i iff j <= i + causal_offset (top-left aligned). Any value.
  index_t causal_offset = 0;
  // Softmax scale applied to q.k (must be finite and > 0).
  float scale = 0.f;
};

// Forward, plain or accumulating ("fused ring step").
//
// accumulate == false: writes out (q's dtype) and lse (float32) for every query row.
// accumulate == true : out/lse are unused (may be null); the block's result is merged into the
//                      running float32 (out_acc, lse_acc) with the guarded stable merge.
struct FwdParams {
  Problem prob;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  SeqStrides q_stride, k_stride, v_stride;

  void* out = nullptr;
  SeqStrides out_stride;
  float* lse = nullptr;
  RowStrides lse_stride;

  bool accumulate = false;
  float* out_acc = nullptr;
  SeqStrides out_acc_stride;
  float* lse_acc = nullptr;
  RowStrides lse_acc_stride;
};

// Backward of one block. `out` and `lse` are the *final* ones (over every key the queries see,
// not only this block's), so the gradients below are exact pieces of the full gradients.
//
// accumulate == false: dq_acc, dk_acc, dv_acc are overwritten with this block's gradients.
// accumulate == true : this block's gradients are added to them.
// `delta` is a float32 workspace [B, Hq, Sq] (contiguous) that the preprocessing kernel fills
// with rowsum(dout * out).
struct BwdParams {
  Problem prob;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;   // q's dtype, or float32 when out_is_fp32
  const void* dout = nullptr;  // q's dtype
  SeqStrides q_stride, k_stride, v_stride, out_stride, dout_stride;
  bool out_is_fp32 = false;
  const float* lse = nullptr;
  RowStrides lse_stride;

  float* delta = nullptr;  // [B, Hq, Sq] contiguous workspace

  bool accumulate = false;
  float* dq_acc = nullptr;
  SeqStrides dq_stride;
  float* dk_acc = nullptr;
  SeqStrides dk_stride;
  float* dv_acc = nullptr;
  SeqStrides dv_stride;
};

// Standalone merge: fold (out_blk, lse_blk) into (out_acc, lse_acc), all [B, S, H, D] / [B, H, S].
struct MergeParams {
  int batch = 0;
  int seqlen = 0;
  int heads = 0;
  int head_dim = 0;  // any value >= 1
  float* out_acc = nullptr;
  SeqStrides out_acc_stride;
  float* lse_acc = nullptr;
  RowStrides lse_acc_stride;
  const void* out_blk = nullptr;  // float16, bfloat16 or float32 (see DType)
  SeqStrides out_blk_stride;
  const float* lse_blk = nullptr;
  RowStrides lse_blk_stride;
};

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace distattn
