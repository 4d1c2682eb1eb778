// The CTA emulator behind DISTATTN_EMULATE: runs a CUDA grid on the host CPU.
//
// Every CUDA thread of a CTA is a fiber (its own stack, switched cooperatively) on one OS
// thread, so `__syncthreads`, warp-collective instructions and shared memory behave as on a
// GPU: a fiber runs until it reaches a barrier or a warp collective, and the scheduler
// (runtime.cpp) resumes the others until the whole warp / CTA has arrived. CTAs of a grid
// run in parallel on a small pool of OS threads (set_num_threads).
//
// The instruction models (called from emulate/device.h, which stands in for the CUDA and CuTe
// headers) are written from the PTX ISA:
//   mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate), ldmatrix.x4 (plain and .trans),
//   cp.async 16 B with zero-fill plus commit/wait groups, shfl.sync.bfly, bar.sync, bar.warp.
// Shared memory is checked against a shadow copy: an access that races with an access of
// another thread (no barrier between a write and a read, or two writes), a read of shared
// memory that no thread wrote, a read of a cp.async destination still in flight, and an
// access outside the launch's dynamic shared memory each fail the launch with a message that
// names the kernel, the block, both threads and the byte range.
//
// Plain C++ (no torch, no CUDA): tests/cpp can use it as well as the torch binding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

// CUDA's dim3 (global namespace, like CUDA's own).
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

namespace distattn {
namespace emu {

// Largest dynamic shared memory of a CTA: sm_80's opt-in limit (the kernels must fit there).
constexpr int kMaxSmemBytes = 163 * 1024;
// Without cudaFuncSetAttribute(MaxDynamicSharedMemorySize), a launch may use 48 KiB.
constexpr int kDefaultSmemBytes = 48 * 1024;

// -- what a fiber (CUDA thread) sees ----------------------------------------------------------
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// -- instruction models (called from a fiber) ------------------------------------------------
enum class MmaType : int { kF16 = 0, kBF16 = 1 };
// d = A * B + c for one m16n8k16 tile; this lane's fragments (PTX layouts, see runtime.cpp).
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 from this lane's row address.
void ldmatrix_x4(const void* smem_row, bool trans, uint32_t (&d)[4]);
// shfl.sync.bfly.b32: the value of lane (lane ^ lane_mask).
uint32_t shfl_xor(unsigned member_mask, uint32_t value, int lane_mask, int width);
void syncwarp(unsigned member_mask);
void syncthreads();
// cp.async.cg.shared.global 16 bytes; pred == false writes 16 zero bytes (src-size 0).
void cp_async_16(void* smem_dst, const void* gmem_src, bool pred);
void cp_async_commit();
// cp.async.wait_group n (n > 0) or cp.async.wait_all (n == 0).
void cp_async_wait(int n);
// Scalar shared-memory accesses (ld.shared / st.shared) that the race check must see.
void shared_read(const void* p, std::size_t bytes);
void shared_write(void* p, std::size_t bytes);

// -- sm_90a (Hopper) instruction models (csrc/emulate/sm90_device.h calls these) ------------
// The shared-window address of a shared-memory pointer (__cvta_generic_to_shared): its offset
// in the CTA's dynamic shared memory.
uint32_t smem_address(const void* p);
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: one thread's part of a warpgroup-wide
// instruction. All 128 threads of the warpgroup must issue the same (type, n, majors, scale_d,
// descriptors); the last to arrive reads A (shared memory through `desc_a`, or the threads'
// `a_regs`) and B (`desc_b`) through the descriptor model of sm90_gmma.h, checks the reads
// against the TMA writes each thread has waited for (sm90_async.h AsyncSmem), and computes
// D = A B (+ C if scale_d). D lands in the threads' registers `d` when the group retires
// (wgmma.wait_group), not before: a thread that reads them earlier sees the old values.
struct WgmmaIssue {
  MmaType type = MmaType::kF16;
  int n = 0;              // N of m64nNk16
  bool a_mn_major = false, b_mn_major = false;
  bool scale_d = true;    // false: D = A B (C ignored)
  bool a_from_regs = false;
  uint64_t desc_a = 0, desc_b = 0;
  uint32_t a_regs[4] = {};
  float* const* d = nullptr;  // n / 2 pointers to this thread's accumulator registers
};
void wgmma(const WgmmaIssue& issue);
void wgmma_fence();         // wgmma.fence.sync.aligned
void wgmma_commit();        // wgmma.commit_group.sync.aligned
void wgmma_wait(int n);     // wgmma.wait_group.sync.aligned n
// mbarrier.* on the 8-byte barrier at `bar` (shared memory), driving sm90_async.h MBarrier.
void mbar_init(void* bar, int count);
void mbar_arrive(void* bar, int expect_tx_bytes);  // arrive, or arrive.expect_tx when > 0
// try_wait.parity in a loop: the fiber blocks (others run) until the phase completes.
void mbar_wait(void* bar, int parity);
// A TMA tiled load (cp.async.bulk.tensor.Nd.shared.global.mbarrier::complete_tx::bytes).
struct TmaDesc {
  const void* base = nullptr;
  int rank = 0;            // 1..5
  int elem_bytes = 2;
  uint64_t dims[5] = {};   // elements, innermost first
  uint64_t strides[5] = {};  // bytes; strides[0] is elem_bytes (dimension 0 is contiguous)
  uint32_t box[5] = {};    // elements
  int swizzle_bytes = 0;   // 0 (none), 32, 64 or 128
};
// Copies the box at element coordinates `crd` (rank of them; out-of-bounds elements are
// zero-filled) to `smem` (swizzled by its absolute shared address), records the write as
// landing in the current phase of `bar`, and completes that many transaction bytes there.
void tma_load(const TmaDesc* desc, void* bar, void* smem, const int32_t* crd);
// bar.sync / bar.arrive on named barrier `id` (0..15) for `threads` threads.
void named_barrier_sync(int id, int threads);
void named_barrier_arrive(int id, int threads);
// setmaxnreg.{inc,dec}.sync.aligned.u32 `regs` for this thread's warpgroup: all 128 threads
// must ask for the same count; an increase waits until the CTA's registers allow it (65536
// per CTA, starting from 65536 / threads rounded down to 8); the CTA's total never exceeds it.
void setmaxnreg(int regs, bool increase);
// Fails the launch from the calling thread with `what` (a misuse a stand-in found).
[[noreturn]] void report_misuse(const std::string& what);
// fence.proxy.async.shared::cta by this thread.
void fence_proxy_async();
// Kernels allowed sm_90's 227 KiB of dynamic shared memory instead of sm_80's 163 KiB.
void allow_sm90_smem(const void* kernel);
constexpr int kMaxSmemBytesSm90 = 227 * 1024;

// -- the runtime API part --------------------------------------------------------------------
// Maximum dynamic shared memory a kernel may be launched with (cudaFuncSetAttribute).
int set_max_dynamic_smem(const void* kernel, int bytes);
// Runs `body` (the kernel called with its arguments) for every CTA of the grid; returns
// 0 on success, else an error code (cudaError_t) with its message in last_error_message().
int run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem_bytes,
             const std::function<void()>& body);
// The detailed message of the most recent failed launch on this OS thread.
const std::string& last_error_message();
// Grids run so far in this process (tests count launches: "one varlen launch").
long launch_count();
// The (demangled) name of the kernel of the most recent grid in this process ("" before any).
std::string last_kernel();
// The names of the kernels of the last (at most kRecentKernels) grids, oldest first: what a
// multi-kernel call (the backward: delta, dQ, dK/dV) ran, in order.
constexpr int kRecentKernels = 8;
std::vector<std::string> recent_kernels();
// OS threads that run CTAs in parallel (>= 1; the calling thread is one of them).
void set_num_threads(int n);
int num_threads();

}  // namespace emu

namespace kern {
// The dynamic shared memory of the CTA this OS thread runs (defined in runtime.cpp): what the
// kernels' `extern __shared__ __align__(16) unsigned char smem_raw[]` names, as emulate/device.h
// maps __shared__ to __thread (GNU thread-local storage, never dynamically initialised).
extern __thread __attribute__((aligned(1024))) unsigned char smem_raw[emu::kMaxSmemBytesSm90];
}  // namespace kern
}  // namespace distattn
