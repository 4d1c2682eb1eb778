// Parameter checks (csrc/distattn/checks.h) and launch configuration (tiling.h):
//   * valid forward / accumulate / backward / merge parameters pass;
//   * each kind of bad parameter is refused with a message naming the argument;
//   * grids cover every query / key row, CTAs have 128 threads, shared memory fits sm_80's
//     opt-in limit for every head dim pair (64, 128, the prepared 256 and MLA's (192, 128)),
//     and the 99 KiB of sm_86 / sm_89 for the compiled ones; tile shapes are what the MMA
//     code assumes (multiples of 16, 16 rows per warp); the tiles of D = Dv = 64 / 128 are the
//     ones their kernels were tuned and gated with;
//   * MLA: (D, Dv) = (192, 128) parameters pass, other pairs are refused naming head_dim_v;
//   * may_overlap (the binding's refusal of aliased outputs) against brute force on random
//     views of one buffer: never misses an overlap, and exact for views of the same layout.
#include <random>
#include <set>
#include <string>
#include <vector>

#include "distattn/checks.h"
#include "harness.h"

using namespace distattn;

namespace {

bool mentions(const std::string& msg, const std::string& word) {
  return msg.find(word) != std::string::npos;
}

// A 16-byte-aligned fake address (never dereferenced).
alignas(16) char g_buffer[1 << 12];
void* addr(size_t offset_bytes = 0) { return g_buffer + offset_bytes; }

Problem good_problem() {
  Problem p;
  p.batch = 2;
  p.seqlen_q = 1000;
  p.seqlen_k = 4097;
  p.heads_q = 8;
  p.heads_kv = 2;
  p.head_dim = 128;
  p.head_dim_v = 128;
  p.scale = 0.088f;
  set_single_piece(p, Band{-kUnbounded, -3});  // causal(-3)
  return p;
}

SeqStrides contiguous(int d, int s, int h) { return {index_t(s) * h * d, index_t(h) * d, d}; }

FwdParams good_fwd() {
  FwdParams f;
  f.prob = good_problem();
  f.q = f.k = f.v = addr();
  f.q_stride = contiguous(f.prob.head_dim, f.prob.seqlen_q, f.prob.heads_q);
  f.k_stride = contiguous(f.prob.head_dim, f.prob.seqlen_k, f.prob.heads_kv);
  f.v_stride = contiguous(f.prob.head_dim_v, f.prob.seqlen_k, f.prob.heads_kv);
  f.out = addr();
  f.out_stride = contiguous(f.prob.head_dim_v, f.prob.seqlen_q, f.prob.heads_q);
  f.lse = reinterpret_cast<float*>(addr());
  return f;
}

BwdParams good_bwd() {
  BwdParams b;
  const FwdParams f = good_fwd();
  b.prob = f.prob;
  b.q = b.k = b.v = b.out = b.dout = addr();
  b.q_stride = b.dq_stride = f.q_stride;
  b.out_stride = b.dout_stride = f.out_stride;
  b.k_stride = b.dk_stride = f.k_stride;
  b.v_stride = b.dv_stride = f.v_stride;
  b.lse = reinterpret_cast<const float*>(addr());
  b.delta = b.dq_acc = b.dk_acc = b.dv_acc = reinterpret_cast<float*>(addr());
  return b;
}

void test_checks() {
  CHECK(check_fwd(good_fwd(), DType::kFloat16).empty()) << check_fwd(good_fwd(), DType::kFloat16);
  CHECK(check_fwd(good_fwd(), DType::kBFloat16).empty());
  CHECK(check_bwd(good_bwd(), DType::kBFloat16).empty()) << check_bwd(good_bwd(), DType::kBFloat16);
  {
    FwdParams f = good_fwd();
    f.accumulate = true;
    f.out = nullptr;
    f.lse = nullptr;
    CHECK(mentions(check_fwd(f, DType::kFloat16), "out_acc"));
    f.out_acc = reinterpret_cast<float*>(addr());
    f.out_acc_stride = f.q_stride;
    f.lse_acc = reinterpret_cast<float*>(addr());
    CHECK(check_fwd(f, DType::kFloat16).empty()) << check_fwd(f, DType::kFloat16);
    f.out_acc = reinterpret_cast<float*>(addr(4));  // not 8-byte aligned
    CHECK(mentions(check_fwd(f, DType::kFloat16), "out_acc"));
  }

  struct Bad {
    const char* what;
    void (*edit)(FwdParams&);
    const char* expect;
  };
  const Bad bad[] = {
      {"fp32 inputs", [](FwdParams&) {}, "float16"},
      {"head_dim 96", [](FwdParams& f) { f.prob.head_dim = 96; }, "head_dim"},
      {"head_dim 256 (off)",
       [](FwdParams& f) { f.prob.head_dim = f.prob.head_dim_v = 256; }, "head_dim 256 has no"},
      {"head_dim_v 64 with 128", [](FwdParams& f) { f.prob.head_dim_v = 64; }, "head_dim_v 64"},
      {"MLA pair swapped (128, 192)", [](FwdParams& f) { f.prob.head_dim_v = 192; },
       "head_dim_v 192"},
      {"head_dim_v 0", [](FwdParams& f) { f.prob.head_dim_v = 0; }, "head_dim_v 0"},
      {"GQA ratio", [](FwdParams& f) { f.prob.heads_kv = 3; }, "heads_kv"},
      {"zero batch", [](FwdParams& f) { f.prob.batch = 0; }, "positive"},
      {"negative scale", [](FwdParams& f) { f.prob.scale = -1.f; }, "scale"},
      {"NaN scale", [](FwdParams& f) { f.prob.scale = NAN; }, "scale"},
      {"too many heads", [](FwdParams& f) { f.prob.heads_q = 70000; f.prob.heads_kv = 1; }, "65535"},
      {"q misaligned", [](FwdParams& f) { f.q = addr(2); }, "q must be 16-byte"},
      {"k seq stride", [](FwdParams& f) { f.k_stride.seq = 130; }, "k must be 16-byte"},
      {"v head stride", [](FwdParams& f) { f.v_stride.head = 4; }, "v must be 16-byte"},
      {"null v", [](FwdParams& f) { f.v = nullptr; }, "v is null"},
      {"out odd stride", [](FwdParams& f) { f.out_stride.seq = 1025; }, "out must be"},
      {"null lse", [](FwdParams& f) { f.lse = nullptr; }, "lse is null"},
      {"NaN softcap", [](FwdParams& f) { f.prob.softcap = NAN; }, "softcap"},
      {"negative softcap", [](FwdParams& f) { f.prob.softcap = -1.f; }, "softcap"},
      {"no piece", [](FwdParams& f) { f.prob.num_pieces = 0; }, "1 to 32 pieces"},
      {"33 pieces", [](FwdParams& f) { f.prob.num_pieces = kMaxPieces + 1; }, "1 to 32 pieces"},
      {"empty piece", [](FwdParams& f) { f.prob.pieces[0].seqlen_k = 0; }, "piece 0 is empty"},
      {"rows past Sq", [](FwdParams& f) { f.prob.pieces[0].q0 = 1; }, "query rows [1, 1001)"},
      {"keys past Sk", [](FwdParams& f) { f.prob.pieces[0].k0 = -1; }, "keys [-1, 4096)"},
      {"band lo > hi", [](FwdParams& f) { f.prob.pieces[0].band = {5, 4}; }, "lo <= hi"},
      {"rows shared", [](FwdParams& f) {
         f.prob.num_pieces = 2;
         f.prob.pieces[0].seqlen_q = 500;
         f.prob.pieces[1] = f.prob.pieces[0];
         f.prob.pieces[1].q0 = 499;
       }, "share query rows"},
  };
  for (const Bad& b : bad) {
    FwdParams f = good_fwd();
    b.edit(f);
    const DType dt = std::string(b.what) == "fp32 inputs" ? DType::kFloat32 : DType::kFloat16;
    const std::string msg = check_fwd(f, dt);
    CHECK(mentions(msg, b.expect)) << b.what << ": got '" << msg << "'";
  }

  {  // MLA: q/k at D = 192, v/out/dout/dv at Dv = 128
    FwdParams f = good_fwd();
    f.prob.head_dim = 192;
    f.prob.head_dim_v = 128;
    f.q_stride = contiguous(192, f.prob.seqlen_q, f.prob.heads_q);
    f.k_stride = contiguous(192, f.prob.seqlen_k, f.prob.heads_kv);
    for (DType dt : {DType::kFloat16, DType::kBFloat16})
      CHECK(check_fwd(f, dt).empty()) << check_fwd(f, dt);
    BwdParams b = good_bwd();
    b.prob = f.prob;
    b.q_stride = b.dq_stride = f.q_stride;
    b.k_stride = b.dk_stride = f.k_stride;
    CHECK(check_bwd(b, DType::kBFloat16).empty()) << check_bwd(b, DType::kBFloat16);
    f.prob.head_dim_v = 192;  // not a compiled pair
    CHECK(mentions(check_fwd(f, DType::kFloat16), "head_dim 192 has no"))
        << check_fwd(f, DType::kFloat16);
    b.v_stride.head = 132;  // v's rows must stay 16-byte aligned at any head dim
    CHECK(mentions(check_bwd(b, DType::kFloat16), "v must be 16-byte"));
  }

  {  // pieces with disjoint rows may share keys in the forward, not in the backward
    FwdParams f = good_fwd();
    f.prob.num_pieces = 2;
    f.prob.pieces[0].seqlen_q = 500;
    f.prob.pieces[1] = f.prob.pieces[0];
    f.prob.pieces[1].q0 = 500;
    CHECK(check_fwd(f, DType::kFloat16).empty()) << check_fwd(f, DType::kFloat16);
    BwdParams b = good_bwd();
    b.prob = f.prob;
    CHECK(mentions(check_bwd(b, DType::kFloat16), "share keys")) << check_bwd(b, DType::kFloat16);
    b.prob.pieces[1].k0 = 2000;
    b.prob.pieces[1].seqlen_k = 2097;
    b.prob.pieces[0].seqlen_k = 2000;
    CHECK(check_bwd(b, DType::kFloat16).empty()) << check_bwd(b, DType::kFloat16);
  }

  BwdParams b = good_bwd();
  b.dout = addr(8);
  CHECK(mentions(check_bwd(b, DType::kFloat16), "dout")) << check_bwd(b, DType::kFloat16);
  b = good_bwd();
  b.dk_stride.seq = 3;
  CHECK(mentions(check_bwd(b, DType::kFloat16), "dk")) << check_bwd(b, DType::kFloat16);
  b = good_bwd();
  b.delta = nullptr;
  CHECK(mentions(check_bwd(b, DType::kFloat16), "delta"));
  b = good_bwd();
  b.out = nullptr;
  CHECK(mentions(check_bwd(b, DType::kFloat16), "out is null"));

  MergeParams m;
  m.batch = 1;
  m.seqlen = 3;
  m.heads = 2;
  m.head_dim = 5;  // any head_dim
  m.out_acc = m.lse_acc = reinterpret_cast<float*>(addr());
  m.out_blk = addr();
  m.lse_blk = reinterpret_cast<const float*>(addr());
  CHECK(check_merge(m).empty()) << check_merge(m);
  m.lse_blk = nullptr;
  CHECK(mentions(check_merge(m), "null"));
}

void test_launch_config() {
  // Every (D, Dv) the kernels are written for; compiled ones must also fit sm_86 / sm_89.
  const int pairs[][2] = {{64, 64}, {128, 128}, {256, 256}, {192, 128}};
  for (const auto& pair : pairs) {
    const int d = pair[0], dv = pair[1];
    CHECK(fwd_block_m(d, dv) % 16 == 0 && fwd_block_n(d, dv) % 16 == 0 && d % 16 == 0 &&
          dv % 16 == 0);
    CHECK(fwd_block_m(d, dv) == 16 * kWarps && bwd_q_block_m(d, dv) == 16 * kWarps &&
          bwd_kv_block_n(d, dv) == 16 * kWarps) << "one 16-row MMA block per warp";
    CHECK(bwd_kv_block_m(d, dv) % 16 == 0 && bwd_q_block_n(d, dv) % 16 == 0);
    // ldmatrix needs 16-byte aligned rows; the padding must keep that.
    for (int cols : {d, dv}) CHECK((smem_pitch(cols) * 2) % 16 == 0 && smem_pitch(cols) > cols);
    const bool compiled = head_dims_supported(d, dv);
    for (int sq : {1, 17, 64, 65, 1000, 4097})
      for (int sk : {1, 63, 4097}) {
        Problem p = good_problem();
        p.head_dim = d;
        p.head_dim_v = dv;
        p.seqlen_q = sq;
        p.seqlen_k = sk;
        set_single_piece(p, Band());
        for (int eb : {2}) {
          const int limit = compiled ? kMaxSmemBytesSm86 : kMaxSmemBytesSm80;
          const LaunchConfig f = fwd_launch_config(p, eb);
          CHECK(f.grid_x * fwd_block_m(d, dv) >= sq && (f.grid_x - 1) * fwd_block_m(d, dv) < sq)
              << "fwd grid covers Sq exactly once, sq " << sq << " d " << d;
          CHECK(f.grid_y == p.heads_q && f.grid_z == p.batch && f.threads == kThreads);
          CHECK(f.smem_bytes == ((fwd_block_m(d, dv) + fwd_block_n(d, dv)) * smem_pitch(d) +
                                 fwd_block_n(d, dv) * smem_pitch(dv)) * eb);
          CHECK(f.smem_bytes <= limit) << "fwd smem " << f.smem_bytes << " d " << d;

          const LaunchConfig kv = bwd_kv_launch_config(p, eb);
          CHECK(kv.grid_x * bwd_kv_block_n(d, dv) >= sk &&
                (kv.grid_x - 1) * bwd_kv_block_n(d, dv) < sk);
          CHECK(kv.grid_y == p.heads_kv && kv.grid_z == p.batch && kv.threads == kThreads);
          CHECK(kv.smem_bytes <= limit) << "bwd kv smem " << kv.smem_bytes << " d " << d;

          const LaunchConfig qc = bwd_q_launch_config(p, eb);
          CHECK(qc.grid_x * bwd_q_block_m(d, dv) >= sq &&
                (qc.grid_x - 1) * bwd_q_block_m(d, dv) < sq);
          CHECK(qc.grid_y == p.heads_q && qc.smem_bytes <= limit)
              << "bwd q smem " << qc.smem_bytes << " d " << d;
        }
      }
  }
  // The tiles (and so shared memory) of D = Dv: those the kernels were tuned and gated with.
  CHECK(fwd_block_n(64, 64) == 64 && fwd_block_n(128, 128) == 64 && fwd_block_n(256, 256) == 32);
  CHECK(bwd_kv_block_m(64, 64) == 64 && bwd_kv_block_m(128, 128) == 32 &&
        bwd_kv_block_m(256, 256) == 32);
  CHECK(bwd_q_block_n(64, 64) == 64 && bwd_q_block_n(128, 128) == 64 &&
        bwd_q_block_n(256, 256) == 32);
  // MLA's (192, 128), docs/KERNELS.md: 64-key forward tiles, 32-query dK/dV tiles, 64-key dQ
  // tiles; 68608 / 64768 / 86016 bytes of shared memory at 16-bit elements.
  CHECK(fwd_block_n(192, 128) == 64 && bwd_kv_block_m(192, 128) == 32 &&
        bwd_q_block_n(192, 128) == 64);
  CHECK(fwd_smem_bytes(192, 128, 2) == 68608 && bwd_kv_smem_bytes(192, 128, 2) == 64768 &&
        bwd_q_smem_bytes(192, 128, 2) == 86016);
  {  // varlen: the grid runs the pieces' tiles back to back
    Problem p = good_problem();
    const int lens[][2] = {{1, 3}, {64, 64}, {65, 200}, {130, 1}};
    p.num_pieces = 4;
    index_t q0 = 0, k0 = 0;
    for (int i = 0; i < 4; ++i) {
      p.pieces[i] = PieceParams();
      p.pieces[i].q0 = q0;
      p.pieces[i].k0 = k0;
      p.pieces[i].seqlen_q = lens[i][0];
      p.pieces[i].seqlen_k = lens[i][1];
      q0 += lens[i][0];
      k0 += lens[i][1];
    }
    assign_tiles(p, 64, 32);
    CHECK(p.pieces[0].q_tile_begin == 0 && p.pieces[1].q_tile_begin == 1 &&
          p.pieces[2].q_tile_begin == 2 && p.pieces[3].q_tile_begin == 4);
    CHECK(p.pieces[0].k_tile_begin == 0 && p.pieces[1].k_tile_begin == 1 &&
          p.pieces[2].k_tile_begin == 3 && p.pieces[3].k_tile_begin == 10);
    p.head_dim = p.head_dim_v = 64;
    CHECK(fwd_launch_config(p, 2).grid_x == 1 + 1 + 2 + 3);
    CHECK(bwd_kv_launch_config(p, 2).grid_x == 1 + 1 + 4 + 1);
  }
  for (index_t rows : {index_t(1), index_t(8), index_t(9), index_t(3) * 4097 * 16}) {
    const LaunchConfig r = row_launch_config(rows);
    CHECK(r.grid_x * (r.threads / 32) >= rows && (r.grid_x - 1) * (r.threads / 32) < rows);
    CHECK(r.grid_x <= kMaxGridX);
  }
}

}  // namespace

// Bytes a view covers (offsets from the buffer start).
std::set<long> bytes_of(const MemView& v, const char* base) {
  std::set<long> out;
  std::vector<index_t> idx(v.ndim, 0);
  for (;;) {
    long off = long(static_cast<const char*>(v.ptr) - base);
    for (int d = 0; d < v.ndim; ++d) off += long(idx[d] * v.strides[d] * v.elem_bytes);
    for (int e = 0; e < v.elem_bytes; ++e) out.insert(off + e);
    int d = v.ndim - 1;
    while (d >= 0 && ++idx[d] == v.sizes[d]) idx[d--] = 0;
    if (d < 0) return out;
  }
}

void test_may_overlap() {
  static char buf[1 << 16];
  std::mt19937 rng(11);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int overlapping = 0, exact_disjoint = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    // A [d0, d1, d2] parent layout with padding; a and b are slices of it (same strides:
    // the same shape, or every third case another shape, e.g. MLA's [..., :D] and
    // [..., D:D + Dv]) or, every third case, b has its own shape, strides or element size.
    const int elem = pick(0, 1) ? 4 : 2;
    MemView a;
    a.ndim = 3;
    a.elem_bytes = elem;
    a.sizes[2] = pick(1, 4);
    a.strides[2] = pick(0, 3) ? 1 : pick(2, 3);
    a.sizes[1] = pick(1, 3);
    a.strides[1] = a.sizes[2] * a.strides[2] * pick(1, 3);
    a.sizes[0] = pick(1, 3);
    a.strides[0] = a.sizes[1] * a.strides[1] + pick(0, 2);
    MemView b = a;
    a.ptr = buf + elem * pick(0, 40);
    b.ptr = buf + pick(0, 40 * elem);
    const bool same_layout = iter % 3 != 0;
    if (iter % 3 == 2)
      for (int d = 0; d < 3; ++d) b.sizes[d] = pick(1, 4);
    if (!same_layout) {
      b.elem_bytes = pick(0, 1) ? 4 : 2;
      b.sizes[0] = pick(1, 3);
      b.strides[1] = pick(1, 6);
    }
    const std::set<long> sa = bytes_of(a, buf), sb = bytes_of(b, buf);
    bool truth = false;
    for (long x : sb) truth = truth || sa.count(x);
    const bool got = may_overlap(a, b);
    CHECK(got == may_overlap(b, a)) << "symmetric, case " << iter;
    CHECK(!truth || got) << "missed an overlap, case " << iter;
    if (same_layout) CHECK(got == truth) << "not exact for one set of strides, case " << iter;
    overlapping += truth;
    exact_disjoint += same_layout && !truth && !got;
  }
  CHECK(overlapping > 200 && exact_disjoint > 200) << overlapping << " " << exact_disjoint;
  // dK and dV as the two halves of a packed [B, S, 2, H, D] buffer: disjoint; the same half
  // twice, or a view shifted by one element: overlap.
  MemView k;
  k.ptr = buf;
  k.ndim = 4;
  k.elem_bytes = 4;
  const index_t shape[4] = {2, 5, 3, 8}, strides[4] = {5 * 2 * 3 * 8, 2 * 3 * 8, 8, 1};
  for (int d = 0; d < 4; ++d) k.sizes[d] = shape[d], k.strides[d] = strides[d];
  MemView v = k;
  v.ptr = buf + 4 * 3 * 8;
  CHECK(!may_overlap(k, v));
  CHECK(may_overlap(k, k));
  v.ptr = buf + 4;
  CHECK(may_overlap(k, v));
  // MLA: dK = buf[..., :192] and dV = buf[..., 192:320] of one [B, S, H, 320] buffer (the
  // ring's packed gradients): disjoint; dV one element wider reaches into the next row's dK.
  MemView dk;
  dk.ptr = buf;
  dk.ndim = 4;
  dk.elem_bytes = 4;
  const index_t mla_shape[4] = {1, 3, 2, 192}, mla_strides[4] = {3 * 2 * 320, 2 * 320, 320, 1};
  for (int d = 0; d < 4; ++d) dk.sizes[d] = mla_shape[d], dk.strides[d] = mla_strides[d];
  MemView dv = dk;
  dv.ptr = buf + 4 * 192;
  dv.sizes[3] = 128;
  CHECK(!may_overlap(dk, dv) && !may_overlap(dv, dk));
  dv.sizes[3] = 129;
  CHECK(may_overlap(dk, dv) && may_overlap(dv, dk));
}

int main() {
  test_checks();
  test_launch_config();
  test_may_overlap();
  return harness::finish("test_checks");
}
