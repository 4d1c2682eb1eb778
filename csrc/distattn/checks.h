// Host-side validation of kernel parameters.
//
// Each check returns an empty string when the parameters can be launched, else one sentence
// that names the offending argument and what it needs. The torch binding turns a non-empty
// answer into a Python exception (before any launch); the C++ tests call these directly.
// Header-only and free of CUDA and torch, so g++ can build the tests without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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
  if (p.head_dim_v == p.head_dim && !head_dims_supported(p.head_dim, p.head_dim_v))
    return "head_dim " + std::to_string(p.head_dim) +
           " has no compiled kernel (enabled by DISTATTN_HD<D> in csrc/distattn/tiling.h)";
  if (!head_dims_supported(p.head_dim, p.head_dim_v))
    return "head_dim " + std::to_string(p.head_dim) + " with head_dim_v " +
           std::to_string(p.head_dim_v) + " (v's head dim) has no compiled kernel (MLA pairs "
           "are enabled by DISTATTN_HD<D>_<Dv> in csrc/distattn/tiling.h)";
  if (!(std::isfinite(p.scale) && p.scale > 0.f))
    return "softmax scale must be finite and > 0";
  if (!(std::isfinite(p.softcap) && p.softcap >= 0.f))
    return "softcap must be finite and >= 0 (0: off)";
  if (p.heads_q > kMaxGridYZ || p.batch > kMaxGridYZ)
    return "heads_q and batch must be <= 65535 (CUDA grid limit)";
  if (p.num_pieces < 1 || p.num_pieces > kMaxPieces)
    return "a launch runs 1 to " + std::to_string(kMaxPieces) + " pieces, got " +
           std::to_string(p.num_pieces) + " (split the pieces over several launches)";
  for (int i = 0; i < p.num_pieces; ++i) {
    const PieceParams& c = p.pieces[i];
    const std::string which = "piece " + std::to_string(i);
    if (c.seqlen_q < 1 || c.seqlen_k < 1)
      return which + " is empty (drop pieces that show nothing before the launch)";
    if (c.q0 < 0 || c.q0 + c.seqlen_q > p.seqlen_q)
      return which + ": query rows [" + std::to_string(c.q0) + ", " +
             std::to_string(c.q0 + c.seqlen_q) + ") are not inside [0, " +
             std::to_string(p.seqlen_q) + ")";
    if (c.k0 < 0 || c.k0 + c.seqlen_k > p.seqlen_k)
      return which + ": keys [" + std::to_string(c.k0) + ", " +
             std::to_string(c.k0 + c.seqlen_k) + ") are not inside [0, " +
             std::to_string(p.seqlen_k) + ")";
    if (c.band.lo < -kUnbounded || c.band.hi > kUnbounded || c.band.lo > c.band.hi)
      return which + ": band lo <= j - i <= hi needs lo <= hi (within +-2^62)";
  }
  return {};
}

namespace detail {
inline bool overlap(index_t a0, index_t a1, index_t b0, index_t b1) { return a0 < b1 && b0 < a1; }
}  // namespace detail

// Pieces of one launch may not share query rows (each output row has one owner), nor, for
// the backward, keys (each dK/dV row has one owner).
inline std::string check_pieces_disjoint(const PieceParams* pieces, int n, bool keys_too) {
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      const PieceParams &a = pieces[i], &b = pieces[j];
      const bool rows = detail::overlap(a.q0, a.q0 + a.seqlen_q, b.q0, b.q0 + b.seqlen_q);
      const bool keys = detail::overlap(a.k0, a.k0 + a.seqlen_k, b.k0, b.k0 + b.seqlen_k);
      if (rows || (keys_too && keys))
        return "pieces " + std::to_string(i) + " and " + std::to_string(j) + " share " +
               (rows ? "query rows" : "keys") + "; one launch runs pieces with disjoint rows" +
               (keys_too ? " and keys" : "") + " (run the others in another launch)";
    }
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
  if (e.empty()) e = check_pieces_disjoint(p.prob.pieces, p.prob.num_pieces, false);
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
  if (e.empty()) e = check_pieces_disjoint(p.prob.pieces, p.prob.num_pieces, true);
  if (e.empty()) e = detail::check_vector_input("dout", p.dout, p.dout_stride, eb);
  if (e.empty() && p.out == nullptr) e = "out is null";
  if (e.empty() && p.lse == nullptr) e = "lse is null";
  if (e.empty() && p.delta == nullptr) e = "delta workspace is null";
  if (e.empty()) e = detail::check_acc("dq", p.dq_acc, p.dq_stride);
  if (e.empty()) e = detail::check_acc("dk", p.dk_acc, p.dk_stride);
  if (e.empty()) e = detail::check_acc("dv", p.dv_acc, p.dv_stride);
  return e;
}

// ---- aliasing ----------------------------------------------------------------------------------
// A strided view of memory: the elements at ptr + sum_d i_d * strides[d] (0 <= i_d < sizes[d]),
// each elem_bytes long; strides in elements.
constexpr int kMaxViewDims = 6;
struct MemView {
  const void* ptr = nullptr;
  int ndim = 0;
  index_t sizes[kMaxViewDims] = {};
  index_t strides[kMaxViewDims] = {};
  int elem_bytes = 0;
};

namespace detail {
// Is there a coefficient c_d in [lo[d], hi[d]] per dimension d >= k with
// |target - sum_d c_d * strides[d]| < elem? `reach[k]` bounds what dimensions k.. can add.
// `budget` caps the search; running out answers true (cannot rule the overlap out).
inline bool offset_reachable(index_t target, int k, int n, const index_t* lo_c,
                             const index_t* hi_c, const index_t* strides, const index_t* reach,
                             index_t elem, long& budget) {
  if (k == n) return std::llabs(target) < elem;
  if (--budget < 0) return true;
  const index_t s = strides[k], r = reach[k + 1];  // s > 0, dimensions sorted by stride
  // c * s within [target - r, target + r], lo_c <= c <= hi_c.
  auto floor_div = [](index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  const index_t lo = std::max(lo_c[k], -floor_div(-(target - r), s));
  const index_t hi = std::min(hi_c[k], floor_div(target + r, s));
  for (index_t c = lo; c <= hi; ++c)
    if (offset_reachable(target - c * s, k + 1, n, lo_c, hi_c, strides, reach, elem, budget))
      return true;
  return false;
}
}  // namespace detail

// Whether two views may share a byte. Exact for views with the same element size and strides,
// whatever their sizes (e.g. dK and dV as two slices of one packed buffer, also MLA's
// [..., :D] and [..., D:D + Dv] of one buffer: false); otherwise true whenever their address
// ranges intersect (conservative).
inline bool may_overlap(const MemView& a, const MemView& b) {
  auto numel = [](const MemView& v) {
    index_t n = 1;
    for (int d = 0; d < v.ndim; ++d) n *= v.sizes[d];
    return n;
  };
  if (numel(a) == 0 || numel(b) == 0) return false;
  auto span = [](const MemView& v, index_t& lo, index_t& hi) {
    lo = index_t(reinterpret_cast<std::uintptr_t>(v.ptr));
    hi = lo + v.elem_bytes;
    for (int d = 0; d < v.ndim; ++d) {
      const index_t ext = (v.sizes[d] - 1) * v.strides[d] * v.elem_bytes;
      (ext < 0 ? lo : hi) += ext;
    }
  };
  index_t alo, ahi, blo, bhi;
  span(a, alo, ahi);
  span(b, blo, bhi);
  if (ahi <= blo || bhi <= alo) return false;
  // Same strides wherever both views step (a dimension of size 1 is never stepped over).
  bool same_strides = a.elem_bytes == b.elem_bytes && a.ndim == b.ndim;
  for (int d = 0; same_strides && d < a.ndim; ++d)
    same_strides = a.sizes[d] == 1 || b.sizes[d] == 1 || a.strides[d] == b.strides[d];
  if (!same_strides) return true;
  // a's element i sits at a.ptr + sum_d i_d * stride_d, b's element j at b.ptr + sum_d j_d *
  // stride_d: they overlap iff delta = b.ptr - a.ptr is (within an element) some
  // sum_d (i_d - j_d) * stride_d, with 0 <= i_d < a.sizes[d] and 0 <= j_d < b.sizes[d]. In
  // units of |stride_d| the coefficient runs over [-(b.sizes[d] - 1), a.sizes[d] - 1], mirrored
  // for a negative stride.
  index_t lo_c[kMaxViewDims], hi_c[kMaxViewDims], strides[kMaxViewDims];
  index_t reach[kMaxViewDims + 1];
  int n = 0;
  for (int d = 0; d < a.ndim; ++d) {
    if (a.sizes[d] == 1 && b.sizes[d] == 1) continue;
    const index_t stride = a.sizes[d] > 1 ? a.strides[d] : b.strides[d];
    if (stride == 0) return true;  // an expanded view overlaps everything it touches
    const bool pos = stride > 0;
    lo_c[n] = -((pos ? b.sizes[d] : a.sizes[d]) - 1);
    hi_c[n] = (pos ? a.sizes[d] : b.sizes[d]) - 1;
    strides[n] = std::llabs(stride) * a.elem_bytes;
    ++n;
  }
  for (int i = 0; i < n; ++i)  // by stride, largest first
    for (int j = i + 1; j < n; ++j)
      if (strides[j] > strides[i]) {
        std::swap(strides[i], strides[j]);
        std::swap(lo_c[i], lo_c[j]);
        std::swap(hi_c[i], hi_c[j]);
      }
  reach[n] = a.elem_bytes - 1;
  for (int d = n - 1; d >= 0; --d)
    reach[d] = reach[d + 1] + std::max(-lo_c[d], hi_c[d]) * strides[d];
  const index_t delta = index_t(reinterpret_cast<std::uintptr_t>(b.ptr)) -
                        index_t(reinterpret_cast<std::uintptr_t>(a.ptr));
  long budget = 100000;
  return detail::offset_reachable(delta, 0, n, lo_c, hi_c, strides, reach, a.elem_bytes,
                                  budget);
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
