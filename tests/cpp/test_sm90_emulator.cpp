// The sm_90a stand-ins (csrc/emulate/sm90_device.h) wired into the CTA emulator, on small
// kernels written here: wgmma SS and RS (and SS m64n32k16) against a plain matmul (operands placed by TMA with the
// 128-byte swizzle, as the Hopper forward kernel does), a TMA box with out-of-bounds zero
// fill, and the checks that must fire: a wgmma reading TMA data whose mbarrier phase the thread
// did not wait on, a TMA refilling bytes an in-flight wgmma reads, an mbarrier wait that never
// completes (deadlock), a setmaxnreg budget that cannot be met, results read before
// wgmma.wait_group (they are not there yet), a wgmma without wgmma.fence.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "emulate/device.h"
#include "emulate/sm90_device.h"
#include "emulate/sm90_gmma.h"
#include "harness.h"
#include "kernels/mma.cuh"
#include "launch_result.h"

namespace distattn {
namespace kern {


uint16_t bf(float x) { return emu::float_to_bf16(x); }
constexpr uint64_t kEvictNormal = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);

// A [rows][cols] bf16 row-major global matrix as a 2D TMA tensor (cols contiguous), box
// (64, rows_box), 128-byte swizzle.
emu::TmaDesc desc2d(const uint16_t* base, int rows, int cols, int box_rows) {
  emu::TmaDesc d;
  d.base = base;
  d.rank = 2;
  d.elem_bytes = 2;
  d.dims[0] = uint64_t(cols);
  d.dims[1] = uint64_t(rows);
  d.strides[0] = 2;
  d.strides[1] = uint64_t(cols) * 2;
  d.box[0] = 64;
  d.box[1] = uint32_t(box_rows);
  d.swizzle_bytes = 128;
  return d;
}

uint64_t desc_sw128(uint32_t start, uint32_t lbo, uint32_t sbo) {
  return uint64_t((start >> 4) & 0x3fff) | uint64_t((lbo >> 4) & 0x3fff) << 16 |
         uint64_t((sbo >> 4) & 0x3fff) << 32 | uint64_t(1) << 62;
}

enum class Bug { kNone, kNoWait, kRefillInFlight, kReadBeforeWait, kNoFence };

struct GemmArgs {
  emu::TmaDesc ta, tb;
  const uint16_t* a_glob;  // RS: A values read by each thread into registers
  float* d;                // [64][64]
  bool rs;
  Bug bug;
};

// D[64][64] = A[64][64] B where B is given as B^T [n][k] (K-major, SS) or B [k][n] (MN-major,
// RS). One warpgroup; thread 0 loads the operands by TMA on one mbarrier.
__global__ void gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);  // 8 KiB at 0 (1024-aligned)
  uint16_t* sB = sA + 64 * 64;                           // 8 KiB at 8192
  uint64_t* bar = reinterpret_cast<uint64_t*>(sB + 64 * 64);
  const int tid = threadIdx.x;
  if (tid == 0) cute::initialize_barrier(*bar, 1);
  __syncthreads();
  if (tid == 0) {
    cute::set_barrier_transaction_bytes(*bar, p.rs ? 8192 : 16384);
    if (!p.rs) cute::SM90_TMA_LOAD_2D::copy(&p.ta, bar, kEvictNormal, sA, 0, 0);
    cute::SM90_TMA_LOAD_2D::copy(&p.tb, bar, kEvictNormal, sB, 0, 0);
  }
  if (p.bug != Bug::kNoWait) cute::wait_barrier(*bar, 0);
  float d[32];
  for (float& x : d) x = 0.f;
  const uint32_t a0 = uint32_t(__cvta_generic_to_shared(sA));
  const uint32_t b0 = uint32_t(__cvta_generic_to_shared(sB));
  if (p.bug != Bug::kNoFence) cute::warpgroup_arrive();
  using Major = cute::SM90::GMMA::Major;
  for (int kk = 0; kk < 4; ++kk) {
    if (!p.rs) {
      cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>::fma(
          desc_sw128(a0 + 32 * kk, 16, 1024), desc_sw128(b0 + 32 * kk, 16, 1024), d[0], d[1],
          d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15],
          d[16], d[17], d[18], d[19], d[20], d[21], d[22], d[23], d[24], d[25], d[26], d[27],
          d[28], d[29], d[30], d[31],
          kk ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
    } else {
      uint32_t a[4];
      for (int r = 0; r < 4; ++r) {
        uint16_t h2[2];
        for (int j = 0; j < 2; ++j) {
          const ::emu::sm90::Coord c = ::emu::sm90::a_coord(tid, 2 * r + j);
          h2[j] = p.a_glob[c.row * 64 + 16 * kk + c.col];
        }
        a[r] = uint32_t(h2[0]) | uint32_t(h2[1]) << 16;
      }
      // B [k][n], n contiguous: MN-major, 8-k groups at 1024 B (SBO); one 64-wide n atom.
      cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::MN>::fma(
          a[0], a[1], a[2], a[3], desc_sw128(b0 + 2048 * kk, 8192, 1024), d[0], d[1], d[2], d[3],
          d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15], d[16],
          d[17], d[18], d[19], d[20], d[21], d[22], d[23], d[24], d[25], d[26], d[27], d[28],
          d[29], d[30], d[31]);
    }
  }
  cute::warpgroup_commit_batch();
  if (p.bug == Bug::kRefillInFlight && tid == 0) {
    cute::set_barrier_transaction_bytes(*bar, 8192);
    cute::SM90_TMA_LOAD_2D::copy(&p.tb, bar, kEvictNormal, sB, 0, 0);
  }
  if (p.bug == Bug::kReadBeforeWait) {
    for (int v = 0; v < 32; ++v) {
      const ::emu::sm90::Coord c = ::emu::sm90::acc_coord(tid, v);
      p.d[c.row * 64 + c.col] = d[v];
    }
  }
  cute::warpgroup_wait<0>();
  if (p.bug != Bug::kReadBeforeWait)
    for (int v = 0; v < 32; ++v) {
      const ::emu::sm90::Coord c = ::emu::sm90::acc_coord(tid, v);
      p.d[c.row * 64 + c.col] = d[v];
    }
}

std::string run_gemm(bool rs, Bug bug, std::vector<float>* out, double* max_err) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<uint16_t> A(64 * 64), B(64 * 64);  // small integers: every sum is exact in float
  std::vector<float> Af(64 * 64), Bf(64 * 64);
  for (int i = 0; i < 64 * 64; ++i) {
    Af[i] = float(small(rng)) / 4.f;
    Bf[i] = float(small(rng)) / 2.f;
    A[i] = bf(Af[i]);
    B[i] = bf(Bf[i]);
  }
  GemmArgs p;
  p.ta = desc2d(A.data(), 64, 64, 64);
  p.tb = desc2d(B.data(), 64, 64, 64);  // SS: B^T [n][k]; RS: B [k][n]
  p.a_glob = A.data();
  out->assign(64 * 64, -7.f);
  p.d = out->data();
  p.rs = rs;
  p.bug = bug;
  emu::allow_sm90_smem(reinterpret_cast<const void*>(&gemm_kernel));
  DISTATTN_LAUNCH(gemm_kernel, dim3(1), dim3(128), 16384 + 64, nullptr, p);
  const std::string r = launch_result();
  double err = 0;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 64; ++n) {
      double ref = 0;
      for (int k = 0; k < 64; ++k)
        ref += double(Af[m * 64 + k]) * (rs ? double(Bf[k * 64 + n]) : double(Bf[n * 64 + k]));
      err = std::fmax(err, std::fabs(ref - (*out)[m * 64 + n]));
    }
  *max_err = err;
  return r;
}

void test_wgmma() {
  std::vector<float> d;
  double err = -1;
  for (bool rs : {false, true}) {
    std::string r = run_gemm(rs, Bug::kNone, &d, &err);
    CHECK(r.empty()) << (rs ? "RS: " : "SS: ") << r;
    CHECK(err == 0.0) << (rs ? "RS" : "SS") << " max error " << err;
  }
  // The mutations: each must fail the launch (or give wrong numbers) with the right message.
  std::string r = run_gemm(false, Bug::kNoWait, &d, &err);
  CHECK(contains(r, "before the thread waited on that phase")) << r;
  r = run_gemm(true, Bug::kNoWait, &d, &err);
  CHECK(contains(r, "before the thread waited on that phase")) << r;
  r = run_gemm(false, Bug::kRefillInFlight, &d, &err);
  CHECK(contains(r, "that a wgmma still reads")) << r;
  r = run_gemm(false, Bug::kReadBeforeWait, &d, &err);
  CHECK(r.empty()) << r;
  CHECK(err > 1.0) << "results read before wgmma.wait_group must not be there yet";
  r = run_gemm(false, Bug::kNoFence, &d, &err);
  CHECK(contains(r, "without wgmma.fence")) << r;
}

// ---- releasing a stage before the wgmma that reads it retired ------------------------------
// Warpgroup 1 consumes a TMA-loaded B with one wgmma and releases the stage on `empty`;
// warpgroup 0's thread 0 waits for the release and refills the stage. Correct: wait_group,
// then arrive. The bug (arrive, then wait_group) must be reported whichever thread runs first:
// the refill is checked against what the producer knows through the barrier, not against the
// order the emulator happened to run the threads in.
struct ReleaseArgs {
  emu::TmaDesc tb;
  bool early;
};
__global__ void release_kernel(const ReleaseArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sB = reinterpret_cast<uint16_t*>(smem_raw);  // 8 KiB at 0
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + 8192);
  uint64_t* empty = full + 1;
  if (threadIdx.x == 0) {
    cute::initialize_barrier(*full, 1);
    cute::initialize_barrier(*empty, 128);
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    if (threadIdx.x == 0) {
      cute::set_barrier_transaction_bytes(*full, 8192);
      cute::SM90_TMA_LOAD_2D::copy(&p.tb, full, kEvictNormal, sB, 0, 0);
      cute::wait_barrier(*empty, 0);
      cute::set_barrier_transaction_bytes(*full, 8192);  // refill the stage
      cute::SM90_TMA_LOAD_2D::copy(&p.tb, full, kEvictNormal, sB, 0, 0);
    }
    return;
  }
  cute::wait_barrier(*full, 0);
  float d[32];
  const uint32_t b0 = uint32_t(__cvta_generic_to_shared(sB));
  const uint32_t a[4] = {0, 0, 0, 0};
  using Major = cute::SM90::GMMA::Major;
  cute::warpgroup_arrive();
  cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::MN>::fma(
      a[0], a[1], a[2], a[3], desc_sw128(b0, 8192, 1024), d[0], d[1], d[2], d[3], d[4], d[5],
      d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15], d[16], d[17], d[18],
      d[19], d[20], d[21], d[22], d[23], d[24], d[25], d[26], d[27], d[28], d[29], d[30], d[31],
      cute::SM90::GMMA::ScaleOut::Zero);
  cute::warpgroup_commit_batch();
  if (p.early) cute::arrive_barrier(*empty);
  cute::warpgroup_wait<0>();
  if (!p.early) cute::arrive_barrier(*empty);
  cute::wait_barrier(*full, 1);  // the refill landed before the CTA ends
}

void test_release_order() {
  std::vector<uint16_t> B(64 * 64, bf(1.f));
  for (bool early : {false, true}) {
    ReleaseArgs p{desc2d(B.data(), 64, 64, 64), early};
    DISTATTN_LAUNCH(release_kernel, dim3(1), dim3(256), 8192 + 16, nullptr, p);
    const std::string r = launch_result();
    if (early)
      CHECK(contains(r, "that a wgmma still reads")) << "early release: " << r;
    else
      CHECK(r.empty()) << r;
  }
}

// ---- TMA box with out-of-bounds fill, swizzle placement ----------------------------------------
struct BoxArgs {
  emu::TmaDesc t;
  int c0, c1;
  unsigned char* dump;
  uint64_t hint;  // the 64 x 64 box as it lies in shared memory (8 KiB)
};
__global__ void box_kernel(const BoxArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem_raw + 8192);
  if (threadIdx.x == 0) {
    cute::initialize_barrier(*bar, 1);
    cute::set_barrier_transaction_bytes(*bar, 8192);
    cute::SM90_TMA_LOAD_2D::copy(&p.t, bar, p.hint, smem_raw, p.c0, p.c1);
    cute::wait_barrier(*bar, 0);
    std::memcpy(p.dump, smem_raw, 8192);  // the raw bytes (the test's view, not a kernel's)
  }
}

void test_tma_box() {
  const int rows = 100, cols = 80;
  std::vector<uint16_t> g(rows * cols);
  for (int i = 0; i < rows * cols; ++i) g[i] = uint16_t(i + 1);
  std::vector<unsigned char> dump(8192);
  for (auto [c0, c1] : {std::pair<int, int>{0, 0}, {40, 70}, {-8, -3}}) {
    BoxArgs p{desc2d(g.data(), rows, cols, 64), c0, c1, dump.data(), kEvictNormal};
    DISTATTN_LAUNCH(box_kernel, dim3(1), dim3(32), 8192 + 8, nullptr, p);
    const std::string r = launch_result();
    CHECK(r.empty()) << r;
    int bad = 0;
    for (int rr = 0; rr < 64; ++rr)
      for (int cc = 0; cc < 64; ++cc) {
        const int gr = c1 + rr, gc = c0 + cc;
        const uint16_t want = gr >= 0 && gr < rows && gc >= 0 && gc < cols ? g[gr * cols + gc] : 0;
        // 128-byte swizzle: chunk (16 B) index XOR row % 8.
        const uint32_t lin = uint32_t(rr * 128 + cc * 2);
        const uint32_t at = lin ^ (((lin >> 7) & 7) << 4);
        uint16_t got;
        std::memcpy(&got, dump.data() + at, 2);
        bad += got != want;
      }
    CHECK(bad == 0) << "box at (" << c0 << ", " << c1 << "): " << bad << " elements wrong";
  }
  BoxArgs p{desc2d(g.data(), rows, cols, 64), 0, 0, dump.data(), 0};  // 0 is no cache policy
  DISTATTN_LAUNCH(box_kernel, dim3(1), dim3(32), 8192 + 8, nullptr, p);
  const std::string r = launch_result();
  CHECK(contains(r, "not a cache policy")) << r;
}

// ---- waits that never complete; setmaxnreg --------------------------------------------------
__global__ void deadlock_kernel(int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem_raw);
  if (threadIdx.x == 0) cute::initialize_barrier(*bar, 2);
  __syncthreads();
  if (threadIdx.x == 0) cute::arrive_barrier(*bar);  // one arrival of the two
  cute::wait_barrier(*bar, 0);
}

template <int kInc>
__global__ void regs_kernel(int) {
  if (threadIdx.x / 128 == 0)
    cutlass::arch::warpgroup_reg_dealloc<24>();
  else
    cutlass::arch::warpgroup_reg_alloc<kInc>();
}

void test_blocking() {
  DISTATTN_LAUNCH(deadlock_kernel, dim3(1), dim3(64), 64, nullptr, 0);
  std::string r = launch_result();
  CHECK(contains(r, "deadlock") && contains(r, "mbarrier phase that never completes")) << r;
  DISTATTN_LAUNCH(regs_kernel<240>, dim3(1), dim3(384), 0, nullptr, 0);
  r = launch_result();
  CHECK(r.empty()) << r;  // 24 + 240 + 240 = 504 <= 512 per thread of a warpgroup
  DISTATTN_LAUNCH(regs_kernel<256>, dim3(1), dim3(384), 0, nullptr, 0);
  r = launch_result();
  CHECK(contains(r, "waits for registers")) << r;  // 24 + 256 + 256 > 512
}

// m64n32k16 SS (the hd128 backward's S^T = K Q^T over a 32-row Q stage): D[64][32] = A B with
// B^T [32][64] K-major, placed by TMA with a 32-row box.
struct Gemm32Args {
  emu::TmaDesc ta, tb;
  float* d;  // [64][32]
};
__global__ void gemm32_kernel(const Gemm32Args p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);  // [64][64] at 0
  uint16_t* sB = sA + 64 * 64;                           // [32][64] at 8192
  uint64_t* bar = reinterpret_cast<uint64_t*>(sB + 32 * 64);
  const int tid = threadIdx.x;
  if (tid == 0) cute::initialize_barrier(*bar, 1);
  __syncthreads();
  if (tid == 0) {
    cute::set_barrier_transaction_bytes(*bar, 8192 + 4096);
    cute::SM90_TMA_LOAD_2D::copy(&p.ta, bar, kEvictNormal, sA, 0, 0);
    cute::SM90_TMA_LOAD_2D::copy(&p.tb, bar, kEvictNormal, sB, 0, 0);
  }
  cute::wait_barrier(*bar, 0);
  float d[16];
  const uint32_t a0 = uint32_t(__cvta_generic_to_shared(sA));
  const uint32_t b0 = uint32_t(__cvta_generic_to_shared(sB));
  cute::warpgroup_arrive();
  using Major = cute::SM90::GMMA::Major;
  for (int kk = 0; kk < 4; ++kk)
    cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_SS<Major::K, Major::K>::fma(
        desc_sw128(a0 + 32 * kk, 16, 1024), desc_sw128(b0 + 32 * kk, 16, 1024), d[0], d[1],
        d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15],
        kk ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  for (int v = 0; v < 16; ++v) {
    const ::emu::sm90::Coord c = ::emu::sm90::acc_coord(tid, v);
    p.d[c.row * 32 + c.col] = d[v];
  }
}

void test_wgmma_n32() {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<uint16_t> A(64 * 64), B(32 * 64);
  std::vector<float> Af(64 * 64), Bf(32 * 64);
  for (int i = 0; i < 64 * 64; ++i) A[i] = bf(Af[i] = float(small(rng)) / 4.f);
  for (int i = 0; i < 32 * 64; ++i) B[i] = bf(Bf[i] = float(small(rng)) / 2.f);
  std::vector<float> out(64 * 32, -7.f);
  Gemm32Args p;
  p.ta = desc2d(A.data(), 64, 64, 64);
  p.tb = desc2d(B.data(), 32, 64, 32);
  p.d = out.data();
  emu::allow_sm90_smem(reinterpret_cast<const void*>(&gemm32_kernel));
  DISTATTN_LAUNCH(gemm32_kernel, dim3(1), dim3(128), 8192 + 4096 + 64, nullptr, p);
  const std::string r = launch_result();
  CHECK(r.empty()) << "SS n32: " << r;
  double err = 0;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 32; ++n) {
      double ref = 0;
      for (int k = 0; k < 64; ++k) ref += double(Af[m * 64 + k]) * double(Bf[n * 64 + k]);
      err = std::fmax(err, std::fabs(ref - out[m * 32 + n]));
    }
  CHECK(err == 0.0) << "SS n32 max error " << err;
}

}  // namespace kern
}  // namespace distattn

int main() {
  distattn::kern::test_wgmma();
  distattn::kern::test_wgmma_n32();
  distattn::kern::test_release_order();
  distattn::kern::test_tma_box();
  distattn::kern::test_blocking();
  return harness::finish("test_sm90_emulator");
}
