// Plain parameter structs for distattn's CUDA kernels.
//
// These structs are the whole interface between the host (the torch binding, the C++ tests)
// and the kernels: pointers, sizes and element strides, nothing else. They include no torch
// and no CUDA header, so host-only code (tests/cpp) can build and check them with g++.
//
// Layouts (flash-attn's, docs/DESIGN.md, "Backends"):
//   q, dq_acc                       [B, Sq, Hq, D]
//   out, dout, out_acc              [B, Sq, Hq, Dv]
//   k, dk_acc                       [B, Sk, Hkv, D]        Hq % Hkv == 0, head h reads h / (Hq/Hkv)
//   v, dv_acc                       [B, Sk, Hkv, Dv]
//   lse, lse_acc, delta             [B, Hq, Sq]            float32, natural log
// D is q/k's head dim (Problem::head_dim), Dv v's and out's (Problem::head_dim_v): equal except
// for MLA (DeepSeek V2/V3, Kimi K2: D = 192, Dv = 128).
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

// A diagonal band: key j is visible to query i iff lo <= j - i <= hi. kUnbounded on either
// side means no bound there (Mask.none() is both unbounded, Mask.causal(offset) is
// {-kUnbounded, offset}). Large enough for any sequence, small enough that row + hi and
// col - lo never overflow.
constexpr index_t kUnbounded = index_t(1) << 62;
struct Band {
  index_t lo = -kUnbounded;
  index_t hi = kUnbounded;
};

// One piece of a block (the mask algebra of distattn/kernels/mask.py): query rows
// [q0, q0 + seqlen_q) and keys [k0, k0 + seqlen_k) of the call's tensors, with a band in the
// piece's own coordinates (row 0 = query q0, column 0 = key k0).
struct PieceParams {
  index_t q0 = 0;
  index_t k0 = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  Band band;
  // First CTA of the piece in the launch's grid (query tiles for the forward and dQ kernels,
  // key tiles for the dK/dV kernel). Filled by the launchers (assign_tiles in tiling.h).
  int q_tile_begin = 0;
  int k_tile_begin = 0;
};

// Pieces one launch runs ("varlen"): their query rows are disjoint, and for the backward
// their keys too, so that every output row is owned by one CTA. More pieces, or pieces that
// share rows, take several launches (the binding splits; the fused epilogue merges).
constexpr int kMaxPieces = 32;

// The sizes of one block-attention call and its mask. Mask.empty() never reaches a kernel
// (the host skips the launch); rows outside every piece are never touched.
struct Problem {
  int batch = 0;
  int seqlen_q = 0;  // rows of q / out / lse
  int seqlen_k = 0;  // rows of k / v
  int heads_q = 0;
  int heads_kv = 0;
  int head_dim = 0;    // D: q, k, dq, dk
  int head_dim_v = 0;  // Dv: v, out, dout, dv (== head_dim except for MLA)
  // Softmax scale applied to q.k (must be finite and > 0).
  float scale = 0.f;
  // softcap c > 0: scores s = scale * q.k become c * tanh(s / c) before the softmax; 0: off.
  float softcap = 0.f;
  int num_pieces = 0;
  PieceParams pieces[kMaxPieces];
};

// The whole block as one piece with `band` (what Mask.none() / causal / band(lo, hi) are).
inline void set_single_piece(Problem& p, Band band) {
  p.num_pieces = 1;
  p.pieces[0] = PieceParams();
  p.pieces[0].seqlen_q = p.seqlen_q;
  p.pieces[0].seqlen_k = p.seqlen_k;
  p.pieces[0].band = band;
}

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
