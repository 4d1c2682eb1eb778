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
// OS threads that run CTAs in parallel (>= 1; the calling thread is one of them).
void set_num_threads(int n);
int num_threads();

}  // namespace emu

namespace kern {
// The dynamic shared memory of the CTA this OS thread runs (defined in runtime.cpp): what the
// kernels' `extern __shared__ __align__(16) unsigned char smem_raw[]` names, as emulate/device.h
// maps __shared__ to __thread (GNU thread-local storage, never dynamically initialised).
extern __thread __attribute__((aligned(16))) unsigned char smem_raw[emu::kMaxSmemBytes];
}  // namespace kern
}  // namespace distattn
