// The softmax statistics the kernels compute, emulated on the host in float with the same
// tiling (tiling.h) and the same guards, against double-precision brute force:
//   * merge_lse: -inf on either side exact, both -inf stays -inf, never NaN, weights sum to 1;
//   * the forward's tile-by-tile online softmax (log2 units, shift 0 while the running max is
//     -inf, rescale by alpha) gives out and lse of full softmax; rows that see nothing end
//     with lse = -inf and out = 0;
//   * the fused ring step (forward into accumulators, merged with merge_lse block by block)
//     equals attention over all blocks, whatever the blocks' masks, including empty rows;
//   * the backward probability exp2(s*scale*log2e - lse_for_exp2(lse)) is softmax's P and 0
//     for rows with lse = -inf.
#include <cmath>
#include <random>
#include <vector>

#include "distattn/softmax.h"
#include "distattn/tiling.h"
#include "harness.h"

using namespace distattn;

namespace {

constexpr int kDv = 3;  // value width of the emulation

struct Block {
  index_t sq, sk;
  bool causal;
  index_t offset;
  std::vector<float> s;  // [sq][sk] raw scores q.k
  std::vector<float> v;  // [sk][kDv]
};

Band band_of(const Block& b) { return b.causal ? Band{-kUnbounded, b.offset} : Band(); }

Block random_block(std::mt19937& rng, index_t sq, index_t sk, bool causal, index_t offset) {
  std::normal_distribution<float> n(0.f, 3.f);
  Block b{sq, sk, causal, offset, std::vector<float>(size_t(sq * sk)),
          std::vector<float>(size_t(sk * kDv))};
  for (auto& x : b.s) x = n(rng);
  for (auto& x : b.v) x = n(rng);
  return b;
}

// The forward kernel's per-row algorithm, tile by tile, in float (one "thread" per row; the
// kernel splits a row over 4 lanes, which only changes the summation order).
void emulate_fwd(const Block& b, float scale, int bm, int bn, std::vector<float>& out,
                 std::vector<float>& lse) {
  const float scale_log2 = scale * kLog2e;
  out.assign(size_t(b.sq * kDv), 0.f);
  lse.assign(size_t(b.sq), 0.f);
  for (index_t m0 = 0; m0 < b.sq; m0 += bm) {
    const TileRange keys = key_tiles_for_query_tile(m0, bm, bn, b.sq, b.sk, band_of(b));
    for (index_t i = m0; i < std::min<index_t>(m0 + bm, b.sq); ++i) {
      float row_max = -INFINITY, row_sum = 0.f, o[kDv] = {0.f, 0.f, 0.f};
      for (index_t it = keys.first; it < keys.last; ++it) {
        const index_t n0 = it * bn;
        const bool partial =
            classify_tile(m0, bm, n0, bn, b.sq, b.sk, band_of(b)) != kFull;
        std::vector<float> s(static_cast<size_t>(bn));
        float mx = -INFINITY;
        for (int c = 0; c < bn; ++c) {
          const index_t j = n0 + c;
          s[size_t(c)] = j < b.sk ? b.s[size_t(i * b.sk + j)] : 0.f;  // zero-filled keys
          if (partial && (j >= b.sk || !in_band(i, j, band_of(b)))) s[size_t(c)] = -INFINITY;
          mx = std::fmax(mx, s[size_t(c)]);
        }
        const float new_max = std::fmax(row_max, mx * scale_log2);
        const float shift = new_max == -INFINITY ? 0.f : new_max;
        const float alpha = std::exp2(row_max - shift);
        row_max = new_max;
        float sum = 0.f;
        for (int d = 0; d < kDv; ++d) o[d] *= alpha;
        for (int c = 0; c < bn; ++c) {
          const float p = std::exp2(std::fma(s[size_t(c)], scale_log2, -shift));
          sum += p;
          const index_t j = n0 + c;
          for (int d = 0; d < kDv; ++d) o[d] += p * (j < b.sk ? b.v[size_t(j * kDv + d)] : 0.f);
        }
        row_sum = row_sum * alpha + sum;
      }
      const float l = row_sum;
      lse[size_t(i)] = l > 0.f ? row_max * kLn2 + std::log(l) : -INFINITY;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (int d = 0; d < kDv; ++d) out[size_t(i * kDv + d)] = o[d] * inv;
    }
  }
}

// Brute force in double over a list of blocks that share the query rows.
void reference(const std::vector<Block>& blocks, double scale, std::vector<double>& out,
               std::vector<double>& lse) {
  const index_t sq = blocks[0].sq;
  out.assign(size_t(sq * kDv), 0.0);
  lse.assign(size_t(sq), -INFINITY);
  for (index_t i = 0; i < sq; ++i) {
    double mx = -INFINITY;
    for (const Block& b : blocks)
      for (index_t j = 0; j < b.sk; ++j)
        if (visible(i, j, b.sq, b.sk, band_of(b)))
          mx = std::fmax(mx, scale * b.s[size_t(i * b.sk + j)]);
    if (mx == -INFINITY) continue;
    double sum = 0.0, o[kDv] = {0, 0, 0};
    for (const Block& b : blocks)
      for (index_t j = 0; j < b.sk; ++j)
        if (visible(i, j, b.sq, b.sk, band_of(b))) {
          const double p = std::exp(scale * b.s[size_t(i * b.sk + j)] - mx);
          sum += p;
          for (int d = 0; d < kDv; ++d) o[d] += p * b.v[size_t(j * kDv + d)];
        }
    lse[size_t(i)] = mx + std::log(sum);
    for (int d = 0; d < kDv; ++d) out[size_t(i * kDv + d)] = o[d] / sum;
  }
}

void compare(const std::vector<float>& out, const std::vector<float>& lse,
             const std::vector<double>& ref_out, const std::vector<double>& ref_lse,
             const char* what) {
  for (size_t i = 0; i < lse.size(); ++i) {
    CHECK(!std::isnan(lse[i])) << what << " row " << i << " lse NaN";
    if (std::isinf(ref_lse[i])) {
      CHECK(lse[i] == -INFINITY) << what << " row " << i << " should be empty, lse " << lse[i];
    } else {
      CHECK(std::fabs(lse[i] - ref_lse[i]) <= 1e-4 * (1 + std::fabs(ref_lse[i])))
          << what << " row " << i << " lse " << lse[i] << " vs " << ref_lse[i];
    }
    for (int d = 0; d < kDv; ++d) {
      const float o = out[i * kDv + d];
      const double r = std::isinf(ref_lse[i]) ? 0.0 : ref_out[i * kDv + d];
      CHECK(!std::isnan(o) && std::fabs(o - r) <= 1e-4 * (1 + std::fabs(r)))
          << what << " row " << i << " out " << o << " vs " << r;
    }
  }
}

void test_merge_lse() {
  float wa, wb;
  CHECK(merge_lse(-INFINITY, -INFINITY, wa, wb) == -INFINITY && wa == 0.f && wb == 0.f);
  CHECK(merge_lse(-INFINITY, 2.5f, wa, wb) == 2.5f && wa == 0.f && wb == 1.f);
  CHECK(merge_lse(-7.f, -INFINITY, wa, wb) == -7.f && wa == 1.f && wb == 0.f);
  const float vals[] = {-1e30f, -88.f, -3.f, 0.f, 1e-6f, 5.f, 80.f, 1e30f};
  for (float a : vals)
    for (float b : vals) {
      const float l = merge_lse(a, b, wa, wb);
      const double m = std::fmax(double(a), double(b));
      const double want = m + std::log(std::exp(double(a) - m) + std::exp(double(b) - m));
      CHECK(!std::isnan(l) && std::fabs(l - want) <= 1e-6 * (1 + std::fabs(want)))
          << a << " (+) " << b << " = " << l << " want " << want;
      CHECK(std::fabs(wa + wb - 1.f) <= 1e-6f) << a << " " << b;
    }
}

}  // namespace

int main() {
  test_merge_lse();
  std::mt19937 rng(1234);
  const float scale = 0.3f;

  // Single blocks: forward emulation against brute force, many shapes and offsets.
  const index_t sizes[] = {1, 17, 64, 100};
  for (index_t sq : sizes)
    for (index_t sk : sizes)
      for (int causal = 0; causal < 2; ++causal)
        for (index_t off : {index_t(-200), index_t(-17), index_t(-1), index_t(0), index_t(5),
                            index_t(99)}) {
          if (!causal && off != 0) continue;
          const Block b = random_block(rng, sq, sk, causal != 0, off);
          std::vector<float> out, lse;
          std::vector<double> ref_out, ref_lse;
          emulate_fwd(b, scale, fwd_block_m(128, 128), fwd_block_n(128, 128), out, lse);
          reference({b}, scale, ref_out, ref_lse);
          compare(out, lse, ref_out, ref_lse, "fwd");
        }

  // Fused ring step: several key blocks with their own masks (as zigzag / stripe give),
  // merged into (out_acc = 0, lse_acc = -inf) one by one.
  const struct {
    index_t sk;
    bool causal;
    index_t offset;
  } rings[][3] = {
      {{40, false, 0}, {40, true, 0}, {40, true, -40}},     // contiguous: past, diagonal, empty
      {{33, true, -1}, {33, true, 0}, {17, false, 0}},      // stripe-like strictly-lower block
      {{64, true, -64}, {64, true, -100}, {64, true, -64}}, // every block empty
      {{100, true, 30}, {5, false, 0}, {70, true, -20}},
  };
  for (const auto& ring : rings) {
    const index_t sq = 37;
    std::vector<Block> blocks;
    std::vector<float> out_acc(size_t(sq * kDv), 0.f), lse_acc(size_t(sq), -INFINITY);
    for (const auto& spec : ring) {
      blocks.push_back(random_block(rng, sq, spec.sk, spec.causal, spec.offset));
      std::vector<float> out, lse;
      emulate_fwd(blocks.back(), scale, 64, 64, out, lse);
      for (index_t i = 0; i < sq; ++i) {  // the forward kernel's accumulate epilogue
        if (lse[size_t(i)] == -INFINITY) continue;
        float w_old, w_new;
        const float merged = merge_lse(lse_acc[size_t(i)], lse[size_t(i)], w_old, w_new);
        for (int d = 0; d < kDv; ++d) {
          float& acc = out_acc[size_t(i * kDv + d)];
          acc = (w_old != 0.f ? acc * w_old : 0.f) + out[size_t(i * kDv + d)] * w_new;
        }
        lse_acc[size_t(i)] = merged;
      }
    }
    std::vector<double> ref_out, ref_lse;
    reference(blocks, scale, ref_out, ref_lse);
    compare(out_acc, lse_acc, ref_out, ref_lse, "ring");
  }

  // Backward probabilities.
  for (float lse : {-INFINITY, -3.f, 0.f, 12.f})
    for (float s : {-INFINITY, -5.f, 0.f, 4.f}) {
      const float p = std::exp2(std::fma(s, scale * kLog2e, -lse_for_exp2(lse)));
      const double want =
          (lse == -INFINITY || s == -INFINITY) ? 0.0 : std::exp(double(scale) * s - lse);
      CHECK(!std::isnan(p) && std::fabs(p - want) <= 1e-5 * (1 + want))
          << "P(s=" << s << ", lse=" << lse << ") = " << p << " want " << want;
    }
  return harness::finish("test_softmax");
}
