// The CTA emulator (csrc/emulate) on small kernels written here, against the PTX ISA's
// definitions: the instruction models deliver what the ISA says to every lane, and the
// checks fire where they must (shared-memory races, uninitialised reads, cp.async data read in
// flight, divergent warp collectives, shared memory out of bounds, launch limits) and stay
// quiet where the kernel is correct. Also the 16-bit float conversions, exhaustively for half.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emulate/device.h"
#include "harness.h"
#include "kernels/mma.cuh"
#include "launch_result.h"  // ld_shared / st_shared, DISTATTN_LAUNCH

// The kernels live in distattn::kern, like the project's: the emulator defines the dynamic
// shared memory they declare (`extern __shared__ ... smem_raw[]`) in that namespace.
namespace distattn {
namespace kern {


// ---- instruction models -----------------------------------------------------------------------
struct MmaArgs {
  const uint16_t* a;  // [16][16] half bits, row-major
  const uint16_t* b;  // [16][8] half bits (k x n)
  const float* c;     // [16][8]
  float* d;           // [16][8]
};

// Each lane builds its fragments from the PTX ISA's layout (lane = 4g + t) and writes back
// its D elements.
__global__ void mma_kernel(const MmaArgs p) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pack = [](uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; };
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int q = 0; q < 4; ++q) {
    const int row = g + 8 * (q % 2), col = 2 * t + 8 * (q / 2);
    a[q] = pack(p.a[row * 16 + col], p.a[row * 16 + col + 1]);
  }
  for (int q = 0; q < 2; ++q) {
    const int k = 2 * t + 8 * q;
    b[q] = pack(p.b[k * 8 + g], p.b[(k + 1) * 8 + g]);
  }
  for (int e = 0; e < 4; ++e) c[e] = p.c[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2];
  cute::SM80_16x8x16_F32F16F16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0],
                                          b[1], c[0], c[1], c[2], c[3]);
  for (int e = 0; e < 4; ++e) p.d[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2] = d[e];
}

void test_mma() {
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  std::vector<uint16_t> a(256), b(128);
  std::vector<float> c(128), d(128, NAN);
  for (auto& x : a) x = emu::float_to_half(n(rng));
  for (auto& x : b) x = emu::float_to_half(n(rng));
  for (auto& x : c) x = n(rng);
  DISTATTN_LAUNCH(mma_kernel, 1, 32, 0, nullptr, MmaArgs{a.data(), b.data(), c.data(), d.data()});
  CHECK(launch_result().empty());
  for (int m = 0; m < 16; ++m)
    for (int j = 0; j < 8; ++j) {
      double want = c[m * 8 + j];
      for (int k = 0; k < 16; ++k)
        want += double(emu::half_to_float(a[m * 16 + k])) * emu::half_to_float(b[k * 8 + j]);
      CHECK(std::fabs(d[m * 8 + j] - want) < 1e-4) << "D[" << m << "][" << j << "]";
    }
}

struct LdsmArgs {
  bool trans;
  uint32_t* out;  // [32 lanes][4 registers]
};

// A 32x8 tile of b16 values v(r, c) = 256 * r + c in shared memory; lane L addresses row L
// (row L % 8 of matrix L / 8).
__global__ void ldsm_kernel(const LdsmArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem_raw);
  const int lane = threadIdx.x;
  for (int c = 0; c < 8; ++c) st_shared(tile + lane * 8 + c, uint16_t(256 * lane + c));
  __syncthreads();
  uint32_t r[4];
  const auto& src = *reinterpret_cast<const cute::uint128_t*>(tile + lane * 8);
  if (p.trans)
    cute::SM75_U16x8_LDSM_T::copy(src, r[0], r[1], r[2], r[3]);
  else
    cute::SM75_U32x4_LDSM_N::copy(src, r[0], r[1], r[2], r[3]);
  for (int i = 0; i < 4; ++i) p.out[lane * 4 + i] = r[i];
}

void test_ldmatrix() {
  for (bool trans : {false, true}) {
    std::vector<uint32_t> out(128);
    DISTATTN_LAUNCH(ldsm_kernel, 1, 32, 32 * 16, nullptr, LdsmArgs{trans, out.data()});
    CHECK(launch_result().empty());
    // PTX: lane l, register i, half j holds element (l/4, 2(l%4)+j) of matrix i; with .trans
    // element (2(l%4)+j, l/4). Matrix i's row r is tile row 8i + r.
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 2; ++j) {
          const int r = trans ? 2 * (l % 4) + j : l / 4, c = trans ? l / 4 : 2 * (l % 4) + j;
          const uint32_t got = (out[l * 4 + i] >> (16 * j)) & 0xffffu;
          CHECK(got == uint32_t(256 * (8 * i + r) + c))
              << (trans ? ".trans" : "") << " lane " << l << " reg " << i << " half " << j;
        }
  }
}

__global__ void shfl_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int x = 100 * int(threadIdx.x);
  x = __shfl_xor_sync(0xffffffffu, x, 5);
  out[threadIdx.x] = x + lane;
}

void test_shfl() {
  std::vector<int> out(64);
  DISTATTN_LAUNCH(shfl_kernel, 1, 64, 0, nullptr, out.data());
  CHECK(launch_result().empty());
  for (int i = 0; i < 64; ++i) CHECK(out[i] == 100 * ((i & ~31) | ((i % 32) ^ 5)) + i % 32) << i;
}

// ---- cp.async, barriers and the race check -------------------------------------------------
struct CopyArgs {
  const float* src;  // 256 floats
  float* dst;        // 256 floats
  int mode;          // 0: correct; 1: no barrier; 2: no wait; 3: reads an unwritten row
  int n_valid;       // rows (4 floats each) at or beyond this are zero-filled
};

// 64 threads copy 64 16-byte rows into shared memory with cp.async, then each thread reads the
// row of the thread before it (thread 0 its own): a cross-thread exchange through shared
// memory. (The emulator runs threads in order, so the writer has run before the reader.)
__global__ void copy_kernel(const CopyArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int tid = threadIdx.x;
  if (!(p.mode == 3 && tid == 5)) {
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(p.src + 4 * tid),
        *reinterpret_cast<cute::uint128_t*>(s + 4 * tid), tid < p.n_valid);
    cute::cp_async_fence();
  }
  if (p.mode != 2) cute::cp_async_wait<0>();
  if (p.mode != 1) __syncthreads();
  const int from = tid == 0 ? 0 : (p.mode == 3 ? 5 : tid - 1);
  for (int i = 0; i < 4; ++i) p.dst[4 * tid + i] = ld_shared(s + 4 * from + i);
}

void test_copies_and_races() {
  std::vector<float> src(256), dst(256);
  for (int i = 0; i < 256; ++i) src[i] = float(i) + 0.5f;
  DISTATTN_LAUNCH(copy_kernel, 1, 64, 1024, nullptr, CopyArgs{src.data(), dst.data(), 0, 40});
  CHECK(launch_result().empty());
  for (int t = 0; t < 64; ++t)
    for (int i = 0; i < 4; ++i) {
      const int from = t == 0 ? 0 : t - 1;
      CHECK(dst[4 * t + i] == (from < 40 ? src[4 * from + i] : 0.f)) << t << " " << i;
    }
  std::string m;
  DISTATTN_LAUNCH(copy_kernel, 1, 64, 1024, nullptr, CopyArgs{src.data(), dst.data(), 1, 64});
  m = launch_result();
  CHECK(contains(m, "shared-memory race") && contains(m, "copy_kernel") &&
        contains(m, "no barrier between the write and the read"))
      << m;
  DISTATTN_LAUNCH(copy_kernel, 1, 64, 1024, nullptr, CopyArgs{src.data(), dst.data(), 2, 64});
  m = launch_result();
  CHECK(contains(m, "still in flight")) << m;
  DISTATTN_LAUNCH(copy_kernel, 1, 64, 1024, nullptr, CopyArgs{src.data(), dst.data(), 3, 64});
  m = launch_result();
  CHECK(contains(m, "uninitialised shared memory") && contains(m, "thread 1 ")) << m;
}

// Warp 0 reads what warp 1 wrote, then warp 1 overwrites it: a write-after-read hazard
// unless a barrier separates the read from the overwrite.
__global__ void war_kernel(int* out, bool second_barrier) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s = reinterpret_cast<int*>(smem_raw);
  const int tid = threadIdx.x;
  st_shared(s + tid, tid);
  __syncthreads();
  const int x = tid < 32 ? ld_shared(s + tid + 32) : 0;
  if (second_barrier) __syncthreads();
  if (tid >= 32) st_shared(s + tid, -tid);
  out[tid] = x;
}

// Lanes of one warp exchange through shared memory (lane i reads lane i - 1's value);
// __syncwarp orders them.
__global__ void warp_exchange_kernel(int* out, bool sync) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s = reinterpret_cast<int*>(smem_raw);
  const int tid = threadIdx.x;
  st_shared(s + tid, tid);
  if (sync) __syncwarp();
  out[tid] = ld_shared(s + (tid == 0 ? 0 : tid - 1));
}

void test_barrier_orders() {
  std::vector<int> out(64);
  DISTATTN_LAUNCH(war_kernel, 1, 64, 256, nullptr, out.data(), true);
  CHECK(launch_result().empty());
  for (int i = 0; i < 64; ++i) CHECK(out[i] == (i < 32 ? i + 32 : 0)) << i;
  DISTATTN_LAUNCH(war_kernel, 1, 64, 256, nullptr, out.data(), false);
  const std::string m = launch_result();
  CHECK(contains(m, "no barrier between the read and the write")) << m;

  DISTATTN_LAUNCH(warp_exchange_kernel, 1, 32, 128, nullptr, out.data(), true);
  CHECK(launch_result().empty());
  for (int i = 0; i < 32; ++i) CHECK(out[i] == (i == 0 ? 0 : i - 1)) << i;
  DISTATTN_LAUNCH(warp_exchange_kernel, 1, 32, 128, nullptr, out.data(), false);
  CHECK(contains(launch_result(), "shared-memory race"));
}

// ---- divergence, bounds, launch limits, many CTAs ---------------------------------------------
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void out_of_bounds_kernel(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s = reinterpret_cast<int*>(smem_raw);
  st_shared(s + 64 + threadIdx.x, 1);  // one past the 256 bytes the launch has
  out[0] = 0;
}

__global__ void grid_kernel(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s = reinterpret_cast<int*>(smem_raw);
  const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  st_shared(s + threadIdx.x, cta * 1000 + int(threadIdx.x));
  __syncthreads();
  // Reverse within the CTA: every thread reads another warp's value.
  out[cta * blockDim.x + threadIdx.x] = ld_shared(s + (blockDim.x - 1 - threadIdx.x));
}

void test_launch_rules() {
  std::vector<int> out(1024 * 8, -1);
  DISTATTN_LAUNCH(divergent_kernel, 1, 32, 0, nullptr, out.data());
  std::string m = launch_result();
  CHECK(contains(m, "waits at the full-warp shfl.sync") && contains(m, "has exited")) << m;

  DISTATTN_LAUNCH(out_of_bounds_kernel, 1, 32, 256, nullptr, out.data());
  m = launch_result();
  CHECK(contains(m, "outside the block's 256 bytes")) << m;

  // More than 48 KiB of dynamic shared memory needs the attribute, as on a GPU.
  DISTATTN_LAUNCH(grid_kernel, 1, 32, 64 * 1024, nullptr, out.data());
  CHECK(contains(launch_result(), "MaxDynamicSharedMemorySize"));
  CHECK(cudaFuncSetAttribute(grid_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             200 * 1024) == cudaErrorInvalidValue);  // above sm_80's limit
  cudaGetLastError();
  CHECK(cudaFuncSetAttribute(grid_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             64 * 1024) == cudaSuccess);

  // 1024 threads per CTA, 8 CTAs over a 2x2x2 grid, run by two OS threads.
  emu::set_num_threads(2);
  DISTATTN_LAUNCH(grid_kernel, dim3(2, 2, 2), 1024, 64 * 1024, nullptr, out.data());
  CHECK(launch_result().empty());
  for (int cta = 0; cta < 8; ++cta)
    for (int t = 0; t < 1024; ++t)
      CHECK(out[cta * 1024 + t] == cta * 1000 + 1023 - t) << cta << " " << t;
  // Two OS threads launching at once (the pool serves one launch; the other runs alone).
  std::vector<int> out2(1024 * 8, -1);
  std::string err1, err2;
  std::thread other([&] {
    for (int i = 0; i < 3; ++i) {
      DISTATTN_LAUNCH(grid_kernel, dim3(2, 2, 2), 1024, 64 * 1024, nullptr, out2.data());
      err2 += launch_result();
    }
  });
  for (int i = 0; i < 3; ++i) {
    DISTATTN_LAUNCH(grid_kernel, dim3(2, 2, 2), 1024, 64 * 1024, nullptr, out.data());
    err1 += launch_result();
  }
  other.join();
  CHECK(err1.empty() && err2.empty()) << err1 << err2;
  CHECK(out == out2);
  emu::set_num_threads(1);
  DISTATTN_LAUNCH(grid_kernel, 1, 2048, 0, nullptr, out.data());
  CHECK(contains(launch_result(), "1..1024 allowed"));
}

// ---- 16-bit conversions ---------------------------------------------------------------------
void test_conversions() {
  // Every half round-trips through float (NaNs stay NaN), and matches the compiler's _Float16.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = emu::half_to_float(uint16_t(h));
    _Float16 ref;
    std::memcpy(&ref, &h, 2);
    if (std::isnan(f)) {
      CHECK(std::isnan(float(ref)));
      CHECK(std::isnan(emu::half_to_float(emu::float_to_half(f))));
      continue;
    }
    CHECK(f == float(ref)) << "half " << h;
    CHECK(emu::float_to_half(f) == h) << "half " << h;
  }
  // float -> half and float -> bfloat16 round to nearest even, including the halfway points
  // and the subnormal/overflow edges; compared with _Float16 and with an integer model.
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> xs = {65504.f, 65519.99f, 65520.f, 1e-8f, 2.9802322e-8f, 5.9604645e-8f,
                           6.1035156e-5f, 6.0975552e-5f, -0.f, INFINITY, -INFINITY};
  for (int i = 0; i < 200000; ++i) {
    float f;
    uint32_t u = bits(rng);
    if (i % 2) u = (u & 0x807fffffu) | ((100u + u % 60u) << 23);  // exponents near half's range
    std::memcpy(&f, &u, 4);
    xs.push_back(f);
  }
  for (float f : xs) {
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    CHECK(emu::float_to_half(f) == ref_bits) << "float " << f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t lower = u & 0xffffu, upper = u >> 16;
    const uint32_t want = lower > 0x8000u || (lower == 0x8000u && (upper & 1u)) ? upper + 1 : upper;
    CHECK(emu::float_to_bf16(f) == uint16_t(want)) << "float " << f;
  }
  CHECK(std::isnan(emu::bf16_to_float(emu::float_to_bf16(NAN))));
}

}  // namespace kern
}  // namespace distattn

int main() {
  using namespace distattn::kern;
  test_mma();
  test_ldmatrix();
  test_shfl();
  test_copies_and_races();
  test_barrier_orders();
  test_launch_rules();
  test_conversions();
  return harness::finish("test_emulator");
}
