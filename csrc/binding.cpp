// distattn._C: the Python binding of distattn's CUDA kernels (the only file that includes
// torch headers). Each function validates its arguments with TORCH_CHECK (a Python
// RuntimeError/ValueError/TypeError, never a crash), fills a plain params struct
// (distattn/params.h), re-validates it with distattn/checks.h and launches on the current
// CUDA stream of the tensors' device. Outputs are written into tensors the caller allocated,
// which may be strided views (slices of larger buffers).
//
// Built with DISTATTN_EMULATE (csrc/emulate/binding.cpp), the same file is distattn._emulate:
// the same kernels compiled for the host CTA emulator, on CPU tensors.
//
// Tensor layouts: q/dq [B, Sq, Hq, D]; out/dout [B, Sq, Hq, Dv]; k/dk [B, Sk, Hkv, D];
// v/dv [B, Sk, Hkv, Dv]; lse [B, Hq, Sq]. Dv (v's head dim) == D except for MLA pairs.
#if defined(DISTATTN_EMULATE)
#include <ATen/Parallel.h>
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "distattn/api.h"
#include "distattn/checks.h"

namespace {

using distattn::DType;
using distattn::index_t;

#if defined(DISTATTN_EMULATE)
constexpr const char* kDeviceKind = "a CPU";
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
// Launches run synchronously on the host, in parallel over torch's intra-op threads.
struct LaunchScope {
  explicit LaunchScope(const at::Tensor&) { distattn::emu::set_num_threads(at::get_num_threads()); }
  cudaStream_t stream() const { return nullptr; }
};
#else
constexpr const char* kDeviceKind = "a CUDA";
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
// The tensors' device and its current stream.
struct LaunchScope {
  explicit LaunchScope(const at::Tensor& t) : guard(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  c10::cuda::CUDAGuard guard;
};
#endif

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16 or float32, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(on_device(t), name, " must be ", kDeviceKind, " tensor, got device ",
                    t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but q is on ",
                    ref.device());
}

int64_t stride_or_zero(const at::Tensor& t, int dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

// [B, S, H, D] with a contiguous last dimension.
distattn::SeqStrides seq_strides(const at::Tensor& t, const char* name,
                                 std::vector<int64_t> shape) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [B, S, H, D], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.sizes().vec() == shape, name, " has shape ", t.sizes(), ", expected ",
                    at::IntArrayRef(shape));
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, name,
                    " must have a contiguous last (head_dim) dimension; pass .contiguous()");
  // A dimension of size 1 is never stepped over: report stride 0 so that whatever stride
  // torch gave it cannot fail the alignment checks.
  return {stride_or_zero(t, 0), stride_or_zero(t, 1), stride_or_zero(t, 2)};
}

// [B, H, S] float32, any strides.
distattn::RowStrides row_strides(const at::Tensor& t, const char* name,
                                 std::vector<int64_t> shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.sizes().vec() == shape, name, " has shape ", t.sizes(),
                    ", expected [B, H, S] = ", at::IntArrayRef(shape));
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                   t.scalar_type());
}

// Shapes of q/k/v and the Problem they describe.
distattn::Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             double scale, double softcap) {
  TORCH_CHECK_VALUE(on_device(q), "q must be ", kDeviceKind, " tensor, got device ",
                    q.device());
  check_device(k, "k", q);
  check_device(v, "v", q);
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "q, k, v must be 4-D [B, S, H, D]");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k and v must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
                    "k and v must have the same [B, Sk, Hkv], got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3),
                    "k must be [B, Sk, Hkv, D] with q's B and D; q ", q.sizes(), ", k ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "heads of q (", q.size(2),
                    ") must be a multiple of heads of k/v (", k.size(2), ")");
  TORCH_CHECK_VALUE(q.size(1) < (int64_t(1) << 31) && k.size(1) < (int64_t(1) << 31),
                    "sequence lengths must be < 2^31");
  distattn::Problem p;
  p.batch = int(q.size(0));
  p.seqlen_q = int(q.size(1));
  p.heads_q = int(q.size(2));
  p.head_dim = int(q.size(3));
  p.head_dim_v = int(v.size(3));
  p.seqlen_k = int(k.size(1));
  p.heads_kv = int(k.size(2));
  p.scale = float(scale);
  p.softcap = float(softcap);
  TORCH_CHECK_VALUE(distattn::head_dims_supported(p.head_dim, p.head_dim_v), "head_dim ",
                    p.head_dim, p.head_dim_v == p.head_dim
                        ? std::string()
                        : " with v's head_dim " + std::to_string(p.head_dim_v),
                    " has no compiled kernel (head_dim_pairs() of the extension lists the "
                    "compiled (D, Dv) pairs)");
  return p;
}

// [B, Sq, Hq, Dv]: the shape of out, dout and out_acc (q's rows and heads, v's head dim).
std::vector<int64_t> out_shape(const at::Tensor& q, const at::Tensor& v) {
  return {q.size(0), q.size(1), q.size(2), v.size(3)};
}

using Named = std::pair<const at::Tensor*, const char*>;

distattn::MemView view_of(const at::Tensor& t) {
  distattn::MemView v;
  v.ptr = t.data_ptr();
  v.ndim = int(t.dim());
  v.elem_bytes = int(t.element_size());
  for (int d = 0; d < v.ndim && d < distattn::kMaxViewDims; ++d) {
    v.sizes[d] = t.size(d);
    v.strides[d] = t.stride(d);
  }
  return v;
}

// Outputs are written while inputs are read, by many thread blocks at once: an output may not
// share memory with an input, with another output, or with itself (an expanded view).
void check_no_alias(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  for (auto it = outputs.begin(); it != outputs.end(); ++it) {
    const auto& [out, name] = *it;
    TORCH_CHECK_VALUE(at::has_internal_overlap(*out) != at::MemOverlap::Yes, name,
                      " has elements that share memory (an expanded view); pass a tensor that "
                      "owns each of its elements");
    const distattn::MemView vo = view_of(*out);
    auto refuse_if_shared = [&](const Named& other) {
      TORCH_CHECK_VALUE(!distattn::may_overlap(vo, view_of(*other.first)), name,
                        " shares memory with ", other.second, ": an output may not alias an "
                        "input or another output; pass a separate tensor");
    };
    for (auto jt = std::next(it); jt != outputs.end(); ++jt) refuse_if_shared(*jt);
    for (const Named& in : inputs) refuse_if_shared(in);
  }
}

bool is_empty(const distattn::Problem& p) {
  return p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "distattn ", what, " launch failed: ",
              cudaGetErrorString(err));
}

// The part of FwdParams both forward entry points share: the checked problem and q/k/v.
// A piece as Python passes it: (q0, q1, k0, k1, lo, hi), rows [q0, q1) and keys [k0, k1) of
// the call's tensors, key j visible to query i iff lo <= (j - k0) - (i - q0) <= hi (piece
// coordinates); lo / hi None: unbounded.
using PieceTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, std::optional<int64_t>,
                              std::optional<int64_t>>;

std::vector<distattn::PieceParams> pieces_of(const std::vector<PieceTuple>& in) {
  std::vector<distattn::PieceParams> out;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const auto& [q0, q1, k0, k1, lo, hi] = in[i];
    TORCH_CHECK_VALUE(q0 < q1 && k0 < k1 && q1 - q0 < (int64_t(1) << 31) &&
                          k1 - k0 < (int64_t(1) << 31),
                      "piece ", i, " (", q0, ", ", q1, ", ", k0, ", ", k1, ") needs q0 < q1 "
                      "and k0 < k1 (drop pieces that show nothing)");
    distattn::PieceParams c;
    c.q0 = q0;
    c.k0 = k0;
    c.seqlen_q = int(q1 - q0);
    c.seqlen_k = int(k1 - k0);
    const int64_t big = distattn::kUnbounded;
    c.band.lo = lo ? std::max(*lo, -big) : -big;
    c.band.hi = hi ? std::min(*hi, big) : big;
    out.push_back(c);
  }
  return out;
}

// Rows (keys == false) or keys the pieces cover, assuming they are disjoint.
int64_t covered(const std::vector<distattn::PieceParams>& pieces, bool keys) {
  int64_t n = 0;
  for (const auto& c : pieces) n += keys ? c.seqlen_k : c.seqlen_q;
  return n;
}

// Checks every piece and their disjointness (rows, and keys with keys_too), then runs
// `launch(params)` once per kMaxPieces pieces.
template <typename Params, typename Launch>
void launch_pieces(Params p, const std::vector<distattn::PieceParams>& pieces, bool keys_too,
                   const char* what, Launch launch) {
  const std::string overlap =
      distattn::check_pieces_disjoint(pieces.data(), int(pieces.size()), keys_too);
  TORCH_CHECK_VALUE(overlap.empty(), "distattn ", what, ": ", overlap);
  for (std::size_t start = 0; start < pieces.size(); start += distattn::kMaxPieces) {
    const std::size_t n = std::min<std::size_t>(distattn::kMaxPieces, pieces.size() - start);
    p.prob.num_pieces = int(n);
    for (std::size_t i = 0; i < n; ++i) p.prob.pieces[i] = pieces[start + i];
    launch(p);
  }
}

distattn::FwdParams fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, double softcap) {
  distattn::FwdParams p;
  p.prob = problem_of(q, k, v, scale, softcap);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = seq_strides(q, "q", q.sizes().vec());
  p.k_stride = seq_strides(k, "k", k.sizes().vec());
  p.v_stride = seq_strides(v, "v", v.sizes().vec());
  return p;
}

// out, lse <- attention(q, k, v) for this block, under its pieces (rows disjoint); rows
// outside every piece get out = 0, lse = -inf.
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
         at::Tensor& lse, double scale, const std::vector<PieceTuple>& piece_list,
         double softcap) {
  distattn::FwdParams p = fwd_inputs(q, k, v, scale, softcap);
  const std::vector<distattn::PieceParams> pieces = pieces_of(piece_list);
  const distattn::Problem& pr = p.prob;
  check_device(out, "out", q);
  check_device(lse, "lse", q);
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), "out must have q's dtype ",
                   q.scalar_type(), ", got ", out.scalar_type());
  p.out = out.data_ptr();
  p.out_stride = seq_strides(out, "out", out_shape(q, v));
  p.lse = lse.data_ptr<float>();
  p.lse_stride = row_strides(lse, "lse", {q.size(0), q.size(2), q.size(1)});
  check_no_alias({{&out, "out"}, {&lse, "lse"}}, {{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (is_empty(pr)) return;
  if (pr.seqlen_k == 0 || covered(pieces, false) < pr.seqlen_q) {  // rows that see nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (pr.seqlen_k == 0) return;
  const LaunchScope scope(q);
  launch_pieces(p, pieces, false, "fwd", [&](const distattn::FwdParams& lp) {
    const std::string err = distattn::check_fwd(lp, dtype_of(q, "q"));
    TORCH_CHECK_VALUE(err.empty(), "distattn fwd: ", err);
    check_launch(distattn::launch_fwd(lp, dtype_of(q, "q"), scope.stream()), "fwd");
  });
}

// (out_acc, lse_acc) <- merge((out_acc, lse_acc), attention(q, k, v)): the fused ring step.
// Pieces with disjoint rows; rows outside every piece are left untouched.
void fwd_acc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             at::Tensor& out_acc, at::Tensor& lse_acc, double scale,
             const std::vector<PieceTuple>& piece_list, double softcap) {
  distattn::FwdParams p = fwd_inputs(q, k, v, scale, softcap);
  const std::vector<distattn::PieceParams> pieces = pieces_of(piece_list);
  const distattn::Problem& pr = p.prob;
  check_device(out_acc, "out_acc", q);
  check_device(lse_acc, "lse_acc", q);
  check_float32(out_acc, "out_acc");
  p.accumulate = true;
  p.out_acc = out_acc.data_ptr<float>();
  p.out_acc_stride = seq_strides(out_acc, "out_acc", out_shape(q, v));
  p.lse_acc = lse_acc.data_ptr<float>();
  p.lse_acc_stride = row_strides(lse_acc, "lse_acc", {q.size(0), q.size(2), q.size(1)});
  check_no_alias({{&out_acc, "out_acc"}, {&lse_acc, "lse_acc"}},
                 {{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (is_empty(pr) || pr.seqlen_k == 0) return;
  const LaunchScope scope(q);
  launch_pieces(p, pieces, false, "fwd_acc", [&](const distattn::FwdParams& lp) {
    const std::string err = distattn::check_fwd(lp, dtype_of(q, "q"));
    TORCH_CHECK_VALUE(err.empty(), "distattn fwd_acc: ", err);
    check_launch(distattn::launch_fwd(lp, dtype_of(q, "q"), scope.stream()), "fwd_acc");
  });
}

// dq, dk, dv (float32) <- (or +=, when accumulate) the gradients of this block, under its
// pieces (rows disjoint, keys disjoint); rows and keys outside every piece get 0 (or stay).
void bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
         at::Tensor& dv, double scale, const std::vector<PieceTuple>& piece_list,
         double softcap, bool accumulate) {
  distattn::Problem pr = problem_of(q, k, v, scale, softcap);
  const std::vector<distattn::PieceParams> pieces = pieces_of(piece_list);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{dout, "dout"}, {out, "out"},
                         {lse, "lse"}, {dq, "dq"}, {dk, "dk"}, {dv, "dv"}})
    check_device(t, name, q);
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type(), "dout must have q's dtype ",
                   q.scalar_type(), ", got ", dout.scalar_type());
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat,
                   "out must have q's dtype or float32, got ", out.scalar_type());
  check_float32(dq, "dq");
  check_float32(dk, "dk");
  check_float32(dv, "dv");
  distattn::BwdParams p;
  p.prob = pr;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.out_is_fp32 = out.scalar_type() == at::kFloat;
  p.q_stride = seq_strides(q, "q", q.sizes().vec());
  p.k_stride = seq_strides(k, "k", k.sizes().vec());
  p.v_stride = seq_strides(v, "v", v.sizes().vec());
  p.out_stride = seq_strides(out, "out", out_shape(q, v));
  p.dout_stride = seq_strides(dout, "dout", out_shape(q, v));
  p.lse = lse.data_ptr<float>();
  p.lse_stride = row_strides(lse, "lse", {q.size(0), q.size(2), q.size(1)});
  p.accumulate = accumulate;
  p.dq_acc = dq.data_ptr<float>();
  p.dq_stride = seq_strides(dq, "dq", q.sizes().vec());
  p.dk_acc = dk.data_ptr<float>();
  p.dk_stride = seq_strides(dk, "dk", k.sizes().vec());
  p.dv_acc = dv.data_ptr<float>();
  p.dv_stride = seq_strides(dv, "dv", v.sizes().vec());
  check_no_alias({{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}},
                 {{&dout, "dout"}, {&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}});
  if (!accumulate) {  // what no piece covers is zero
    if (pr.seqlen_k == 0 || covered(pieces, false) < pr.seqlen_q) dq.zero_();
    if (pr.seqlen_k == 0 || covered(pieces, true) < pr.seqlen_k) {
      dk.zero_();
      dv.zero_();
    }
  }
  if (is_empty(pr) || pr.seqlen_k == 0 || pieces.empty()) return;
  const LaunchScope scope(q);
  at::Tensor delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  launch_pieces(p, pieces, true, "bwd", [&](const distattn::BwdParams& lp) {
    const std::string err = distattn::check_bwd(lp, dtype_of(q, "q"));
    TORCH_CHECK_VALUE(err.empty(), "distattn bwd: ", err);
    check_launch(distattn::launch_bwd(lp, dtype_of(q, "q"), scope.stream()), "bwd");
  });
}

// (out_acc, lse_acc) <- merge((out_acc, lse_acc), (out_blk, lse_blk)).
void merge(at::Tensor& out_acc, at::Tensor& lse_acc, const at::Tensor& out_blk,
           const at::Tensor& lse_blk) {
  TORCH_CHECK_VALUE(on_device(out_acc), "out_acc must be ", kDeviceKind, " tensor");
  check_device(lse_acc, "lse_acc", out_acc);
  check_device(out_blk, "out_blk", out_acc);
  check_device(lse_blk, "lse_blk", out_acc);
  check_float32(out_acc, "out_acc");
  TORCH_CHECK_VALUE(out_acc.dim() == 4, "out_acc must be 4-D [B, S, H, D]");
  const auto shape = out_acc.sizes().vec();
  distattn::MergeParams p;
  p.batch = int(shape[0]);
  p.seqlen = int(shape[1]);
  p.heads = int(shape[2]);
  p.head_dim = int(shape[3]);
  p.out_acc = out_acc.data_ptr<float>();
  p.out_acc_stride = seq_strides(out_acc, "out_acc", shape);
  p.lse_acc = lse_acc.data_ptr<float>();
  p.lse_acc_stride = row_strides(lse_acc, "lse_acc", {shape[0], shape[2], shape[1]});
  p.out_blk = out_blk.data_ptr();
  p.out_blk_stride = seq_strides(out_blk, "out_blk", shape);
  p.lse_blk = lse_blk.data_ptr<float>();
  p.lse_blk_stride = row_strides(lse_blk, "lse_blk", {shape[0], shape[2], shape[1]});
  check_no_alias({{&out_acc, "out_acc"}, {&lse_acc, "lse_acc"}},
                 {{&out_blk, "out_blk"}, {&lse_blk, "lse_blk"}});
  if (out_acc.numel() == 0) return;
  const std::string err = distattn::check_merge(p);
  TORCH_CHECK_VALUE(err.empty(), "distattn merge: ", err);
  const LaunchScope scope(out_acc);
  check_launch(distattn::launch_merge(p, dtype_of(out_blk, "out_blk"), scope.stream()), "merge");
}

// The SM architectures the kernels were compiled for (setup.py passes them as
// DISTATTN_CUDA_ARCHS_CSV, e.g. 90a,80); empty when unknown or emulated.
#define DISTATTN_STR(...) #__VA_ARGS__
#define DISTATTN_XSTR(...) DISTATTN_STR(__VA_ARGS__)
std::vector<std::string> archs() {
  std::vector<std::string> out;
#if defined(DISTATTN_CUDA_ARCHS_CSV) && !defined(DISTATTN_EMULATE)
  const std::string csv = DISTATTN_XSTR(DISTATTN_CUDA_ARCHS_CSV);
  std::size_t start = 0;
  while (start <= csv.size()) {
    const std::size_t end = std::min(csv.find(',', start), csv.size());
    if (end > start) out.push_back(csv.substr(start, end - start));
    start = end + 1;
  }
#endif
  return out;
}

// Head dims with compiled kernels for q, k and v alike (D == Dv).
std::vector<int64_t> head_dims() {
  std::vector<int64_t> dims;
  for (int d : {64, 128, 256})
    if (distattn::head_dims_supported(d, d)) dims.push_back(d);
  return dims;
}

// Every compiled (D, Dv) pair: q/k head dim, v/out head dim (the D == Dv ones and MLA's).
std::vector<std::pair<int64_t, int64_t>> head_dim_pairs() {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (auto [d, dv] : {std::pair<int, int>{64, 64}, {128, 128}, {192, 128}, {256, 256}})
    if (distattn::head_dims_supported(d, dv)) pairs.emplace_back(d, dv);
  return pairs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(DISTATTN_EMULATE)
  m.doc() = "distattn CUDA kernels compiled for the host CTA emulator (backend 'emulate')";
#else
  m.doc() = "distattn CUDA kernels: block attention forward/backward with LSE, fused ring step";
#endif
  m.def("fwd", &fwd, "out, lse <- attention(q, k, v) under pieces (q0, q1, k0, k1, lo, hi)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("scale"), py::arg("pieces"), py::arg("softcap"));
  m.def("fwd_acc", &fwd_acc, "(out_acc, lse_acc) <- merge(acc, attention(q, k, v))",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out_acc"), py::arg("lse_acc"),
        py::arg("scale"), py::arg("pieces"), py::arg("softcap"));
  m.def("bwd", &bwd, "dq, dk, dv (float32) <- or += block gradients", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("scale"), py::arg("pieces"), py::arg("softcap"),
        py::arg("accumulate"));
  m.attr("max_pieces_per_launch") = distattn::kMaxPieces;
#if defined(DISTATTN_EMULATE)
  m.def("launch_count", &distattn::emu::launch_count, "kernel grids run so far (emulator)");
  m.def("set_arch", &distattn::set_emulated_arch, py::arg("arch"),
        "which kernels launches run: 80 (mma.sync) or 90 (the Hopper forward, dQ and dK/dV "
        "kernels, D = Dv = 64/128; others keep mma.sync)");
  m.def("arch", &distattn::emulated_arch, "the arch set by set_arch (default 80)");
  m.def("last_kernel", &distattn::emu::last_kernel, "name of the kernel of the last grid run");
  m.def("recent_kernels", &distattn::emu::recent_kernels,
        "names of the kernels of the last (up to 8) grids run, oldest first");
#endif
  m.def("merge", &merge, "(out_acc, lse_acc) <- merge(acc, (out_blk, lse_blk))",
        py::arg("out_acc"), py::arg("lse_acc"), py::arg("out_blk"), py::arg("lse_blk"));
  m.def("head_dims", &head_dims, "head dims with compiled kernels");
  m.def("head_dim_pairs", &head_dim_pairs,
        "(D, Dv) pairs with compiled kernels: q/k head dim, v/out head dim");
  m.def("archs", &archs, "SM architectures with compiled kernels, e.g. ['90a', '80']");
}
