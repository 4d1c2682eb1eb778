// The CTA emulator (see runtime.h): fibers, the warp/CTA scheduler, the instruction models
// and the shared-memory shadow that checks for races.
#include "emulate/runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include "emulate/cuda_runtime.h"
#include "emulate/float16.h"
#include "emulate/sm90_async.h"
#include "emulate/sm90_gmma.h"
#include <array>
#include <map>
#include <set>
#include <memory>

#if defined(__x86_64__) && defined(__ELF__) && !defined(DISTATTN_EMULATE_UCONTEXT)
#define DISTATTN_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if DISTATTN_EMU_ASM_SWITCH
// distattn_emu_switch(save, to): saves the callee-saved registers on the current stack, stores
// the stack pointer in *save, switches to `to` and restores what is saved there. A new fiber's
// stack is prepared to look like a saved one. (The SSE/x87 control words are not switched:
// no fiber changes them.)
asm(R"(
  .text
  .globl distattn_emu_switch
  .hidden distattn_emu_switch
  .type distattn_emu_switch, @function
distattn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size distattn_emu_switch, .-distattn_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
extern "C" void distattn_emu_switch(void** save, void* to);
#endif

namespace distattn {
namespace kern {
__thread __attribute__((aligned(1024))) unsigned char smem_raw[emu::kMaxSmemBytesSm90];
}  // namespace kern

namespace emu {

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
// Each fiber owns an aligned span of kSpanBytes: a guard page at the bottom, the stack, and at
// the top a header holding the fiber's address, so that code running on a fiber finds its
// fiber from the stack pointer (self()), without thread-local storage.
constexpr std::size_t kSpanBytes = 256 * 1024;
constexpr std::size_t kGuardBytes = 4096;
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kStackBytes = kSpanBytes - kGuardBytes - kHeaderBytes;

// kBlocked: waiting for an sm_90 event (mbarrier phase, the rest of its warpgroup at a
// warpgroup-wide instruction, a named barrier, registers for setmaxnreg); see Runner::ready.
enum class State : uint8_t { kRunnable, kAtWarpOp, kAtBarrier, kExited, kBlocked };
enum class Wait : uint8_t { kNone, kMbar, kWarpgroup, kNamed, kRegs };
enum class Op : uint8_t { kNone, kMma, kLdsm, kShfl, kSyncwarp };
enum class Kind : uint8_t { kNone, kCpAsync, kLdmatrix, kLdShared, kStShared };

const char* op_name(Op op) {
  switch (op) {
    case Op::kMma: return "mma.sync";
    case Op::kLdsm: return "ldmatrix";
    case Op::kShfl: return "shfl.sync";
    case Op::kSyncwarp: return "__syncwarp";
    default: return "?";
  }
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kCpAsync: return "cp.async";
    case Kind::kLdmatrix: return "ldmatrix";
    case Kind::kLdShared: return "ld.shared";
    case Kind::kStShared: return "st.shared";
    default: return "?";
  }
}

// Operands a lane hands to a warp-collective instruction, and its results.
struct LaneIO {
  Op op = Op::kNone;
  MmaType mma_type = MmaType::kF16;
  bool trans = false;
  unsigned member_mask = 0;
  int lane_mask = 0;
  int width = 0;
  const unsigned char* addr = nullptr;
  uint32_t a[4] = {};
  uint32_t b[2] = {};
  float c[4] = {};
  uint32_t u[4] = {};
  float d[4] = {};
};

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  bool pred;
  long group;  // -1 until committed
};

struct Runner;

struct Fiber {
#if DISTATTN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  unsigned char* stack = nullptr;  // lowest usable byte (a guard page lies below)
  Runner* runner = nullptr;
  dim3 tid;
  int id = 0;
  State state = State::kExited;
  LaneIO io;
  std::vector<AsyncCopy> copies;
  long committed = 0;
  uint64_t cta_synced = 0;  // clock of the last __syncthreads it passed (or the CTA start)
  // What a kBlocked fiber waits for: the object and the value it had when the fiber blocked.
  Wait wait = Wait::kNone;
  const void* wait_obj = nullptr;
  uint64_t wait_val = 0;
  // known[w]: the newest wgmma commit group of warpgroup w this thread knows retired (its own
  // wait_group, or learnt through an mbarrier phase / __syncthreads that came after one).
  int known[8] = {};
};

// What the arrivals of an mbarrier's phases knew (Fiber::known, joined): a thread that waits
// on a phase learns it.
struct BarKnowledge {
  int pending[8] = {};
  std::map<int, std::array<int, 8>> done;  // by phase
};

namespace sm90 = ::emu::sm90;

// A wgmma whose result has not yet reached the threads' registers (until wait_group).
struct PendingMma {
  int group = -1;             // commit group, -1 while open
  std::vector<float*> ptrs;   // 128 threads x n/2 registers
  std::vector<float> vals;
};

// One warpgroup's state for the warpgroup-wide instructions.
enum class WgOp : int { kNone, kWgmma, kFence, kCommit, kWait, kRegs };
struct Warpgroup {
  int arrived = 0;
  uint64_t gen = 0;
  WgOp op[128] = {};
  long arg[128] = {};
  WgmmaIssue issue[128];
  sm90::WgmmaOrder order;
  std::vector<PendingMma> pending;
  int regs = 0;  // setmaxnreg's current count per thread
};

struct NamedBar {
  int arrived = 0, threads = 0;
  uint64_t gen = 0;
};

// One access in the shadow of a 4-byte granule of shared memory.
struct Access {
  uint64_t time = 0;  // the clock when it happened; < cta_start: before this CTA
  int32_t tid = -1;
  Kind kind = Kind::kNone;
};
struct Cell {
  Access w;       // last write (or the cp.async in flight to it)
  Access r1, r2;  // last read, and the last read by a thread other than r1's
  bool pending = false;
};

// The fiber whose stack the caller runs on (only valid on a fiber).
inline Fiber* self() {
  const uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  return *reinterpret_cast<Fiber**>((sp | (kSpanBytes - 1)) + 1 - kHeaderBytes);
}

thread_local std::string t_last_message;
thread_local cudaError_t t_last_error = cudaSuccess;

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return name;
  }
  std::ostringstream s;
  s << "kernel@" << kernel;
  return s.str();
}

[[noreturn]] void fiber_main();

// Everything one OS thread needs to run CTAs: the fibers and their stacks, the scheduler's
// context, the shadow of shared memory and the CTA being run.
struct Runner {
  std::vector<Fiber> fibers;
  void* mapping = nullptr;
  std::size_t mapped_bytes = 0;
  bool in_fiber = false;  // a fiber is running (errors stop it) or the scheduler is
#if DISTATTN_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  std::vector<Cell> shadow;
  std::vector<uint64_t> warp_synced;
  uint64_t clock = 0, cta_start = 0;

  // The CTA being run.
  const void* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  int nthreads = 0;
  std::size_t smem_bytes = 0;
  unsigned char* smem = nullptr;
  bool failed = false;
  std::string error;

  // sm_90 state of the CTA being run (reset by run_cta).
  std::map<uint32_t, sm90::MBarrier> mbars;  // by shared address
  std::map<const sm90::MBarrier*, BarKnowledge> bar_known;
  std::unique_ptr<sm90::AsyncSmem> async;    // created by the first sm_90 instruction
  Warpgroup wgs[kMaxThreads / 128];
  NamedBar named[16];
  Warpgroup regs_changed;  // only its gen: bumped by every setmaxnreg
  long resumes = 0;

  Runner() : fibers(kMaxThreads) {
    mapped_bytes = kSpanBytes * (kMaxThreads + 1);  // one more span to align them
    mapping = mmap(nullptr, mapped_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) {
      std::fprintf(stderr, "distattn emulator: cannot map fiber stacks\n");
      std::abort();
    }
    const uintptr_t first =
        (reinterpret_cast<uintptr_t>(mapping) + kSpanBytes - 1) & ~uintptr_t(kSpanBytes - 1);
    for (int i = 0; i < kMaxThreads; ++i) {
      auto* span = reinterpret_cast<unsigned char*>(first + kSpanBytes * i);
      mprotect(span, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
      fibers[i].stack = span + kGuardBytes;
      fibers[i].id = i;
      fibers[i].runner = this;
      *reinterpret_cast<Fiber**>(span + kSpanBytes - kHeaderBytes) = &fibers[i];
    }
  }
  ~Runner() { munmap(mapping, mapped_bytes); }

  // -- context switches -----------------------------------------------------------------------
  void prepare(Fiber& f) {
#if DISTATTN_EMU_ASM_SWITCH
    // A frame as distattn_emu_switch leaves it: r15..rbp, then the return address =
    // fiber_main, placed so that fiber_main starts with the stack aligned as after a call.
    const uintptr_t top = reinterpret_cast<uintptr_t>(f.stack) + kStackBytes;  // 16-aligned
    auto* frame = reinterpret_cast<uint64_t*>(top - 64);
    std::memset(frame, 0, 64);
    frame[6] = reinterpret_cast<uint64_t>(&fiber_main);
    f.sp = frame;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
  }

  void resume(Fiber& f) {
    in_fiber = true;
#if DISTATTN_EMU_ASM_SWITCH
    distattn_emu_switch(&sched_sp, f.sp);
#else
    swapcontext(&sched_ctx, &f.ctx);
#endif
    in_fiber = false;
  }

  // From fiber f to fiber g (same OS thread).
  static void switch_to(Fiber& f, Fiber& g) {
#if DISTATTN_EMU_ASM_SWITCH
    distattn_emu_switch(&f.sp, g.sp);
#else
    swapcontext(&f.ctx, &g.ctx);
#endif
  }

  // From fiber f, which has just stopped at a warp operation, a barrier or its exit: run the
  // next lane of its warp that can run. The last lane to arrive at a warp operation executes
  // it for the whole warp and hands over to the first lane. When the warp is stuck (barrier,
  // exit, divergence), back to the scheduler. Returns when f runs again.
  void next_lane(Fiber& f) {
    const int lo = f.id / kWarpSize * kWarpSize, hi = std::min(nthreads, lo + kWarpSize);
    for (int i = f.id + 1; i < hi; ++i) {
      if (fibers[i].state == State::kBlocked && ready(fibers[i]))
        fibers[i].state = State::kRunnable;
      if (fibers[i].state == State::kRunnable) return switch_to(f, fibers[i]);
    }
    bool all_at_op = hi - lo == kWarpSize;
    for (int i = lo; i < hi && all_at_op; ++i) all_at_op = fibers[i].state == State::kAtWarpOp;
    if (!all_at_op) return yield(f);
    exec_warp_op(lo / kWarpSize);
    if (failed) return yield(f);  // never resumed
    for (int i = lo; i < hi; ++i) fibers[i].state = State::kRunnable;
    if (&fibers[lo] != &f) switch_to(f, fibers[lo]);
  }

  // From fiber f: back to the scheduler.
  void yield(Fiber& f) {
#if DISTATTN_EMU_ASM_SWITCH
    distattn_emu_switch(&f.sp, sched_sp);
#else
    swapcontext(&f.ctx, &sched_ctx);
#endif
  }

  // -- errors ---------------------------------------------------------------------------------
  std::string who(int tid) const {
    std::ostringstream s;
    s << "thread " << tid << " (warp " << tid / kWarpSize << ", lane " << tid % kWarpSize << ")";
    return s.str();
  }

  void set_error(const std::string& what) {
    if (failed) return;
    failed = true;
    std::ostringstream s;
    s << "distattn emulator: " << kernel_name(kernel) << ", block (" << block_idx.x << ", "
      << block_idx.y << ", " << block_idx.z << "): " << what;
    error = s.str();
  }

  // From a fiber: record the error and never come back (the CTA is abandoned).
  [[noreturn]] void fail(const std::string& what) {
    set_error(what);
    yield(*self());
    std::abort();  // unreachable: a failed CTA's fibers are never resumed
  }

  // -- shared-memory shadow -------------------------------------------------------------------
  bool ordered(const Access& a, int q) const {
    if (fibers[q].cta_synced > a.time) return true;
    return a.tid / kWarpSize == q / kWarpSize && warp_synced[q / kWarpSize] > a.time;
  }

  std::size_t offset_of(const void* p, std::size_t bytes, const char* what, int tid) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < smem || c + bytes > smem + smem_bytes) {
      std::ostringstream s;
      s << who(tid) << ": " << what << " of " << bytes << " bytes at " << p
        << " lies outside the block's " << smem_bytes << " bytes of dynamic shared memory";
      report(s.str());
      return SIZE_MAX;
    }
    return std::size_t(c - smem);
  }

  // An error found either in a fiber (which then stops) or by the scheduler (which returns).
  void report(const std::string& what) {
    if (in_fiber) fail(what);
    set_error(what);
  }

  // What an access found wrong with a granule (kOk: nothing).
  enum class Hazard { kOk, kUninitialised, kInFlight, kRaw, kWaw, kWar };

  Hazard check_read(const Cell& c, int q) const {
    if (c.w.time < cta_start) return Hazard::kUninitialised;
    if (c.pending) return Hazard::kInFlight;
    if (c.w.tid != q && !ordered(c.w, q)) return Hazard::kRaw;
    return Hazard::kOk;
  }

  Hazard check_write(const Cell& c, int q, const Access** war) const {
    const bool written = c.w.time >= cta_start;
    if (written && c.pending) return Hazard::kInFlight;
    if (written && c.w.tid != q && !ordered(c.w, q)) return Hazard::kWaw;
    for (const Access* r : {&c.r1, &c.r2})
      if (r->time >= cta_start && r->tid != q && !ordered(*r, q)) {
        *war = r;
        return Hazard::kWar;
      }
    return Hazard::kOk;
  }

  void report_hazard(Hazard h, int q, bool is_write, Kind kind, std::size_t g, const Cell& c,
                     const Access* war) {
    std::ostringstream s;
    const char* verb = is_write ? " writes (" : " reads (";
    s << (h == Hazard::kRaw || h == Hazard::kWaw || h == Hazard::kWar ? "shared-memory race: "
                                                                         : "")
      << who(q) << verb << kind_name(kind) << ") shared bytes [" << 4 * g << ", " << 4 * g + 4
      << ") ";
    switch (h) {
      case Hazard::kUninitialised:
        s << "that no thread of this block has written yet (uninitialised shared memory, or a "
          << "missing barrier after the write)";
        break;
      case Hazard::kInFlight:
        s << "while the cp.async that " << who(c.w.tid) << " issued to them is still in flight "
          << "(missing cp.async wait, or a __syncthreads() after it)";
        break;
      case Hazard::kRaw:
        s << "that " << who(c.w.tid) << " wrote (" << kind_name(c.w.kind) << ") with no barrier "
          << "between the write and the read (missing __syncthreads()?)";
        break;
      case Hazard::kWaw:
        s << "that " << who(c.w.tid) << " also wrote (" << kind_name(c.w.kind) << ") with no "
          << "barrier in between (missing __syncthreads()?)";
        break;
      case Hazard::kWar:
        s << "that " << who(war->tid) << " read (" << kind_name(war->kind) << ") with no "
          << "barrier between the read and the write (missing __syncthreads()?)";
        break;
      case Hazard::kOk: break;
    }
    report(s.str());
  }

  // Returns false after reporting an error.
  bool shadow_read(int q, std::size_t off, std::size_t bytes, Kind kind) {
    for (std::size_t g = off / 4; g < (off + bytes + 3) / 4; ++g) {
      Cell& c = shadow[g];
      const Hazard h = check_read(c, q);
      if (h != Hazard::kOk) {
        report_hazard(h, q, false, kind, g, c, nullptr);
        return false;
      }
      const Access now{clock, q, kind};
      if (c.r1.time >= cta_start && c.r1.tid != q) c.r2 = c.r1;
      c.r1 = now;
    }
    return true;
  }

  bool shadow_write(int q, std::size_t off, std::size_t bytes, Kind kind, bool pending) {
    for (std::size_t g = off / 4; g < (off + bytes + 3) / 4; ++g) {
      Cell& c = shadow[g];
      const Access* war = nullptr;
      const Hazard h = check_write(c, q, &war);
      if (h != Hazard::kOk) {
        report_hazard(h, q, true, kind, g, c, war);
        return false;
      }
      c.w = Access{clock, q, kind};
      c.pending = pending;
    }
    return true;
  }

  // -- asynchronous copies --------------------------------------------------------------------
  void complete_copies(Fiber& f, int n) {
    std::size_t kept = 0;
    for (std::size_t i = 0; i < f.copies.size(); ++i) {
      AsyncCopy& cp = f.copies[i];
      const bool done = n == 0 || (cp.group >= 0 && cp.group < f.committed - n);
      if (!done) {
        f.copies[kept++] = cp;
        continue;
      }
      if (cp.pred)
        std::memcpy(cp.dst, cp.src, 16);
      else
        std::memset(cp.dst, 0, 16);
      const std::size_t g0 = std::size_t(cp.dst - smem) / 4;
      for (std::size_t g = g0; g < g0 + 4; ++g) {
        shadow[g].pending = false;
        shadow[g].w = Access{clock, f.id, Kind::kCpAsync};
      }
    }
    f.copies.resize(kept);
  }

  // -- warp-collective instructions (run by the scheduler once the whole warp is there) -------
  void exec_warp_op(int w) {
    Fiber* lanes = &fibers[w * kWarpSize];
    const LaneIO& io0 = lanes[0].io;
    for (int l = 1; l < kWarpSize; ++l) {
      const LaneIO& io = lanes[l].io;
      if (io.op != io0.op || io.trans != io0.trans || io.mma_type != io0.mma_type) {
        std::ostringstream s;
        s << "warp " << w << " diverged at a warp-collective instruction: lane 0 is at "
          << op_name(io0.op) << (io0.trans ? ".trans" : "") << ", lane " << l << " at "
          << op_name(io.op) << (io.trans ? ".trans" : "");
        return set_error(s.str());
      }
    }
    switch (io0.op) {
      case Op::kMma: exec_mma(lanes); break;
      case Op::kLdsm: exec_ldmatrix(lanes, io0.trans); break;
      case Op::kShfl: exec_shfl(lanes); break;
      case Op::kSyncwarp:
        for (int l = 0; l < kWarpSize; ++l)
          if (lanes[l].io.member_mask != 0xffffffffu)
            return set_error("__syncwarp with a partial member mask is not modelled");
        warp_synced[w] = ++clock;
        break;
      default: return set_error("internal: unknown warp operation");
    }
  }

  // mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, lane = 4g + t:
  //   A[g + 8*(q%2)][2t + j + 8*(q/2)] = half j of a[q]   (q = 0..3, j = 0 low, 1 high)
  //   B[2t + j + 8q][g]                = half j of b[q]   (q = 0..1)
  //   C/D[g + 8*(e/2)][2t + e%2]       = c[e] / d[e]      (e = 0..3)
  // Products of 16-bit floats are exact in float; they are summed in k order in float and
  // added to C (the hardware's internal order and rounding of the sum is not specified).
  void exec_mma(Fiber* lanes) {
    const bool bf16 = lanes[0].io.mma_type == MmaType::kBF16;
    const float* half_table = half_to_float_table();
    auto cvt = [bf16, half_table](uint32_t reg, int j) {
      const uint16_t h = uint16_t(j == 0 ? reg & 0xffffu : reg >> 16);
      return bf16 ? bf16_to_float(h) : half_table[h];
    };
    float A[16][16], B[16][8], D[16][8] = {};
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const LaneIO& io = lanes[lane].io;
      const int g = lane / 4, t = lane % 4;
      for (int q = 0; q < 4; ++q)
        for (int j = 0; j < 2; ++j) A[g + 8 * (q % 2)][2 * t + j + 8 * (q / 2)] = cvt(io.a[q], j);
      for (int q = 0; q < 2; ++q)
        for (int j = 0; j < 2; ++j) B[2 * t + j + 8 * q][g] = cvt(io.b[q], j);
    }
    // Every D element is summed in k order; the loop order lets the compiler vectorise over n.
    for (int k = 0; k < 16; ++k)
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) D[m][n] += A[m][k] * B[k][n];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      LaneIO& io = lanes[lane].io;
      const int g = lane / 4, t = lane % 4;
      for (int e = 0; e < 4; ++e) io.d[e] = io.c[e] + D[g + 8 * (e / 2)][2 * t + e % 2];
    }
  }

  // All 65536 half -> float conversions (a 256 KiB table, built once).
  static const float* half_to_float_table() {
    static const std::vector<float> table = [] {
      std::vector<float> t(65536);
      for (uint32_t h = 0; h < 65536; ++h) t[h] = half_to_float(uint16_t(h));
      return t;
    }();
    return table.data();
  }

  // ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane L gives the address of row L%8 of
  // 8x8 matrix L/8 (16 bytes). Register i of lane l receives, from matrix i:
  //   plain:  row l/4, elements 2(l%4) and 2(l%4)+1 (low, high half)
  //   .trans: element l/4 of rows 2(l%4) and 2(l%4)+1
  void exec_ldmatrix(Fiber* lanes, bool trans) {
    const unsigned char* rows[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) {
      const int q = lanes[l].id;
      const unsigned char* a = lanes[l].io.addr;
      if (reinterpret_cast<uintptr_t>(a) % 16 != 0) {
        std::ostringstream s;
        s << who(q) << ": ldmatrix row address " << static_cast<const void*>(a)
          << " is not 16-byte aligned";
        return set_error(s.str());
      }
      const std::size_t off = offset_of(a, 16, "ldmatrix row", q);
      if (off == SIZE_MAX || !shadow_read(q, off, 16, Kind::kLdmatrix)) return;
      rows[l] = a;
    }
    auto elem = [&](int row, int i) {
      uint16_t h;
      std::memcpy(&h, rows[row] + 2 * i, 2);
      return uint32_t(h);
    };
    for (int l = 0; l < kWarpSize; ++l) {
      LaneIO& io = lanes[l].io;
      for (int m = 0; m < 4; ++m) {
        if (!trans) {
          io.u[m] = elem(8 * m + l / 4, 2 * (l % 4)) | elem(8 * m + l / 4, 2 * (l % 4) + 1) << 16;
        } else {
          io.u[m] = elem(8 * m + 2 * (l % 4), l / 4) | elem(8 * m + 2 * (l % 4) + 1, l / 4) << 16;
        }
      }
    }
  }

  void exec_shfl(Fiber* lanes) {
    uint32_t in[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) {
      const LaneIO& io = lanes[l].io;
      if (io.member_mask != 0xffffffffu || io.width != kWarpSize)
        return set_error("shfl.sync with a partial member mask or a width below 32 is not "
                         "modelled");
      in[l] = io.u[0];
    }
    for (int l = 0; l < kWarpSize; ++l)
      lanes[l].io.u[0] = in[(l ^ lanes[l].io.lane_mask) & (kWarpSize - 1)];
  }

  // -- sm_90a: blocking, warpgroups, mbarriers, TMA, wgmma -------------------------------------
  bool ready(const Fiber& f) const {
    switch (f.wait) {
      case Wait::kMbar: return static_cast<const sm90::MBarrier*>(f.wait_obj)->phase() != int(f.wait_val);
      case Wait::kWarpgroup:
      case Wait::kRegs: return static_cast<const Warpgroup*>(f.wait_obj)->gen != f.wait_val;
      case Wait::kNamed: return static_cast<const NamedBar*>(f.wait_obj)->gen != f.wait_val;
      default: return true;
    }
  }

  // From fiber f: stop until `ready` holds (the scheduler runs the others meanwhile).
  void block(Fiber& f, Wait what, const void* obj, uint64_t val) {
    f.wait = what;
    f.wait_obj = obj;
    f.wait_val = val;
    f.state = State::kBlocked;
    next_lane(f);
    f.wait = Wait::kNone;
  }

  std::string deadlock_message() const {
    std::ostringstream s;
    s << "deadlock: no thread can make progress;";
    int shown = 0;
    // The threads that wait for something other than their own warpgroup first: they say why.
    for (int k = 0; k < 2 * nthreads && shown < 4; ++k) {
      const int i = k % nthreads;
      const Fiber& f = fibers[i];
      const bool wg_wait = f.state == State::kBlocked && f.wait == Wait::kWarpgroup;
      if (f.state == State::kExited || wg_wait != (k >= nthreads)) continue;
      ++shown;
      s << " " << who(i) << " ";
      switch (f.state) {
        case State::kAtBarrier: s << "waits at __syncthreads()"; break;
        case State::kAtWarpOp: s << "waits at " << op_name(f.io.op); break;
        case State::kBlocked:
          s << (f.wait == Wait::kMbar        ? "waits on an mbarrier phase that never completes"
                : f.wait == Wait::kWarpgroup ? "waits for the rest of its warpgroup"
                : f.wait == Wait::kNamed     ? "waits at a named barrier"
                                             : "waits for registers (setmaxnreg.inc)");
          break;
        default: s << "is runnable"; break;
      }
      s << ";";
    }
    return s.str();
  }

  void reset_sm90() {
    mbars.clear();
    bar_known.clear();
    async.reset();
    for (int i = 0; i < nthreads; ++i)
      for (int& k : fibers[i].known) k = 0;
    const int def = std::min(255, 65536 / std::max(1, nthreads)) / 8 * 8;
    for (Warpgroup& wg : wgs) {
      wg.arrived = 0;
      wg.gen = 0;
      wg.order = sm90::WgmmaOrder();
      wg.pending.clear();
      wg.regs = def;
    }
    for (NamedBar& b : named) b = NamedBar();
  }

  // End of a CTA whose threads all exited: nothing asynchronous may be left behind.
  bool finish_cta() {
    for (int w = 0; w < (nthreads + 127) / 128; ++w)
      if (!wgs[w].pending.empty()) {
        std::ostringstream s;
        s << "warpgroup " << w << " exits with " << wgs[w].pending.size()
          << " wgmma results never waited for (missing wgmma.wait_group)";
        set_error(s.str());
        return false;
      }
    return true;
  }

  sm90::AsyncSmem& async_smem() {
    if (!async) async = std::make_unique<sm90::AsyncSmem>(uint32_t(smem_bytes));
    return *async;
  }

  // A warpgroup-wide instruction: every thread of the warpgroup must reach the same one. The
  // last to arrive gets `true` and performs it, then calls wg_release; the others block.
  bool wg_arrive(Fiber& f, WgOp op, long arg) {
    if (nthreads % 128 != 0) fail(who(f.id) + ": a warpgroup instruction in a block of " +
                                  std::to_string(nthreads) + " threads (not a multiple of 128)");
    Warpgroup& wg = wgs[f.id / 128];
    wg.op[f.id % 128] = op;
    wg.arg[f.id % 128] = arg;
    if (++wg.arrived < 128) {
      block(f, Wait::kWarpgroup, &wg, wg.gen);
      return false;
    }
    for (int t = 1; t < 128; ++t)
      if (wg.op[t] != wg.op[0] || wg.arg[t] != wg.arg[0]) {
        std::ostringstream s;
        s << "warpgroup " << f.id / 128 << " diverged at a warpgroup instruction: thread "
          << (f.id / 128) * 128 << " and thread " << (f.id / 128) * 128 + t
          << " are at different ones (or with different operands)";
        fail(s.str());
      }
    return true;
  }
  void wg_release(Warpgroup& wg) {
    wg.arrived = 0;
    ++wg.gen;
  }

  uint32_t smem_off(const void* p, std::size_t bytes, const char* what, int tid) {
    const std::size_t off = offset_of(p, bytes, what, tid);
    return uint32_t(off);
  }

  // After an arrive or complete_tx on b (phase `before` then): a completed phase keeps what
  // its arrivals knew.
  void phase_knowledge(const sm90::MBarrier& b, int before) {
    if (b.phase() == before) return;
    BarKnowledge& k = bar_known[&b];
    std::array<int, 8> done;
    std::copy(k.pending, k.pending + 8, done.begin());
    k.done[before] = done;
    for (int& x : k.pending) x = 0;
  }
  // May thread `tid` overwrite bytes a read of (wg, group) covers? Only if it knows it retired.
  bool knows_retired(int tid, const sm90::WgmmaOrder* order, int group) const {
    for (int w = 0; w < 8; ++w)
      if (&wgs[w].order == order) return fibers[tid].known[w] >= group;
    return false;
  }
  bool all_know_retired(const sm90::WgmmaOrder* order, int group) const {
    for (int i = 0; i < nthreads; ++i)
      if (fibers[i].state != State::kExited && !knows_retired(i, order, group)) return false;
    return true;
  }

  sm90::MBarrier& mbar_at(const void* bar, int tid, const char* what) {
    const uint32_t off = smem_off(bar, 8, what, tid);
    if (off % 8 != 0) fail(who(tid) + ": " + what + " at a shared address not 8-byte aligned");
    auto it = mbars.find(off);
    if (it == mbars.end()) fail(who(tid) + ": " + what + " on an mbarrier never initialised");
    return it->second;
  }

  // The last thread of the warpgroup runs the wgmma for all 128.
  void exec_wgmma(Warpgroup& wg, int wg_index) {
    const WgmmaIssue& i0 = wg.issue[0];
    for (int t = 1; t < 128; ++t) {
      const WgmmaIssue& it = wg.issue[t];
      if (it.type != i0.type || it.n != i0.n || it.a_mn_major != i0.a_mn_major ||
          it.b_mn_major != i0.b_mn_major || it.scale_d != i0.scale_d ||
          it.a_from_regs != i0.a_from_regs || it.desc_b != i0.desc_b ||
          (!i0.a_from_regs && it.desc_a != i0.desc_a))
        fail("warpgroup " + std::to_string(wg_index) + ": threads 0 and " + std::to_string(t) +
             " issue different wgmma instructions (operands, shape or descriptors differ)");
    }
    if (std::string r = wg.order.mma(0); !r.empty()) fail("warpgroup " + std::to_string(wg_index) + ": " + r);
    const int N = i0.n;
    const bool bf16 = i0.type == MmaType::kBF16;
    const float* half_table = half_to_float_table();
    auto cvt = [bf16, half_table](uint16_t h) { return bf16 ? bf16_to_float(h) : half_table[h]; };
    std::vector<uint32_t> chunks;
    auto smem_elem = [&](uint64_t desc, bool mn_major, int mn, int k) {
      const uint32_t a = sm90::operand_address(desc, mn_major ? sm90::Major::MN : sm90::Major::K,
                                               mn, k, 2);
      if (a == ~0u || a + 2 > smem_bytes)
        fail("warpgroup " + std::to_string(wg_index) + ": wgmma operand address " +
             std::to_string(a) + " outside the block's " + std::to_string(smem_bytes) +
             " bytes of dynamic shared memory (descriptor or layout not modelled)");
      chunks.push_back(a & ~15u);
      uint16_t h;
      std::memcpy(&h, smem + a, 2);
      return cvt(h);
    };
    static thread_local std::vector<float> A, B;
    A.assign(64 * 16, 0.f);
    B.assign(size_t(N) * 16, 0.f);
    for (int m = 0; m < 64; ++m)
      if (!i0.a_from_regs)
        for (int k = 0; k < 16; ++k) A[m * 16 + k] = smem_elem(i0.desc_a, i0.a_mn_major, m, k);
    if (i0.a_from_regs)
      for (int t = 0; t < 128; ++t)
        for (int v = 0; v < 8; ++v) {
          const sm90::Coord c = sm90::a_coord(t, v);
          const uint32_t reg = wg.issue[t].a_regs[v / 2];
          A[c.row * 16 + c.col] = cvt(uint16_t(v % 2 == 0 ? reg & 0xffffu : reg >> 16));
        }
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < 16; ++k) B[k * N + n] = smem_elem(i0.desc_b, i0.b_mn_major, n, k);
    // The async-proxy check for every thread, then one record of the warpgroup's reads.
    std::sort(chunks.begin(), chunks.end());
    chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
    sm90::AsyncSmem& as = async_smem();
    for (int t = 0; t < 128; ++t)
      for (uint32_t c : chunks)
        if (std::string r = as.wgmma_check(wg_index * 128 + t, c, 16, 16); !r.empty())
          fail("warpgroup " + std::to_string(wg_index) + ": " + r);
    for (std::size_t i = 0; i < chunks.size();) {
      std::size_t j = i + 1;
      while (j < chunks.size() && chunks[j] == chunks[j - 1] + 16) ++j;
      as.wgmma_record(chunks[i], uint32_t(16 * (j - i)), &wg.order);
      i = j;
    }
    // D = A B in k order (float), + C: the registers, or the pending result of the wgmma
    // this one chains onto (same accumulator registers, not yet retired).
    std::vector<float> D(size_t(64) * N, 0.f);
    for (int k = 0; k < 16; ++k)
      for (int m = 0; m < 64; ++m)
        for (int n = 0; n < N; ++n) D[m * N + n] += A[m * 16 + k] * B[k * N + n];
    PendingMma pm;
    pm.ptrs.resize(size_t(128) * (N / 2));
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < N / 2; ++v) pm.ptrs[t * (N / 2) + v] = wg.issue[t].d[v];
    const PendingMma* chain = nullptr;
    for (auto it = wg.pending.rbegin(); it != wg.pending.rend() && !chain; ++it)
      if (it->ptrs == pm.ptrs) chain = &*it;
    pm.vals.resize(pm.ptrs.size());
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < N / 2; ++v) {
        const sm90::Coord c = sm90::acc_coord(t, v);
        const std::size_t i = t * (N / 2) + v;
        const float old = !i0.scale_d ? 0.f : chain ? chain->vals[i] : *pm.ptrs[i];
        pm.vals[i] = old + D[c.row * N + c.col];
      }
    wg.pending.push_back(std::move(pm));
  }

  // wait_group(n): the results of every committed group but the newest n reach the registers.
  void exec_wgmma_wait(Warpgroup& wg, int n) {
    wg.order.wait(n);
    const int last_retired = wg.order.groups() - n;
    std::vector<PendingMma> still;
    for (PendingMma& pm : wg.pending) {
      if (pm.group >= 0 && pm.group <= last_retired) {
        for (std::size_t i = 0; i < pm.ptrs.size(); ++i) *pm.ptrs[i] = pm.vals[i];
      } else {
        still.push_back(std::move(pm));
      }
    }
    wg.pending = std::move(still);
    const int w = int(&wg - wgs);
    for (int t = 128 * w; t < 128 * w + 128; ++t)
      fibers[t].known[w] = std::max(fibers[t].known[w], last_retired);
    (void)wg.order.touch(-1, true);  // threads may write registers now: the next wgmma needs a fence
  }

  // -- the scheduler --------------------------------------------------------------------------
  // Runs one CTA; false (with `error` set) when the kernel broke a rule the emulator checks.
  bool run_cta(dim3 idx) {
    block_idx = idx;
    failed = false;
    error.clear();
    cta_start = ++clock;
    std::memset(smem, 0xff, smem_bytes);  // poison: a stray read sees NaN, not zeros
    if (shadow.size() < (smem_bytes + 3) / 4) shadow.resize((smem_bytes + 3) / 4);
    const int warps = (nthreads + kWarpSize - 1) / kWarpSize;
    warp_synced.assign(warps, cta_start);
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      f.tid = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y,
                   i / (block_dim.x * block_dim.y));
      f.state = State::kRunnable;
      f.io = LaneIO();
      f.copies.clear();
      f.committed = 0;
      f.cta_synced = cta_start;
      prepare(f);
    }
    reset_sm90();
    long pass_start = resumes - 1;
    for (;;) {
      for (int w = 0; w < warps; ++w) {
        const int lo = w * kWarpSize, hi = std::min(nthreads, lo + kWarpSize);
        // The warp's lanes hand over to each other (next_lane) until it is stuck.
        for (int i = lo; i < hi; ++i)
          if (fibers[i].state == State::kBlocked && ready(fibers[i]))
            fibers[i].state = State::kRunnable;
        for (int i = lo; i < hi; ++i)
          if (fibers[i].state == State::kRunnable) {
            ++resumes;
            resume(fibers[i]);
            break;
          }
        if (failed) return false;
        int at_op = -1, other = -1;  // a lane at a warp operation, and one that is not
        bool blocked = false;        // a lane that may still come (sm_90 waits)
        for (int i = lo; i < hi; ++i) {
          blocked |= fibers[i].state == State::kBlocked || fibers[i].state == State::kRunnable;
          if (fibers[i].state == State::kAtWarpOp)
            at_op = at_op < 0 ? i : at_op;
          else
            other = other < 0 ? i : other;
        }
        if (at_op >= 0 && !blocked) {  // it would have run had the whole warp been there
          std::ostringstream s;
          s << "warp " << w << ": " << who(at_op) << " waits at the full-warp "
            << op_name(fibers[at_op].io.op) << " while ";
          if (other < 0)
            s << "lanes " << hi - lo << "..31 do not exist (block size not a multiple of 32)";
          else
            s << who(other) << (fibers[other].state == State::kExited
                                    ? " has exited"
                                    : " waits at __syncthreads()");
          set_error(s.str());
          return false;
        }
      }
      // Every warp is at __syncthreads(), has exited, or waits for an sm_90 event.
      int live = 0, at_barrier = 0;
      for (int i = 0; i < nthreads; ++i) {
        live += fibers[i].state != State::kExited;
        at_barrier += fibers[i].state == State::kAtBarrier;
      }
      if (live == 0) return finish_cta();
      if (at_barrier != live) {
        if (resumes == pass_start) {  // nothing ran in a whole pass: nothing ever will
          set_error(deadlock_message());
          return false;
        }
        pass_start = resumes;
        continue;
      }
      pass_start = resumes;
      int joined[8] = {};  // __syncthreads: every thread learns what any thread knew
      for (int i = 0; i < nthreads; ++i)
        for (int w = 0; w < 8; ++w) joined[w] = std::max(joined[w], fibers[i].known[w]);
      for (int i = 0; i < nthreads; ++i) std::memcpy(fibers[i].known, joined, sizeof joined);
      ++clock;
      for (int w = 0; w < warps; ++w) warp_synced[w] = clock;
      for (int i = 0; i < nthreads; ++i)
        if (fibers[i].state == State::kAtBarrier) {
          fibers[i].state = State::kRunnable;
          fibers[i].cta_synced = clock;
        }
    }
  }
};

Runner& runner() {
  thread_local Runner r;
  return r;
}

[[noreturn]] void fiber_main() {
  Fiber& f = *self();
  Runner& r = *f.runner;
  (*r.body)();
  if (!f.copies.empty()) {
    std::ostringstream s;
    s << r.who(f.id) << " exits with " << f.copies.size() << " cp.async copies in flight";
    r.fail(s.str());
  }
  f.state = State::kExited;
  r.next_lane(f);
  std::abort();  // an exited fiber is never resumed
}

Fiber& lane_enter(Op op) {
  Fiber& f = *self();
  f.io.op = op;
  return f;
}

void lane_wait(Fiber& f) {
  f.state = State::kAtWarpOp;
  f.runner->next_lane(f);
}

// -- a pool of OS threads that run CTAs ---------------------------------------------------------
class Pool {
 public:
  // Runs job() on `extra` pool threads and on the caller; returns when all have returned.
  // While another OS thread's launch holds the pool, the caller runs job() alone.
  void run(int extra, const std::function<void()>& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return job();
    std::unique_lock<std::mutex> lock(mu_);
    while (int(threads_.size()) < extra) threads_.emplace_back([this] { loop(); });
    job_ = &job;
    wanted_ = extra;
    running_ = extra;
    ++generation_;
    cv_.notify_all();
    lock.unlock();
    job();
    lock.lock();
    done_cv_.wait(lock, [this] { return running_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    long seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
      seen = generation_;
      --wanted_;
      const std::function<void()>* job = job_;
      lock.unlock();
      (*job)();
      lock.lock();
      if (--running_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex busy_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;  // detached at exit (the pool is never destroyed)
  const std::function<void()>* job_ = nullptr;
  int wanted_ = 0, running_ = 0;
  long generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads wait forever
  return *p;
}

std::mutex g_attr_mu;
std::unordered_map<const void*, int>& max_smem_attr() {
  static std::unordered_map<const void*, int> m;
  return m;
}
std::set<const void*>& sm90_kernels() {
  static std::set<const void*> s;
  return s;
}
std::atomic<int> g_num_threads{1};
std::atomic<long> g_launches{0};
std::atomic<const void*> g_last_kernel{nullptr};
std::mutex g_recent_mu;
std::deque<const void*> g_recent;  // the last kRecentKernels grids' kernels, oldest first

}  // namespace

cudaError_t& last_launch_error() { return t_last_error; }
const std::string& last_error_message() { return t_last_message; }

const dim3& thread_idx() { return self()->tid; }
const dim3& block_idx() { return self()->runner->block_idx; }
const dim3& block_dim() { return self()->runner->block_dim; }
const dim3& grid_dim() { return self()->runner->grid_dim; }

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
  Fiber& f = lane_enter(Op::kMma);
  f.io.mma_type = type;
  f.io.trans = false;
  std::memcpy(f.io.a, a, sizeof f.io.a);
  std::memcpy(f.io.b, b, sizeof f.io.b);
  std::memcpy(f.io.c, c, sizeof f.io.c);
  lane_wait(f);
  std::memcpy(d, f.io.d, sizeof f.io.d);
}

void ldmatrix_x4(const void* smem_row, bool trans, uint32_t (&d)[4]) {
  Fiber& f = lane_enter(Op::kLdsm);
  f.io.trans = trans;
  f.io.mma_type = MmaType::kF16;
  f.io.addr = static_cast<const unsigned char*>(smem_row);
  lane_wait(f);
  std::memcpy(d, f.io.u, sizeof f.io.u);
}

uint32_t shfl_xor(unsigned member_mask, uint32_t value, int lane_mask, int width) {
  Fiber& f = lane_enter(Op::kShfl);
  f.io.trans = false;
  f.io.mma_type = MmaType::kF16;
  f.io.member_mask = member_mask;
  f.io.lane_mask = lane_mask;
  f.io.width = width;
  f.io.u[0] = value;
  lane_wait(f);
  return f.io.u[0];
}

void syncwarp(unsigned member_mask) {
  Fiber& f = lane_enter(Op::kSyncwarp);
  f.io.trans = false;
  f.io.mma_type = MmaType::kF16;
  f.io.member_mask = member_mask;
  lane_wait(f);
}

void syncthreads() {
  Fiber& f = *self();
  f.state = State::kAtBarrier;
  f.runner->next_lane(f);
}

void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 ||
      (pred && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)) {
    std::ostringstream s;
    s << r.who(f.id) << ": cp.async of 16 bytes needs 16-byte aligned addresses, got shared "
      << smem_dst << " and global " << gmem_src;
    r.fail(s.str());
  }
  const std::size_t off = r.offset_of(smem_dst, 16, "cp.async destination", f.id);
  r.shadow_write(f.id, off, 16, Kind::kCpAsync, /*pending=*/true);
  f.copies.push_back({static_cast<unsigned char*>(smem_dst),
                      static_cast<const unsigned char*>(gmem_src), pred, -1});
}

void cp_async_commit() {
  Fiber& f = *self();
  for (AsyncCopy& cp : f.copies)
    if (cp.group < 0) cp.group = f.committed;
  ++f.committed;
}

void cp_async_wait(int n) {
  Fiber& f = *self();
  f.runner->complete_copies(f, n);
}

void shared_read(const void* p, std::size_t bytes) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  const int q = f.id;
  r.shadow_read(q, r.offset_of(p, bytes, "ld.shared", q), bytes, Kind::kLdShared);
}

void shared_write(void* p, std::size_t bytes) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  const int q = f.id;
  r.shadow_write(q, r.offset_of(p, bytes, "st.shared", q), bytes, Kind::kStShared, false);
}

// -- sm_90a ------------------------------------------------------------------------------------
uint32_t smem_address(const void* p) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < r.smem || c > r.smem + kMaxSmemBytesSm90)
    r.fail(r.who(f.id) + ": __cvta_generic_to_shared of a pointer outside shared memory");
  return uint32_t(c - r.smem);
}

void wgmma(const WgmmaIssue& issue) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (issue.n < 8 || issue.n > 256 || issue.n % 8 != 0)
    r.fail(r.who(f.id) + ": wgmma with N = " + std::to_string(issue.n));
  Warpgroup& wg = r.wgs[f.id / 128];
  wg.issue[f.id % 128] = issue;
  // The operands are compared by exec_wgmma; the arrival key is the instruction itself.
  if (!r.wg_arrive(f, WgOp::kWgmma, issue.n)) return;
  r.exec_wgmma(wg, f.id / 128);
  r.wg_release(wg);
}

void wgmma_fence() {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (!r.wg_arrive(f, WgOp::kFence, 0)) return;
  Warpgroup& wg = r.wgs[f.id / 128];
  wg.order.fence();
  r.wg_release(wg);
}

void wgmma_commit() {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (!r.wg_arrive(f, WgOp::kCommit, 0)) return;
  Warpgroup& wg = r.wgs[f.id / 128];
  wg.order.commit();
  for (PendingMma& pm : wg.pending)
    if (pm.group < 0) pm.group = wg.order.groups();
  r.wg_release(wg);
}

void wgmma_wait(int n) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (!r.wg_arrive(f, WgOp::kWait, n)) return;
  Warpgroup& wg = r.wgs[f.id / 128];
  r.exec_wgmma_wait(wg, n);
  r.wg_release(wg);
}

void mbar_init(void* bar, int count) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  const uint32_t off = r.smem_off(bar, 8, "mbarrier.init", f.id);
  if (off % 8 != 0) r.fail(r.who(f.id) + ": mbarrier.init at an address not 8-byte aligned");
  sm90::MBarrier b;
  if (std::string e = b.init(count); !e.empty()) r.fail(r.who(f.id) + ": " + e);
  r.mbars[off] = b;
}

void mbar_arrive(void* bar, int expect_tx_bytes) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  sm90::MBarrier& b = r.mbar_at(bar, f.id, "mbarrier.arrive");
  BarKnowledge& k = r.bar_known[&b];
  for (int w = 0; w < 8; ++w) k.pending[w] = std::max(k.pending[w], f.known[w]);
  const int before = b.phase();
  if (std::string e = b.arrive(expect_tx_bytes); !e.empty()) r.fail(r.who(f.id) + ": " + e);
  r.phase_knowledge(b, before);
}

void mbar_wait(void* bar, int parity) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  sm90::MBarrier& b = r.mbar_at(bar, f.id, "mbarrier.try_wait");
  for (;;) {
    bool done = false;
    const int phase = b.seen(f.id);  // the phase this wait observes
    if (std::string e = b.try_wait(f.id, parity, &done); !e.empty()) r.fail(e);
    if (done) {
      const auto& kd = r.bar_known[&b].done;
      const auto it = kd.find(phase);
      if (it != kd.end())
        for (int w = 0; w < 8; ++w) f.known[w] = std::max(f.known[w], it->second[w]);
      return;
    }
    r.block(f, Wait::kMbar, &b, uint64_t(b.phase()));
  }
}

void tma_load(const TmaDesc* d, void* bar, void* smem_dst, const int32_t* crd) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  auto bad = [&](const std::string& what) { r.fail(r.who(f.id) + ": TMA load: " + what); };
  if (d == nullptr || d->rank < 1 || d->rank > 5 || d->base == nullptr) bad("invalid descriptor");
  const int eb = d->elem_bytes;
  uint64_t elems = 1;
  for (int i = 0; i < d->rank; ++i) {
    if (d->box[i] < 1 || d->box[i] > 256) bad("box dimension out of 1..256");
    elems *= d->box[i];
  }
  const uint32_t inner = d->box[0] * uint32_t(eb);
  if (inner % 16 != 0) bad("inner box extent not a multiple of 16 bytes");
  if (d->swizzle_bytes != 0 && inner > uint32_t(d->swizzle_bytes))
    bad("inner box extent wider than the swizzle span");
  const uint32_t bytes = uint32_t(elems) * uint32_t(eb);
  const uint32_t dst = r.smem_off(smem_dst, bytes, "TMA destination", f.id);
  const uint32_t align = d->swizzle_bytes == 128 ? 1024 : d->swizzle_bytes ? 8u * d->swizzle_bytes : 128;
  if (dst % align != 0) bad("shared destination not aligned to " + std::to_string(align) + " bytes");
  sm90::MBarrier& b = r.mbar_at(bar, f.id, "TMA complete_tx");
  sm90::AsyncSmem& as = r.async_smem();
  const int tid = f.id;
  if (std::string e = as.tma_write_from(
          dst, bytes, &b,
          [&](const sm90::WgmmaOrder* o, int g) { return r.knows_retired(tid, o, g); },
          [&](const sm90::WgmmaOrder* o, int g) { return r.all_know_retired(o, g); });
      !e.empty())
    bad(e);
  const sm90::Swizzle sw = d->swizzle_bytes == 128 ? sm90::Swizzle::B128
                           : d->swizzle_bytes == 64 ? sm90::Swizzle::B64
                           : d->swizzle_bytes == 32 ? sm90::Swizzle::B32
                                                    : sm90::Swizzle::None;
  uint32_t idx[5] = {0, 0, 0, 0, 0};
  for (uint64_t e = 0; e < elems; ++e) {
    uint64_t rest = e;
    bool in = true;
    const unsigned char* src = static_cast<const unsigned char*>(d->base);
    for (int i = 0; i < d->rank; ++i) {
      idx[i] = uint32_t(rest % d->box[i]);
      rest /= d->box[i];
      const int64_t g = int64_t(crd[i]) + idx[i];
      if (g < 0 || uint64_t(g) >= d->dims[i]) in = false;
      else src += uint64_t(g) * (i == 0 ? uint64_t(eb) : d->strides[i]);
    }
    const uint32_t to = sm90::swizzle_address(sw, dst + uint32_t(e) * uint32_t(eb));
    if (in) std::memcpy(r.smem + to, src, std::size_t(eb));
    else std::memset(r.smem + to, 0, std::size_t(eb));
  }
  const int before = b.phase();
  if (std::string e = b.complete_tx(int(bytes)); !e.empty()) bad(e);
  r.phase_knowledge(b, before);
}

// bar.sync / bar.arrive on named barrier ``id`` for ``threads`` threads: counts this thread's
// arrival; true when it completed the barrier's generation.
static bool named_barrier_count(Runner& r, Fiber& f, int id, int threads, const char* what) {
  if (id < 0 || id >= 16 || threads % 32 != 0 || threads < 32 || threads > r.nthreads)
    r.fail(r.who(f.id) + ": " + what + " " + std::to_string(id) + ", " + std::to_string(threads));
  NamedBar& b = r.named[id];
  if (b.arrived > 0 && b.threads != threads)
    r.fail(r.who(f.id) + ": named barrier " + std::to_string(id) + " used with " +
           std::to_string(threads) + " and " + std::to_string(b.threads) + " threads");
  b.threads = threads;
  if (++b.arrived < threads) return false;
  b.arrived = 0;
  ++b.gen;
  return true;
}

void named_barrier_sync(int id, int threads) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (!named_barrier_count(r, f, id, threads, "bar.sync")) {
    NamedBar& b = r.named[id];
    r.block(f, Wait::kNamed, &b, b.gen);
  }
}

void named_barrier_arrive(int id, int threads) {
  Fiber& f = *self();
  named_barrier_count(*f.runner, f, id, threads, "bar.arrive");
}

void setmaxnreg(int regs, bool increase) {
  Fiber& f = *self();
  Runner& r = *f.runner;
  if (!r.wg_arrive(f, WgOp::kRegs, long(regs) * 2 + (increase ? 1 : 0))) return;
  const int w = f.id / 128, groups = r.nthreads / 128;
  Warpgroup& wg = r.wgs[w];
  if (regs < 24 || regs > 256 || regs % 8 != 0)
    r.fail("warpgroup " + std::to_string(w) + ": setmaxnreg " + std::to_string(regs) +
           " (must be a multiple of 8 in 24..256)");
  if (increase ? regs < wg.regs : regs > wg.regs)
    r.fail("warpgroup " + std::to_string(w) + ": setmaxnreg." + (increase ? "inc " : "dec ") +
           std::to_string(regs) + " from " + std::to_string(wg.regs));
  for (;;) {
    long total = 0;
    for (int g = 0; g < groups; ++g) total += long(g == w ? regs : r.wgs[g].regs) * 128;
    if (total <= 65536 || !increase) break;  // a decrease never grows the total
    // Wait for another warpgroup to release registers (the hardware blocks the same way);
    // every setmaxnreg bumps regs_changed.gen.
    r.block(f, Wait::kRegs, &r.regs_changed, r.regs_changed.gen);
  }
  wg.regs = regs;
  ++r.regs_changed.gen;
  r.wg_release(wg);
}

void report_misuse(const std::string& what) {
  Fiber& f = *self();
  f.runner->fail(f.runner->who(f.id) + ": " + what);
}

void fence_proxy_async() {
  Fiber& f = *self();
  f.runner->async_smem().fence_proxy_async(f.id);
}

void allow_sm90_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  sm90_kernels().insert(kernel);
}

int set_max_dynamic_smem(const void* kernel, int bytes) {
  bool sm90 = false;
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    sm90 = sm90_kernels().count(kernel) > 0;
  }
  if (bytes < 0 || bytes > (sm90 ? kMaxSmemBytesSm90 : kMaxSmemBytes)) {
    std::ostringstream s;
    s << "distattn emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " << bytes
      << ") for " << kernel_name(kernel) << " exceeds the " << kMaxSmemBytes
      << " bytes of sm_80";
    t_last_message = s.str();
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mu);
  max_smem_attr()[kernel] = bytes;
  return cudaSuccess;
}

void set_num_threads(int n) { g_num_threads = n < 1 ? 1 : n; }
long launch_count() { return g_launches; }
std::string last_kernel() {
  const void* k = g_last_kernel;
  return k ? kernel_name(k) : std::string();
}
std::vector<std::string> recent_kernels() {
  std::vector<const void*> ks;
  {
    std::lock_guard<std::mutex> lock(g_recent_mu);
    ks.assign(g_recent.begin(), g_recent.end());
  }
  std::vector<std::string> names;
  for (const void* k : ks) names.push_back(kernel_name(k));
  return names;
}
int num_threads() { return g_num_threads; }

int run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem_bytes,
             const std::function<void()>& body) {
  auto config_error = [&](cudaError_t code, const std::string& what) {
    t_last_message = "distattn emulator: launch of " + kernel_name(kernel) + ": " + what;
    return int(code);
  };
  const long threads = long(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads || block.z > 64)
    return config_error(cudaErrorInvalidConfiguration,
                        "block of " + std::to_string(threads) + " threads (1..1024 allowed)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    return config_error(cudaErrorInvalidConfiguration, "grid dimensions out of range");
  int allowed = kDefaultSmemBytes;
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = max_smem_attr().find(kernel);
    if (it != max_smem_attr().end()) allowed = it->second;
  }
  if (smem_bytes > std::size_t(allowed))
    return config_error(cudaErrorInvalidValue,
                        std::to_string(smem_bytes) + " bytes of dynamic shared memory, more "
                        "than the " + std::to_string(allowed) + " its MaxDynamicSharedMemorySize "
                        "attribute allows");

  ++g_launches;
  g_last_kernel = kernel;
  {
    std::lock_guard<std::mutex> lock(g_recent_mu);
    g_recent.push_back(kernel);
    if (int(g_recent.size()) > kRecentKernels) g_recent.pop_front();
  }
  const long total = long(grid.x) * grid.y * grid.z;
  std::atomic<long> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::string first_error;
  const std::function<void()> work = [&] {
    Runner& r = runner();
    r.kernel = kernel;
    r.body = &body;
    r.grid_dim = grid;
    r.block_dim = block;
    r.nthreads = int(threads);
    r.smem_bytes = smem_bytes;
    r.smem = kern::smem_raw;
    for (long i = next++; i < total && !failed; i = next++) {
      const dim3 idx(unsigned(i % grid.x), unsigned((i / grid.x) % grid.y),
                     unsigned(i / (long(grid.x) * grid.y)));
      if (!r.run_cta(idx)) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (!failed.exchange(true)) first_error = r.error;
      }
    }
  };
  const int extra = int(std::min<long>(num_threads(), total)) - 1;
  if (extra > 0)
    pool().run(extra, work);
  else
    work();
  if (failed) {
    t_last_message = first_error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace emu
}  // namespace distattn
