// The sm_90a emulator models' own properties (csrc/emulate/sm90_gmma.h, sm90_async.h); their
// agreement with CuTe's layout definitions is tests/cpp/test_sm90_cute.cpp. Here: fragments
// cover the tile exactly once, descriptors round-trip, and the mbarrier / wgmma-ordering /
// async-proxy models stay quiet on a correct TMA -> wgmma pipeline and report each bug, while
// a deliberately weakened model (Strictness switched off) misses it.
#include <string>

#include "emulate/sm90_async.h"
#include "emulate/sm90_gmma.h"
#include "harness.h"

using namespace emu::sm90;

namespace {

bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

void test_fragments_cover_tile() {
  for (int n : {64, 128, 256}) {
    std::vector<int> hits(64 * n, 0);
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < acc_values(n); ++v) {
        const Coord c = acc_coord(t, v);
        CHECK(c.row >= 0 && c.row < 64 && c.col >= 0 && c.col < n) << t << " " << v;
        ++hits[c.row * n + c.col];
      }
    for (int h : hits) CHECK(h == 1) << "N=" << n;
    // The accumulator of columns 0..15 is, value for value, the next wgmma's A operand.
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < a_values(); ++v)
        CHECK(a_coord(t, v).row == acc_coord(t, v).row && a_coord(t, v).col == acc_coord(t, v).col);
  }
}

void test_descriptor_round_trip() {
  const Desc d{0x3fff0, 0x1230, 0x4560, 3, Swizzle::B32};
  const Desc e = decode(encode(d));
  CHECK(e.start == d.start && e.lbo == d.lbo && e.sbo == d.sbo && e.base_offset == 3 &&
        e.swizzle == Swizzle::B32);
  for (uint32_t a = 0; a < 4096; ++a)  // each swizzle is an involution on a 1 KiB pattern
    for (Swizzle s : {Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128})
      CHECK(swizzle_address(s, swizzle_address(s, a)) == a);
}

// ---- mbarrier ---------------------------------------------------------------------------------
void test_mbarrier() {
  bool done = false;
  {  // 3 phases of: producer arrive.expect_tx(1024), two TMA halves land, consumer waits.
    MBarrier b;
    CHECK(b.init(1).empty());
    for (int k = 0; k < 3; ++k) {
      CHECK(b.try_wait(7, k & 1, &done).empty() && !done) << "phase " << k << " not yet";
      CHECK(b.arrive(1024).empty());
      CHECK(b.complete_tx(512).empty());
      CHECK(b.try_wait(7, k & 1, &done).empty() && !done) << "half the bytes";
      CHECK(b.complete_tx(512).empty());
      CHECK(b.try_wait(7, k & 1, &done).empty() && done) << "phase " << k;
      CHECK(b.seen(7) == k + 1 && b.phase() == k + 1);
    }
  }
  {  // two arrivals expected: one is not enough.
    MBarrier b;
    CHECK(b.init(2).empty() && b.arrive().empty());
    CHECK(b.try_wait(0, 0, &done).empty() && !done);
    CHECK(b.arrive().empty() && b.try_wait(0, 0, &done).empty() && done);
  }
  {  // wrong parity: the hardware would return at once, with the data not there.
    MBarrier b;
    CHECK(b.init(1).empty());
    const std::string r = b.try_wait(3, 1, &done);
    CHECK(has(r, "wrong parity") && done) << r;
    MBarrier weak(Strictness{false, true, true});  // mutant: parity unchecked
    CHECK(weak.init(1).empty() && weak.try_wait(3, 1, &done).empty() && done);
  }
  {  // a consumer that skipped a phase: two phases past what it saw.
    MBarrier b;
    CHECK(b.init(1).empty() && b.arrive().empty() && b.arrive().empty());
    CHECK(has(b.try_wait(5, 0, &done), "phase overrun"));
    MBarrier weak(Strictness{false, true, true});
    CHECK(weak.init(1).empty() && weak.arrive().empty() && weak.arrive().empty());
    CHECK(weak.try_wait(5, 0, &done).empty());
  }
  {  // more bytes land than were expected (e.g. expect_tx sized for a smaller tile).
    MBarrier b;
    CHECK(b.init(1).empty() && b.arrive(256).empty());
    CHECK(has(b.complete_tx(512), "underflow"));
    MBarrier weak(Strictness{true, false, true});  // mutant: tx unchecked
    CHECK(weak.init(1).empty() && weak.arrive(256).empty() && weak.complete_tx(512).empty());
  }
  {
    MBarrier b;
    CHECK(has(b.arrive(), "uninitialised"));
    CHECK(has(b.init(0), "count < 1"));
  }
}

// ---- wgmma ordering ---------------------------------------------------------------------------
void test_wgmma_order() {
  {  // S = Q K^T over 4 k-slices into acc 1, then softmax touches it after wait_group(0).
    WgmmaOrder w;
    w.fence();
    for (int k = 0; k < 4; ++k) CHECK(w.mma(1).empty());
    w.commit();
    CHECK(w.inflight() == 4);
    w.wait(0);
    CHECK(w.inflight() == 0 && w.touch(1, true).empty());
    // O += P V with P (regs 2) from registers: written since the last fence -> needs a fence.
    CHECK(has(w.mma(3, 2), "without wgmma.fence"));
    w.fence();
    CHECK(w.mma(3, 2).empty());
    w.commit();
    CHECK(has(w.touch(2, false), "in flight")) << "P read while the wgmma reads it";
    CHECK(has(w.touch(3, true), "in flight")) << "O rescaled before the wait";
    w.wait(1);
    CHECK(w.inflight() == 1) << "wait_group(1) keeps the newest group";
    w.wait(0);
    CHECK(w.touch(3, true).empty());
  }
  {  // two groups in flight: wait_group(1) retires only the older.
    WgmmaOrder w;
    w.fence();
    CHECK(w.mma(1).empty());
    w.commit();
    CHECK(w.mma(2).empty());
    w.commit();
    w.wait(1);
    CHECK(w.touch(1, false).empty() && has(w.touch(2, false), "in flight"));
    CHECK(w.retired_group(1) && !w.retired_group(2));
  }
  {  // an uncommitted wgmma is not retired by wait_group(0).
    WgmmaOrder w;
    w.fence();
    CHECK(w.mma(1).empty());
    w.wait(0);
    CHECK(has(w.touch(1, false), "in flight"));
  }
}

// ---- async proxy ------------------------------------------------------------------------------
// A two-stage K pipeline: the producer (thread 0) TMA-loads stage s into [s * 2048, +2048) on
// barrier full[s]; the consumer warpgroup (threads 128..255; thread 128 issues) waits, runs its
// wgmmas, waits for them, and the producer refills the stage.
struct Pipeline {
  MBarrier full[2];
  WgmmaOrder wg;
  AsyncSmem smem;
  explicit Pipeline(Strictness s = {}) : full{MBarrier(s), MBarrier(s)}, smem(4096, s) {
    full[0].init(1);
    full[1].init(1);
  }
  std::string load(int s) {
    std::string r = full[s].arrive(2048);
    if (r.empty()) r = smem.tma_write(uint32_t(s) * 2048, 2048, &full[s], &wg);
    if (r.empty()) r = full[s].complete_tx(2048);
    return r;
  }
  std::string consume(int s, int parity, bool wait_barrier = true, bool wait_mma = true) {
    bool done = false;
    if (wait_barrier) {
      std::string r = full[s].try_wait(128, parity, &done);
      if (!r.empty()) return r;
      if (!done) return "consumer would block";
    }
    wg.fence();
    std::string r = smem.wgmma_read(128, uint32_t(s) * 2048, 2048, &wg);
    if (r.empty()) r = wg.mma(1);
    wg.commit();
    if (wait_mma) wg.wait(0);
    return r;
  }
};

void test_async_proxy() {
  {  // correct: 6 iterations over 2 stages.
    Pipeline p;
    CHECK(p.load(0).empty() && p.load(1).empty());
    for (int it = 0; it < 6; ++it) {
      const int s = it % 2;
      CHECK(p.consume(s, (it / 2) & 1).empty()) << "iteration " << it;
      if (it + 2 < 6) CHECK(p.load(s).empty()) << "refill " << it;
    }
  }
  {  // the consumer's wgmma reads the stage without waiting on full[s].
    Pipeline p;
    CHECK(p.full[0].arrive(2048).empty());
    CHECK(p.smem.tma_write(0, 2048, &p.full[0], &p.wg).empty());
    const std::string r = p.consume(0, 0, /*wait_barrier=*/false);
    CHECK(has(r, "before the thread waited")) << r;
    Pipeline weak(Strictness{true, true, false});  // mutant: proxy ordering unchecked
    CHECK(weak.full[0].arrive(2048).empty());
    CHECK(weak.smem.tma_write(0, 2048, &weak.full[0], &weak.wg).empty());
    CHECK(weak.consume(0, 0, false).empty());
  }
  {  // refilling a stage whose wgmma has not been waited for (missing wait_group).
    Pipeline p;
    CHECK(p.load(0).empty() && p.load(1).empty());
    CHECK(p.consume(0, 0, true, /*wait_mma=*/false).empty());
    const std::string r = p.load(0);
    CHECK(has(r, "in-flight wgmma")) << r;
  }
  {  // a stage waited on in an earlier phase is not enough for the next load's bytes.
    Pipeline p;
    CHECK(p.load(0).empty() && p.consume(0, 0).empty());
    CHECK(p.full[0].arrive(2048).empty());
    CHECK(p.smem.tma_write(0, 2048, &p.full[0], &p.wg).empty());  // phase 1 in flight
    CHECK(has(p.consume(0, 0, false), "phase 1"));
  }
  {  // threads write P to shared memory for an SS wgmma: fence.proxy.async required.
    WgmmaOrder wg;
    AsyncSmem smem(1024);
    for (int t = 0; t < 4; ++t) CHECK(smem.thread_write(t, uint32_t(t) * 256, 256, &wg).empty());
    CHECK(has(smem.wgmma_read(0, 0, 1024, &wg), "without fence.proxy.async"));
    for (int t = 0; t < 4; ++t) smem.fence_proxy_async(t);
    CHECK(smem.wgmma_read(0, 0, 1024, &wg).empty());
    AsyncSmem weak(1024, Strictness{true, true, false});
    CHECK(weak.thread_write(0, 0, 1024, &wg).empty() && weak.wgmma_read(0, 0, 1024, &wg).empty());
    AsyncSmem fresh(64);
    CHECK(has(fresh.wgmma_read(0, 0, 64, &wg), "nothing wrote"));
  }
}

}  // namespace

int main() {
  test_fragments_cover_tile();
  test_descriptor_round_trip();
  test_mbarrier();
  test_wgmma_order();
  test_async_proxy();
  return harness::finish("test_sm90");
}
