// Models of what sm_90a's warpgroup MMA (wgmma.mma_async) takes and delivers, written from the
// PTX ISA's descriptions (section "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//
//   * the register fragments of a 128-thread warpgroup: the accumulator C/D of an m64nNk16
//     wgmma and the A operand when it comes from registers (16-bit types, k = 16);
//   * the shared-memory matrix descriptor (64-bit: start address, leading / stride byte
//     offsets, base offset, swizzle mode) and the byte address the hardware reads for each
//     element of a descriptor-described operand, with the 32/64/128-byte swizzles.
//
// Nothing here has run on a GPU. tests/cpp/test_sm90_cute.cpp evaluates CuTe's own definitions
// (GMMA::CLayout_64xN, GMMA::ALayout_64x16, GMMA::Layout_{K,MN}_SW*_Atom, make_gmma_desc) over
// every index and compares; tests/cpp/test_sm90.cpp checks the models' own properties.
// Plain C++17, no CUDA, no CuTe.
#pragma once

#include <cstdint>

namespace emu {
namespace sm90 {

// ---- register fragments ---------------------------------------------------------------------
// Thread t of the warpgroup (0..127) is lane l = t % 32 of warp w = t / 32; within the warp,
// g = l / 4 is the row group and q = l % 4 the position in the quad. Warp w owns rows
// 16w .. 16w + 15 of the 64-row tile.
struct Coord {
  int row;  // m
  int col;  // n (accumulator) or k (A operand)
};

// Accumulator of m64nNk16 (N a multiple of 8): N / 2 values per thread. Value v = 4 * p + 2 * h
// + j (p: 8-column block, h: upper 8 rows, j: odd column) sits at row 16w + g + 8h, column
// 8p + 2q + j. Registers d[v] in PTX order; fp32 accumulators are one value per register.
constexpr int acc_values(int n) { return n / 2; }
constexpr Coord acc_coord(int t, int v) {
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  const int j = v % 2, h = (v / 2) % 2, p = v / 4;
  return {16 * w + g + 8 * h, 8 * p + 2 * q + j};
}

// A operand from registers, 16-bit elements, k = 16: 8 values per thread in 4 registers
// (register r holds values 2r (low half) and 2r + 1 (high half)). Value v = 4 * kb + 2 * h + j
// sits at row 16w + g + 8h, column k = 8kb + 2q + j -- the accumulator's map with k for n, which
// is why an fp32 accumulator converted to 16 bits in place is the next wgmma's A operand.
constexpr int a_values() { return 8; }
constexpr Coord a_coord(int t, int v) { return acc_coord(t, v % 8); }

// ---- shared-memory matrix descriptors -------------------------------------------------------
// Swizzle mode as encoded in descriptor bits 62..63.
enum class Swizzle : int { None = 0, B128 = 1, B64 = 2, B32 = 3 };

// Which dimension of the operand is contiguous in shared memory: K-major (each row of A, or
// each column n of B, is contiguous along k) or MN-major.
enum class Major { K, MN };

// Width in bytes of one swizzle row (the span over which 16-byte chunks are permuted): 16 for
// no swizzle (one chunk), else 32 / 64 / 128.
constexpr int swizzle_width(Swizzle s) {
  return s == Swizzle::B128 ? 128 : s == Swizzle::B64 ? 64 : s == Swizzle::B32 ? 32 : 16;
}

// The swizzle as a function of a byte address in the shared window: the 16-byte chunk index
// within a row (address bits 4..) is XORed with the row index within the 8-row pattern (bits
// 7..); log2(width / 16) bits take part (3 for 128 B, 2 for 64 B, 1 for 32 B, 0 for none). The
// hardware applies it to the absolute address, so a pattern starts at a multiple of 8 * width
// bytes only when the operand's base is aligned so (base_offset = 0, the only case modelled).
constexpr uint32_t swizzle_address(Swizzle s, uint32_t addr) {
  const int bits = s == Swizzle::B128 ? 3 : s == Swizzle::B64 ? 2 : s == Swizzle::B32 ? 1 : 0;
  const uint32_t row_bits = ((1u << bits) - 1u) << 7;
  return addr ^ ((addr & row_bits) >> 3);
}

// The descriptor's fields in bytes (the encoding drops the low 4 bits of each).
struct Desc {
  uint32_t start = 0;  // byte address of the operand in the shared window (< 256 KiB)
  uint32_t lbo = 0;    // leading-dimension byte offset
  uint32_t sbo = 0;    // stride-dimension byte offset
  int base_offset = 0;  // 3 bits: pattern phase when the base is not aligned (modelled: 0 only)
  Swizzle swizzle = Swizzle::None;
};

// Bits: [0,14) start >> 4, [16,30) lbo >> 4, [32,46) sbo >> 4, [49,52) base_offset,
// [62,64) swizzle. Contract: start, lbo, sbo are multiples of 16 below 2^18.
constexpr uint64_t encode(const Desc& d) {
  return uint64_t((d.start >> 4) & 0x3fff) | uint64_t((d.lbo >> 4) & 0x3fff) << 16 |
         uint64_t((d.sbo >> 4) & 0x3fff) << 32 | uint64_t(d.base_offset & 7) << 49 |
         uint64_t(int(d.swizzle) & 3) << 62;
}
constexpr Desc decode(uint64_t bits) {
  Desc d;
  d.start = uint32_t(bits & 0x3fff) << 4;
  d.lbo = uint32_t((bits >> 16) & 0x3fff) << 4;
  d.sbo = uint32_t((bits >> 32) & 0x3fff) << 4;
  d.base_offset = int((bits >> 49) & 7);
  d.swizzle = Swizzle(int((bits >> 62) & 3));
  return d;
}

// Byte address the wgmma reads for element (mn, k) of one k-slice of an operand (mn: row m of
// A or column n of B; k < 32 / elem_bytes, one wgmma's k extent for 16-bit types), given its
// descriptor. The operand is built of "core matrices": 8 rows (K-major: 8 mn; MN-major: 8 k)
// of 16 contiguous bytes.
//   K-major: core-matrix row = mn % 8 at stride `width` bytes (16 when unswizzled); the 8-row
//     groups mn / 8 at stride SBO; the two 16-byte k chunks at stride LBO when unswizzled, and
//     adjacent (16 B apart, inside the swizzle row) when swizzled (LBO unused).
//   MN-major (swizzled only): 16-byte chunks along mn adjacent within a swizzle row, the next
//     row's worth (width bytes of mn) at stride LBO; k % 8 at stride `width`, k / 8 at SBO.
// Contract: elem_bytes in {1, 2, 4}; MN-major with Swizzle::None is not modelled (returns ~0u).
constexpr uint32_t operand_address(uint64_t desc_bits, Major major, int mn, int k, int elem_bytes) {
  const Desc d = decode(desc_bits);
  const uint32_t width = uint32_t(swizzle_width(d.swizzle));
  uint32_t off = 0;
  if (major == Major::K) {
    const uint32_t kbyte = uint32_t(k * elem_bytes), chunk = kbyte / 16, in_chunk = kbyte % 16;
    off = uint32_t(mn % 8) * width + uint32_t(mn / 8) * d.sbo + in_chunk +
          (d.swizzle == Swizzle::None ? chunk * d.lbo : chunk * 16);
  } else {
    if (d.swizzle == Swizzle::None) return ~0u;
    const uint32_t mnbyte = uint32_t(mn * elem_bytes), per_row = width;
    off = (mnbyte % per_row) + (mnbyte / per_row) * d.lbo + uint32_t(k % 8) * width +
          uint32_t(k / 8) * d.sbo;
  }
  return swizzle_address(d.swizzle, d.start + off);
}

// Descriptors of the canonical tiles the kernels will store (16-bit values, `rows` mn by some
// multiple of the atom's k extent), atoms placed along mn first and then along k -- the order
// CuTe's tile_to_shape gives -- and the descriptor of one wgmma's k-slice `kb` (16 values):
//   K-major, swizzled (atom: 8 rows x `width` bytes): 8-row groups at SBO = 8 * width; k atoms
//     at rows * width; the slice starts 32 kb bytes into its row (LBO unused: 16, "assumed 1").
//   K-major, unswizzled (atom: one 8 x 16 B core matrix): 8-row groups at SBO = 128; the two
//     k chunks of a slice at LBO = rows * 16; slice kb starts 2 kb chunk columns in.
constexpr Desc k_major_desc(uint32_t base, Swizzle s, int rows, int kb) {
  Desc d;
  d.swizzle = s;
  const uint32_t width = uint32_t(swizzle_width(s));
  if (s == Swizzle::None) {
    d.lbo = uint32_t(rows) * 16u;
    d.sbo = 128;
    d.start = base + uint32_t(kb) * 2u * d.lbo;
  } else {
    const uint32_t per_row = width / 2;          // 16-bit k values per swizzle row
    const uint32_t k0 = uint32_t(kb) * 16u;      // first k value of the slice
    d.lbo = 16;
    d.sbo = 8 * width;
    d.start = base + (k0 / per_row) * uint32_t(rows) * width + (k0 % per_row) * 2u;
  }
  return d;
}

// MN-major, swizzled, 16-bit: the tile is stored as atoms of (width / 2 mn values) x 8 k, an
// atom's k rows `width` bytes apart. Atoms follow each other along mn first (LBO = 8 * width)
// and then along k (SBO = rows / (width / 2) * 8 * width). k-slice kb (16 values) starts two
// 8-k groups (2 SBO) further per kb.
constexpr Desc mn_major_desc(uint32_t base, Swizzle s, int rows, int kb) {
  Desc d;
  d.swizzle = s;
  const uint32_t width = uint32_t(swizzle_width(s));
  const uint32_t atoms_mn = uint32_t(rows) / (width / 2);
  d.lbo = atoms_mn > 1 ? 8 * width : 0;  // unused with one atom along mn (then 0, as CuTe)
  d.sbo = atoms_mn * 8 * width;
  d.start = base + uint32_t(kb) * 2u * d.sbo;
  return d;
}

}  // namespace sm90
}  // namespace emu
