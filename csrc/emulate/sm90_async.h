// Models of sm_90a's asynchronous machinery, written from the PTX ISA ("mbarrier",
// "wgmma.fence / commit_group / wait_group", "Asynchronous proxy"), as event-driven state
// machines that report misuse as strings (empty = fine):
//
//   MBarrier        init / arrive / expect_tx / complete_tx / try_wait.parity with per-thread
//                   phase tracking (waiting on the wrong parity, losing a phase, tx underflow);
//   WgmmaOrder      one warpgroup's wgmma.fence / mma_async / commit_group / wait_group rules
//                   (accumulator registers touched while a wgmma that uses them is in flight);
//   AsyncSmem       a byte-range race check between the async proxy (TMA writes that complete
//                   on an mbarrier, wgmma reads that complete at wait_group) and the threads.
//
// Standalone: not yet driven by the emulator's fibers (csrc/emulate/runtime.cpp); the Hopper
// kernels' emulated instructions will call these. Nothing here has run on a GPU.
// tests/cpp/test_sm90.cpp checks each rule fires, stays quiet on a correct pipeline, and that
// deliberately weakened variants (see `Strictness`) miss the bugs.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace emu {
namespace sm90 {

// Switches that weaken a model on purpose: the tests' mutation checks turn one off and assert
// that the bug it guards against then goes unreported.
struct Strictness {
  bool parity = true;      // check try_wait's parity against the waiter's next phase
  bool tx = true;          // check the transaction count never goes below zero
  bool proxy = true;       // async-proxy reads must follow the mbarrier phase that wrote them
};

// ---- mbarrier -------------------------------------------------------------------------------
// A phase completes when its pending arrivals reach 0 and its transaction count is 0; the
// barrier then starts the next phase with `count` arrivals pending. try_wait.parity(P) returns
// true iff the phase of parity P most recently begun has completed, i.e. the current phase's
// parity is not P. Each thread keeps `seen`: the phases it has observed complete; a correct
// waiter asks for parity seen % 2. Asking for the other parity returns at once on hardware
// (the previous phase of that parity is long complete) -- reported as "wrong parity"; a
// barrier two or more phases past what the waiter saw cannot be told apart from one phase by
// parity alone -- reported as "phase overrun". Stricter than PTX in one way: the transaction
// count may not go negative (the kernels issue expect_tx before the copies it accounts for).
class MBarrier {
 public:
  explicit MBarrier(Strictness s = {}) : strict_(s) {}

  std::string init(int count) {
    if (count < 1) return "mbarrier.init with count < 1";
    count_ = pending_ = count;
    tx_ = 0;
    phase_ = 0;
    inited_ = true;
    return {};
  }
  // arrive (optionally arrive.expect_tx: expect first, then arrive, as PTX orders them).
  std::string arrive(int expect_bytes = 0) {
    if (!inited_) return "mbarrier.arrive on an uninitialised mbarrier";
    if (expect_bytes) tx_ += expect_bytes;
    --pending_;
    complete_if_done();
    return {};
  }
  std::string expect_tx(int bytes) {
    if (!inited_) return "mbarrier.expect_tx on an uninitialised mbarrier";
    tx_ += bytes;
    return {};
  }
  // Bytes of an asynchronous copy landed (the TMA unit's complete_tx).
  std::string complete_tx(int bytes) {
    if (!inited_) return "complete_tx on an uninitialised mbarrier";
    tx_ -= bytes;
    if (tx_ < 0 && strict_.tx)
      return "mbarrier transaction count underflow: " + std::to_string(-tx_) +
             " bytes completed beyond those expected in phase " + std::to_string(phase_);
    complete_if_done();
    return {};
  }
  // try_wait.parity by `thread`; `*done` is what the hardware would return. Returns a report on
  // misuse. On success the thread has observed the phase it asked for.
  std::string try_wait(int thread, int parity, bool* done) {
    *done = false;
    if (!inited_) return "mbarrier.try_wait on an uninitialised mbarrier";
    int& seen = seen_[thread];
    *done = (phase_ & 1) != parity;  // the hardware's answer
    if (strict_.parity) {
      if (parity != (seen & 1))
        return "mbarrier.try_wait.parity(" + std::to_string(parity) + ") by thread " +
               std::to_string(thread) + ": wrong parity, its next phase is " +
               std::to_string(seen) + " (parity " + std::to_string(seen & 1) +
               "); the wait returns without that phase completing";
      if (phase_ - seen >= 2)
        return "mbarrier phase overrun: thread " + std::to_string(thread) + " waits for phase " +
               std::to_string(seen) + " but the barrier is at phase " + std::to_string(phase_);
    }
    if (*done) seen = strict_.parity ? seen + 1 : phase_;
    return {};
  }
  // The number of phases `thread` has observed complete (what AsyncSmem checks against).
  int seen(int thread) const {
    const auto it = seen_.find(thread);
    return it == seen_.end() ? 0 : it->second;
  }
  int phase() const { return phase_; }  // phases completed so far
  int tx() const { return tx_; }
  int pending() const { return pending_; }

 private:
  void complete_if_done() {
    if (pending_ <= 0 && tx_ == 0) {
      ++phase_;
      pending_ += count_;  // arrivals beyond count count toward the next phase
    }
  }
  Strictness strict_;
  bool inited_ = false;
  int count_ = 0, pending_ = 0, tx_ = 0, phase_ = 0;
  std::map<int, int> seen_;
};

// ---- wgmma ordering -------------------------------------------------------------------------
// One warpgroup's view (all 128 threads issue the same sequence). Rules modelled:
//   * wgmma.fence must come between a register write by the threads (accumulator or A
//     fragment) and a wgmma.mma_async that reads those registers, and before the first one;
//   * mma_async joins the open group; commit_group closes it; wait_group(n) returns once at
//     most n committed groups are in flight (the uncommitted ones stay in flight);
//   * registers (`reg_id`: an accumulator or A fragment) of an in-flight wgmma may not be read
//     or written by the threads; a wgmma may accumulate into the registers of an in-flight one
//     (the same accumulator chained across k) without a wait.
class WgmmaOrder {
 public:
  void fence() { fenced_ = true; }
  // The threads wrote or read registers `reg_id` (e.g. rescaled the accumulator, converted P).
  std::string touch(int reg_id, bool write) {
    for (const Mma& m : inflight_)
      if (m.acc == reg_id || m.a == reg_id)
        return std::string("registers ") + std::to_string(reg_id) + (write ? " written" : " read") +
               " while a wgmma using them is in flight (missing wgmma.wait_group)";
    if (write) fenced_ = false;
    return {};
  }
  // mma_async accumulating into `acc`, A from registers `a` (-1: A from shared memory).
  std::string mma(int acc, int a = -1) {
    if (!fenced_) return "wgmma.mma_async without wgmma.fence after the registers were written";
    inflight_.push_back({acc, a, -1});
    return {};
  }
  void commit() {
    ++groups_;
    for (Mma& m : inflight_)
      if (m.group < 0) m.group = groups_;
  }
  // wait_group(n): retires every committed group but the newest n.
  void wait(int n) {
    const int keep_from = groups_ - n + 1;  // groups >= keep_from stay in flight
    std::vector<Mma> still;
    for (const Mma& m : inflight_)
      if (m.group < 0 || m.group >= keep_from) still.push_back(m);
    retired_ += int(inflight_.size() - still.size());
    inflight_ = still;
  }
  int inflight() const { return int(inflight_.size()); }
  // The group number (1, 2, ...) of the newest commit; an mma's reads are done once that group
  // is retired, which AsyncSmem asks through `retired_group`.
  int groups() const { return groups_; }
  bool retired_group(int g) const {
    for (const Mma& m : inflight_)
      if (m.group == g) return false;
    return g <= groups_;
  }

 private:
  struct Mma {
    int acc, a, group;
  };
  bool fenced_ = false;
  int groups_ = 0, retired_ = 0;
  std::vector<Mma> inflight_;
};

// ---- async-proxy race check on shared memory ------------------------------------------------
// Per byte: who wrote it last and how the write becomes visible.
//   * A TMA write (tma_write) lands as part of mbarrier `bar`'s phase `phase`; a thread may read
//     it (directly or by the wgmma it issues) only after it observed that phase complete
//     (MBarrier::seen(thread) > phase).
//   * A thread's generic-proxy write (st.shared) is visible to the async proxy (a wgmma or TMA
//     store reading it) only after that thread's fence.proxy.async (then a barrier, which the
//     emulator's generic race check already covers).
//   * A wgmma's read lasts until its commit group is retired: a TMA write or a thread's write
//     into those bytes before that is a write-after-read race (the producer refilling a stage
//     the consumer's wgmma still reads).
class AsyncSmem {
 public:
  explicit AsyncSmem(uint32_t bytes, Strictness s = {}) : bytes_(bytes), strict_(s) {}

  // A TMA copy into [addr, addr + n) accounted on barrier `bar` (its current phase).
  std::string tma_write(uint32_t addr, uint32_t n, const MBarrier* bar, const WgmmaOrder* wg) {
    if (std::string r = check_war(addr, n, wg, "TMA write"); !r.empty()) return r;
    for (uint32_t i = addr; i < addr + n; ++i) bytes_[i] = Byte{Byte::Tma, bar, bar->phase(), -1};
    return {};
  }
  // tma_write as seen by the thread that issues it (the emulator's form): a wgmma read still
  // counts as in flight unless `known(wg, group)` says the issuing thread knows the group
  // retired -- through wait_group in its own warpgroup, or an mbarrier phase it waited on
  // whose arrivals happened after the retirement. A consumer that releases a stage before its
  // wgmma retired is caught whatever order the threads happen to run in. `prunable(wg, group)`:
  // a read every thread knows retired, dropped from the list.
  template <class Known, class Prunable>
  std::string tma_write_from(uint32_t addr, uint32_t n, const MBarrier* bar, Known known,
                             Prunable prunable) {
    std::size_t kept = 0;
    std::string report;
    for (std::size_t i = 0; i < reads_.size(); ++i) {
      const Read& r = reads_[i];
      if (r.wg->retired_group(r.group) && prunable(r.wg, r.group)) continue;
      reads_[kept++] = r;
      if (report.empty() && addr < r.addr + r.n && r.addr < addr + n && !known(r.wg, r.group))
        report = "TMA write into shared memory [" + std::to_string(addr) + ", " +
                 std::to_string(addr + n) + ") that a wgmma still reads, as far as the issuing "
                 "thread knows (no wait_group, then mbarrier arrive, before the stage's release)";
    }
    reads_.resize(kept);
    if (!report.empty()) return report;
    for (uint32_t i = addr; i < addr + n; ++i) bytes_[i] = Byte{Byte::Tma, bar, bar->phase(), -1};
    return {};
  }
  // A thread's st.shared of [addr, addr + n).
  std::string thread_write(int thread, uint32_t addr, uint32_t n, const WgmmaOrder* wg) {
    if (std::string r = check_war(addr, n, wg, "store by thread " + std::to_string(thread));
        !r.empty())
      return r;
    for (uint32_t i = addr; i < addr + n; ++i) bytes_[i] = Byte{Byte::Generic, nullptr, 0, thread};
    return {};
  }
  // fence.proxy.async by `thread`: its generic writes so far become visible to the async proxy.
  void fence_proxy_async(int thread) {
    for (Byte& b : bytes_)
      if (b.kind == Byte::Generic && b.writer == thread) b.kind = Byte::Fenced;
  }
  // A wgmma issued by `thread` (any of the warpgroup) reads [addr, addr + n) until the group
  // that `wg`'s next commit closes is retired: the check for this thread, then the record.
  std::string wgmma_read(int thread, uint32_t addr, uint32_t n, const WgmmaOrder* wg) {
    if (std::string r = wgmma_check(thread, addr, n); !r.empty()) return r;
    wgmma_record(addr, n, wg);
    return {};
  }
  // The two halves of wgmma_read, for the emulator (csrc/emulate/runtime.cpp), which checks
  // every thread of the warpgroup but records the warpgroup's read once. The check reads
  // the bytes at `step`-byte granularity (TMA writes whole 16-byte chunks; 1 checks all).
  std::string wgmma_check(int thread, uint32_t addr, uint32_t n, uint32_t step = 1) const {
    for (uint32_t i = addr; i < addr + n; i += step) {
      const Byte& b = bytes_[i];
      if (b.kind == Byte::Tma && strict_.proxy && b.bar->seen(thread) <= b.phase)
        return "wgmma by thread " + std::to_string(thread) + " reads shared memory [" +
               std::to_string(i) + ", ...) that a TMA write completes in mbarrier phase " +
               std::to_string(b.phase) + ", before the thread waited on that phase";
      if (b.kind == Byte::Generic && strict_.proxy)
        return "wgmma reads shared memory [" + std::to_string(i) + ", ...) written by thread " +
               std::to_string(b.writer) + " without fence.proxy.async";
      if (b.kind == Byte::Unwritten)
        return "wgmma reads shared memory [" + std::to_string(i) + ", ...) nothing wrote";
    }
    return {};
  }
  void wgmma_record(uint32_t addr, uint32_t n, const WgmmaOrder* wg) {
    reads_.push_back({addr, n, wg->groups() + 1, wg});
  }

 private:
  struct Byte {
    enum Kind { Unwritten, Tma, Generic, Fenced } kind = Unwritten;
    const MBarrier* bar = nullptr;
    int phase = 0;
    int writer = -1;
  };
  struct Read {
    uint32_t addr, n;
    int group;             // the commit group the read belongs to
    const WgmmaOrder* wg;  // of the warpgroup that issued it
  };
  // Reads whose group has retired are dropped (a retired group stays retired), so the list
  // holds only the reads still in flight. `wg` is unused: each read knows its warpgroup.
  std::string check_war(uint32_t addr, uint32_t n, const WgmmaOrder* /*wg*/,
                        const std::string& who) {
    std::size_t kept = 0;
    std::string report;
    for (std::size_t i = 0; i < reads_.size(); ++i) {
      const Read& r = reads_[i];
      if (r.wg->retired_group(r.group)) continue;
      reads_[kept++] = r;
      if (report.empty() && addr < r.addr + r.n && r.addr < addr + n)
        report = who + " into shared memory [" + std::to_string(addr) + ", " +
                 std::to_string(addr + n) + ") that an in-flight wgmma still reads";
    }
    reads_.resize(kept);
    return report;
  }
  std::vector<Byte> bytes_;
  Strictness strict_;
  std::vector<Read> reads_;
};

}  // namespace sm90
}  // namespace emu
