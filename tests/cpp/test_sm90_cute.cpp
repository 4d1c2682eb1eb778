// The sm_90a models of csrc/emulate/sm90_gmma.h against CuTe's own definitions, evaluated here:
// this program includes the nvidia-cutlass headers (host compilation with g++; CuTe's layouts
// are constexpr host/device code) and compares, over every index,
//   * acc_coord / a_coord  vs  MMA_Traits<SM90_64xNx16_F32{F16F16,BF16BF16}_RS>::CLayout and
//     ::ALayout (GMMA::CLayout_64xN, GMMA::ALayout_64x16: (thread, value) -> m + 64 * n|k),
//     N = 64, 128, 256 (and 8, 16);
//   * swizzle_address  vs  cute::Swizzle<{0,1,2,3},4,3> on byte addresses;
//   * k_major_desc / mn_major_desc + encode  vs  GMMA::make_gmma_desc<Major::K|MN> of a
//     tile_to_shape(GMMA::Layout_{K,MN}_{INTER,SW32,SW64,SW128}_Atom<half_t>, (rows, 64)) smem
//     tensor's 16-wide k-slices, bit for bit;
//   * operand_address(desc) vs the byte address CuTe's swizzled smem tensor gives each (mn, k).
// Mutation checks: deliberately wrong variants of each model must disagree with CuTe somewhere.
#include <cstddef>
#include <cstdint>

// make_gmma_desc takes the start address from __cvta_generic_to_shared, which only device code
// has; here it is the offset into `g_smem`, the stand-in shared window.
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
alignas(1024) static unsigned char g_smem[1 << 17];
inline size_t __cvta_generic_to_shared(const void* p) {
  return size_t(static_cast<const unsigned char*>(p) - g_smem);
}

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <functional>

#include "emulate/sm90_gmma.h"
#include "harness.h"

namespace sm90 = emu::sm90;

namespace {

using FragFn = std::function<sm90::Coord(int t, int v)>;

// Number of (thread, value) pairs whose coordinate differs from CuTe's layout (index m + 64 c).
template <class CuteLayout>
int fragment_mismatches(CuteLayout layout, const FragFn& model) {
  int bad = 0;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < int(cute::size<1>(layout)); ++v) {
      const sm90::Coord c = model(t, v);
      if (int(layout(t, v)) != c.row + 64 * c.col) ++bad;
    }
  return bad;
}

// Deliberately wrong fragment maps: each must disagree with CuTe.
const FragFn frag_mutants[] = {
    [](int t, int v) { sm90::Coord c = sm90::acc_coord(t, v); return sm90::Coord{c.row, c.col ^ 1}; },  // j flipped
    [](int t, int v) {  // h and j swapped (upper rows <-> odd column)
      const int w = t / 32, g = (t % 32) / 4, q = t % 4;
      return sm90::Coord{16 * w + g + 8 * (v % 2), 8 * (v / 4) + 2 * q + (v / 2) % 2};
    },
    [](int t, int v) {  // warps own interleaved rows instead of 16-row blocks
      const int w = t / 32, g = (t % 32) / 4, q = t % 4;
      return sm90::Coord{4 * g + w + 32 * ((v / 2) % 2) / 2, 8 * (v / 4) + 2 * q + v % 2};
    },
    [](int t, int v) {  // lane's row group and quad position swapped (g = lane % 8)
      const int l = t % 32, w = t / 32, g = l % 8, q = l / 8;
      return sm90::Coord{16 * w + g + 8 * ((v / 2) % 2), 8 * (v / 4) + 2 * q + v % 2};
    },
};

template <int N>
void check_fragments() {
  using namespace cute;
  const auto cl = GMMA::CLayout_64xN<N>{};
  CHECK(int(size<0>(cl)) == 128 && int(size<1>(cl)) == sm90::acc_values(N)) << "N=" << N;
  CHECK(fragment_mismatches(cl, sm90::acc_coord) == 0) << "accumulator N=" << N;
  for (const auto& m : frag_mutants) CHECK(fragment_mismatches(cl, m) > 0) << "mutant N=" << N;
}

void check_atom_traits() {
  using namespace cute;
  using K = GMMA::Major;
  // The atoms an FMHA uses: S = Q K^T (SS or RS) and O = P V (RS, P from registers), fp16/bf16.
  using F64 = MMA_Traits<SM90_64x64x16_F32F16F16_RS<K::K, K::K>>;
  using F128 = MMA_Traits<SM90_64x128x16_F32F16F16_RS<K::K, K::MN>>;
  using F256 = MMA_Traits<SM90_64x256x16_F32F16F16_RS<K::K, K::K>>;
  using B64 = MMA_Traits<SM90_64x64x16_F32BF16BF16_RS<K::K, K::MN>>;
  using B128 = MMA_Traits<SM90_64x128x16_F32BF16BF16_RS<K::K, K::K>>;
  using B256 = MMA_Traits<SM90_64x256x16_F32BF16BF16_RS<K::K, K::MN>>;
  using S128 = MMA_Traits<SM90_64x128x16_F32F16F16_SS<K::K, K::K>>;
  CHECK(fragment_mismatches(typename F64::CLayout{}, sm90::acc_coord) == 0) << "f16 N=64";
  CHECK(fragment_mismatches(typename F128::CLayout{}, sm90::acc_coord) == 0) << "f16 N=128";
  CHECK(fragment_mismatches(typename F256::CLayout{}, sm90::acc_coord) == 0) << "f16 N=256";
  CHECK(fragment_mismatches(typename B64::CLayout{}, sm90::acc_coord) == 0) << "bf16 N=64";
  CHECK(fragment_mismatches(typename B128::CLayout{}, sm90::acc_coord) == 0) << "bf16 N=128";
  CHECK(fragment_mismatches(typename B256::CLayout{}, sm90::acc_coord) == 0) << "bf16 N=256";
  CHECK(fragment_mismatches(typename S128::CLayout{}, sm90::acc_coord) == 0) << "SS N=128";
  for (auto al : {typename F64::ALayout{}, typename F128::ALayout{}, typename F256::ALayout{},
                  typename B64::ALayout{}, typename B128::ALayout{}, typename B256::ALayout{}}) {
    CHECK(int(size<1>(al)) == sm90::a_values());
    CHECK(fragment_mismatches(al, sm90::a_coord) == 0) << "A from registers";
    for (const auto& m : frag_mutants) CHECK(fragment_mismatches(al, m) > 0) << "A mutant";
  }
  // A mutant specific to A: the two k halves (kb) exchanged with the row halves (h).
  const FragFn kb_for_h = [](int t, int v) {
    const int w = t / 32, g = (t % 32) / 4, q = t % 4;
    return sm90::Coord{16 * w + g + 8 * (v / 4), 8 * ((v / 2) % 2) + 2 * q + v % 2};
  };
  CHECK(fragment_mismatches(typename F128::ALayout{}, kb_for_h) > 0);
}

// ---- swizzles -------------------------------------------------------------------------------
template <int B>
int swizzle_mismatches(sm90::Swizzle s, uint32_t (*model)(sm90::Swizzle, uint32_t)) {
  const cute::Swizzle<B, 4, 3> ref{};
  int bad = 0;
  for (uint32_t a = 0; a < 16384; ++a) bad += uint32_t(ref(int(a))) != model(s, a);
  return bad;
}
uint32_t swz_wrong_shift(sm90::Swizzle s, uint32_t a) {  // XOR source bits 8.. instead of 7..
  const int bits = s == sm90::Swizzle::B128 ? 3 : s == sm90::Swizzle::B64 ? 2 : 1;
  return a ^ ((a & (((1u << bits) - 1u) << 8)) >> 4);
}
uint32_t swz_wrong_width(sm90::Swizzle s, uint32_t a) {  // 64B and 32B exchanged
  using S = sm90::Swizzle;
  return sm90::swizzle_address(s == S::B64 ? S::B32 : s == S::B32 ? S::B64 : s, a);
}

void check_swizzles() {
  using S = sm90::Swizzle;
  CHECK(swizzle_mismatches<0>(S::None, sm90::swizzle_address) == 0);
  CHECK(swizzle_mismatches<1>(S::B32, sm90::swizzle_address) == 0);
  CHECK(swizzle_mismatches<2>(S::B64, sm90::swizzle_address) == 0);
  CHECK(swizzle_mismatches<3>(S::B128, sm90::swizzle_address) == 0);
  CHECK(swizzle_mismatches<1>(S::B32, swz_wrong_shift) > 0);
  CHECK(swizzle_mismatches<3>(S::B128, swz_wrong_shift) > 0);
  CHECK(swizzle_mismatches<1>(S::B32, swz_wrong_width) > 0);
  CHECK(swizzle_mismatches<2>(S::B64, swz_wrong_width) > 0);
}

// ---- descriptors and operand addresses ------------------------------------------------------
using AddrFn = std::function<uint32_t(uint64_t desc, sm90::Major, int mn, int k)>;

uint32_t model_addr(uint64_t d, sm90::Major m, int mn, int k) {
  return sm90::operand_address(d, m, mn, k, 2);
}

// Mismatching (mn, k) count of an address function over one k-slice tensor of CuTe's.
template <class Tensor>
int address_mismatches(const Tensor& tk, uint64_t desc, sm90::Major major, int rows,
                       const AddrFn& fn) {
  int bad = 0;
  for (int mn = 0; mn < rows; ++mn)
    for (int k = 0; k < 16; ++k) {
      const auto* p = reinterpret_cast<const unsigned char*>(&tk(mn, k));
      bad += uint32_t(p - g_smem) != fn(desc, major, mn, k);
    }
  return bad;
}

const AddrFn addr_mutants[] = {
    [](uint64_t d, sm90::Major m, int mn, int k) {  // LBO and SBO exchanged
      sm90::Desc x = sm90::decode(d);
      std::swap(x.lbo, x.sbo);
      return model_addr(sm90::encode(x), m, mn, k);
    },
    [](uint64_t d, sm90::Major m, int mn, int k) {  // swizzle applied to the offset, not the address
      const sm90::Desc x = sm90::decode(d);
      sm90::Desc y = x;
      y.start = 0;
      const uint32_t off = model_addr(sm90::encode(y), m, mn, k);
      return x.start + off;
    },
    [](uint64_t d, sm90::Major m, int mn, int k) {  // mn and k roles exchanged inside a core matrix
      return model_addr(d, m, (mn & ~7) | (k & 7), (k & ~7) | (mn & 7));
    },
};

int* mutant_caught() {
  static int n[3] = {};
  return n;
}

// One canonical tile (rows x 64 halves) built by CuTe from `Atom` at shared offset `base`,
// compared slice by slice: descriptor bits and every element's address.
template <class Atom, int Rows, sm90::Major major>
void check_tile(sm90::Swizzle s, uint32_t base, const char* name) {
  using namespace cute;
  auto layout = tile_to_shape(Atom{}, Shape<Int<Rows>, _64>{});
  auto t = make_tensor(make_smem_ptr(reinterpret_cast<half_t*>(g_smem + base)), layout);
  for (int kb = 0; kb < 4; ++kb) {
    auto tk = local_tile(t, Shape<Int<Rows>, _16>{}, make_coord(0, kb));
    constexpr auto cute_major = major == sm90::Major::K ? GMMA::Major::K : GMMA::Major::MN;
    const uint64_t cute_desc = GMMA::make_gmma_desc<cute_major>(tk);
    const sm90::Desc ours = major == sm90::Major::K ? sm90::k_major_desc(base, s, Rows, kb)
                                                    : sm90::mn_major_desc(base, s, Rows, kb);
    CHECK(sm90::encode(ours) == cute_desc)
        << name << " rows " << Rows << " kb " << kb << ": ours " << std::hex << sm90::encode(ours)
        << " cute " << cute_desc;
    CHECK(sm90::encode(sm90::decode(cute_desc)) == cute_desc) << name << " decode/encode";
    CHECK(address_mismatches(tk, cute_desc, major, Rows, model_addr) == 0)
        << name << " rows " << Rows << " kb " << kb;
    // Mutants 0 (LBO/SBO exchanged) and 2 (mn/k exchanged) change every layout; mutant 1
    // (swizzle of the offset instead of the address) only where a slice starts inside a
    // swizzle pattern (K-major SW64/SW128 at kb > 0): counted over all tiles in main().
    for (int i = 0; i < 3; ++i) {
      const bool caught = address_mismatches(tk, cute_desc, major, Rows, addr_mutants[i]) > 0;
      mutant_caught()[i] += caught;
      if (i != 1) CHECK(caught) << name << " rows " << Rows << " kb " << kb << " mutant " << i;
    }
  }
}

void check_descriptors() {
  using namespace cute;
  using sm90::Major;
  using S = sm90::Swizzle;
  // K-major: Q, K (and dO, ...) tiles; base 2048 (1024-aligned, not 0, so start bits are seen).
  check_tile<GMMA::Layout_K_INTER_Atom<half_t>, 64, Major::K>(S::None, 2048, "K INTER");
  check_tile<GMMA::Layout_K_SW32_Atom<half_t>, 64, Major::K>(S::B32, 2048, "K SW32");
  check_tile<GMMA::Layout_K_SW64_Atom<half_t>, 64, Major::K>(S::B64, 2048, "K SW64");
  check_tile<GMMA::Layout_K_SW128_Atom<half_t>, 64, Major::K>(S::B128, 2048, "K SW128");
  check_tile<GMMA::Layout_K_SW128_Atom<half_t>, 128, Major::K>(S::B128, 4096, "K SW128");
  check_tile<GMMA::Layout_K_SW64_Atom<half_t>, 128, Major::K>(S::B64, 4096, "K SW64");
  check_tile<GMMA::Layout_K_SW128_Atom<half_t>, 256, Major::K>(S::B128, 8192, "K SW128");
  // MN-major: V as the B operand of O = P V (n = head dim contiguous).
  check_tile<GMMA::Layout_MN_SW32_Atom<half_t>, 64, Major::MN>(S::B32, 2048, "MN SW32");
  check_tile<GMMA::Layout_MN_SW64_Atom<half_t>, 64, Major::MN>(S::B64, 2048, "MN SW64");
  check_tile<GMMA::Layout_MN_SW128_Atom<half_t>, 64, Major::MN>(S::B128, 2048, "MN SW128");
  check_tile<GMMA::Layout_MN_SW128_Atom<half_t>, 128, Major::MN>(S::B128, 4096, "MN SW128");
  check_tile<GMMA::Layout_MN_SW128_Atom<half_t>, 256, Major::MN>(S::B128, 8192, "MN SW128");
  // bf16 atoms are the same bytes as fp16 ones.
  CHECK((std::is_same_v<GMMA::Layout_K_SW128_Atom<half_t>, GMMA::Layout_K_SW128_Atom<bfloat16_t>>));
  // The swizzle-mode encoding itself (descriptor bits 62..63) against CuTe's enum.
  CHECK(int(GMMA::LayoutType::INTERLEAVE) == int(S::None) && int(GMMA::LayoutType::B128) == int(S::B128) &&
        int(GMMA::LayoutType::B64) == int(S::B64) && int(GMMA::LayoutType::B32) == int(S::B32));
  // Field positions against CuTe's bitfield union.
  cute::GmmaDescriptor g;
  g.bitfield.start_address_ = 0x1234;
  g.bitfield.leading_byte_offset_ = 0x0567;
  g.bitfield.stride_byte_offset_ = 0x089a;
  g.bitfield.base_offset_ = 5;
  g.bitfield.layout_type_ = 2;
  const sm90::Desc d = sm90::decode(g.desc_);
  CHECK(d.start == 0x12340u && d.lbo == 0x5670u && d.sbo == 0x89a0u && d.base_offset == 5 &&
        d.swizzle == S::B64);
  CHECK(sm90::encode(d) == g.desc_);
}

}  // namespace

int main() {
  check_fragments<8>();
  check_fragments<16>();
  check_fragments<64>();
  check_fragments<128>();
  check_fragments<256>();
  check_atom_traits();
  check_swizzles();
  check_descriptors();
  for (int i = 0; i < 3; ++i) CHECK(mutant_caught()[i] > 0) << "address mutant " << i << " never caught";
  return harness::finish("test_sm90_cute");
}
