// Masked-tile arithmetic (csrc/distattn/tiling.h) against brute-force enumeration:
// for many shapes, tile sizes and bands lo <= j - i <= hi (causal: hi only; sliding windows:
// both; offsets negative, zero, positive, beyond the block),
//   * classify_tile says skip / full / partial exactly as counting visible pairs says;
//   * key_tiles_for_query_tile (forward, dQ kernel) is exactly the non-skipped key tiles;
//   * query_tiles_for_key_tile (dK/dV kernel) is exactly the non-skipped query tiles;
//   * the visited tiles cover every visible (query, key) pair exactly once.
#include <cstdlib>
#include <string>
#include <vector>

#include "distattn/tiling.h"
#include "harness.h"

using namespace distattn;

namespace {

struct Case {
  index_t sq, sk;
  Band band;
  int bm, bn;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  auto bound = [](index_t x) { return std::llabs(x) >= kUnbounded ? std::string("inf")
                                                                   : std::to_string(x); };
  return os << "[sq=" << c.sq << " sk=" << c.sk << " lo=" << bound(c.band.lo)
            << " hi=" << bound(c.band.hi) << " bm=" << c.bm << " bn=" << c.bn << "]";
}

// The band written out independently of tiling.h.
bool sees(const Case& c, index_t i, index_t j) {
  return i < c.sq && j < c.sk && j - i >= c.band.lo && j - i <= c.band.hi;
}

// Brute force: kind of one tile by counting visible pairs.
TileKind brute_kind(const Case& c, index_t m0, index_t n0) {
  index_t seen = 0, total = 0;
  for (index_t i = m0; i < std::min<index_t>(m0 + c.bm, c.sq); ++i)
    for (index_t j = n0; j < n0 + c.bn; ++j) {
      ++total;
      seen += sees(c, i, j) ? 1 : 0;
    }
  if (seen == 0) return kSkip;
  return seen == total ? kFull : kPartial;
}

index_t visible_pairs(const Case& c, index_t m0, index_t n0) {
  index_t seen = 0;
  for (index_t i = m0; i < std::min<index_t>(m0 + c.bm, c.sq); ++i)
    for (index_t j = n0; j < std::min<index_t>(n0 + c.bn, c.sk); ++j)
      seen += sees(c, i, j) ? 1 : 0;
  return seen;
}

void check_case(const Case& c) {
  const index_t mt = ceil_div(c.sq, c.bm), nt = ceil_div(c.sk, c.bn);
  std::vector<TileKind> kinds(size_t(mt * nt));
  for (index_t a = 0; a < mt; ++a)
    for (index_t b = 0; b < nt; ++b) {
      const TileKind want = brute_kind(c, a * c.bm, b * c.bn);
      const TileKind got = classify_tile(a * c.bm, c.bm, b * c.bn, c.bn, c.sq, c.sk, c.band);
      CHECK(got == want) << c << " tile (" << a << "," << b << ") got " << got << " want "
                         << want;
      kinds[size_t(a * nt + b)] = want;
    }

  index_t total_visible = 0, disagree = 0;
  for (index_t i = 0; i < c.sq; ++i)
    for (index_t j = 0; j < c.sk; ++j) {
      disagree += visible(i, j, c.sq, c.sk, c.band) != sees(c, i, j);
      total_visible += sees(c, i, j);
    }
  CHECK(disagree == 0) << c << " visible() disagrees on " << disagree << " pairs";

  // Forward / dQ schedule: rows of query tiles, key tiles [first, last).
  index_t covered_fwd = 0;
  for (index_t a = 0; a < mt; ++a) {
    const TileRange r = key_tiles_for_query_tile(a * c.bm, c.bm, c.bn, c.sq, c.sk, c.band);
    CHECK(0 <= r.first && r.first <= r.last && r.last <= nt)
        << c << " query tile " << a << " range [" << r.first << "," << r.last << ")";
    for (index_t b = 0; b < nt; ++b) {
      const bool visited = b >= r.first && b < r.last;
      CHECK(visited == (kinds[size_t(a * nt + b)] != kSkip))
          << c << " fwd query tile " << a << " key tile " << b << " visited=" << visited;
      if (visited) covered_fwd += visible_pairs(c, a * c.bm, b * c.bn);
    }
  }
  CHECK(covered_fwd == total_visible) << c << " fwd covers " << covered_fwd << " of "
                                      << total_visible;

  // dK/dV schedule: columns of key tiles, query tiles [first, last).
  index_t covered_bwd = 0;
  for (index_t b = 0; b < nt; ++b) {
    const TileRange r = query_tiles_for_key_tile(b * c.bn, c.bn, c.bm, c.sq, c.sk, c.band);
    CHECK(0 <= r.first && r.first <= r.last && r.last <= mt)
        << c << " key tile " << b << " range [" << r.first << "," << r.last << ")";
    for (index_t a = 0; a < mt; ++a) {
      const bool visited = a >= r.first && a < r.last;
      CHECK(visited == (kinds[size_t(a * nt + b)] != kSkip))
          << c << " bwd key tile " << b << " query tile " << a << " visited=" << visited;
      if (visited) covered_bwd += visible_pairs(c, a * c.bm, b * c.bn);
    }
  }
  CHECK(covered_bwd == total_visible) << c << " bwd covers " << covered_bwd << " of "
                                      << total_visible;
}

Band causal(index_t offset) { return {-kUnbounded, offset}; }

}  // namespace

int main() {
  const index_t sizes[] = {1, 2, 15, 16, 17, 33, 64, 65, 100, 129};
  const index_t offsets[] = {-300, -129, -65, -64, -63, -17, -1, 0, 1, 15, 16, 63, 64, 65, 130, 300};
  // Sliding windows (lo, hi): narrow, wider than a tile, left of / right of / across the
  // diagonal, a single diagonal.
  const index_t windows[][2] = {{-3, 0}, {-9, 0}, {-70, 0}, {-70, 40}, {-20, -5}, {3, 90},
                                {0, 0}, {-1, 1}, {-200, -130}, {65, 200}};
  // The kernels' tile shapes (fwd 64x64 / 64x32, dK/dV 64x64 / 32x64 in (query, key) order)
  // and a few others.
  const int tiles[][2] = {{fwd_block_m(64, 64), fwd_block_n(64, 64)},
                          {fwd_block_m(256, 256), fwd_block_n(256, 256)},
                          {bwd_kv_block_m(128, 128), bwd_kv_block_n(128, 128)},
                          {16, 16}, {48, 80}};
  int cases = 0;
  for (index_t sq : sizes)
    for (index_t sk : sizes)
      for (const auto& t : tiles) {
        check_case({sq, sk, Band(), t[0], t[1]});
        ++cases;
        for (index_t off : offsets) {
          check_case({sq, sk, causal(off), t[0], t[1]});
          check_case({sq, sk, {off, kUnbounded}, t[0], t[1]});  // lower bound only
          cases += 2;
        }
        for (const auto& w : windows) {
          check_case({sq, sk, {w[0], w[1]}, t[0], t[1]});
          ++cases;
        }
      }
  // A few long, ragged blocks (the kernels' odd-length test sizes).
  for (index_t off : {index_t(-4097), index_t(-1000), index_t(-1), index_t(0), index_t(3097),
                      index_t(5000)}) {
    check_case({1000, 4097, causal(off), 64, 64});
    check_case({4097, 1000, causal(off), 64, 32});
    check_case({1000, 4097, {off - 300, off}, 64, 64});
    cases += 3;
  }
  check_case({4097, 1000, Band(), 64, 64});
  ++cases;

  // Spot checks written out by hand (64x64 tiles, square causal 128x128, offset 0):
  // the diagonal tiles are partial, the lower-left one full, the upper-right skipped.
  CHECK(classify_tile(0, 64, 0, 64, 128, 128, causal(0)) == kPartial);
  CHECK(classify_tile(64, 64, 0, 64, 128, 128, causal(0)) == kFull);
  CHECK(classify_tile(0, 64, 64, 64, 128, 128, causal(0)) == kSkip);
  CHECK(classify_tile(64, 64, 64, 64, 128, 128, causal(0)) == kPartial);
  // Offset 63 makes the first diagonal tile full; offset -64 hides the first query tile.
  CHECK(classify_tile(0, 64, 0, 64, 128, 128, causal(63)) == kFull);
  CHECK(key_tiles_for_query_tile(0, 64, 64, 128, 128, causal(-64)).last == 0);
  CHECK(key_tiles_for_query_tile(64, 64, 64, 128, 128, causal(-64)).last == 1);
  // A window of 10 keys behind the diagonal: the lower-left tile of a 128 block is skipped,
  // and the second query tile starts at key tile 0 (rows 64.. see keys 54..).
  CHECK(classify_tile(64, 64, 0, 64, 128, 128, {-10, 0}) == kPartial);
  CHECK(classify_tile(127, 1, 0, 64, 128, 128, {-10, 0}) == kSkip);
  CHECK(key_tiles_for_query_tile(64, 64, 64, 128, 128, {-10, 0}).first == 0);
  CHECK(key_tiles_for_query_tile(64, 1, 64, 128, 128, {-10, 0}).first == 0);
  CHECK(key_tiles_for_query_tile(74, 1, 64, 128, 128, {-10, 0}).first == 1);
  std::printf("test_tiling: %d cases\n", cases);
  return harness::finish("test_tiling");
}
