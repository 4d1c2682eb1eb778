// The lane maps of the tensor-core code (csrc/distattn/fragments.h) against a model of the
// PTX instructions, written from the PTX ISA's descriptions:
//
//   ldmatrix.x4 (m8n8, b16): lanes 8i..8i+7 give the row addresses of matrix i; register i of
//     lane L receives matrix i's elements (L/4, 2*(L%4) + {0,1}); with .trans it receives
//     (2*(L%4) + {0,1}, L/4).
//   mma.m16n8k16 operand fragments (lane = 4g + t):
//     A reg q half j = A[g + 8*(q%2)][2t + j + 8*(q/2)]
//     B reg q half j = B[2t + j + 8q][g]
//     C elem e       = C[g + 8*(e/2)][2t + e%2]
//
// Checked: every ldmatrix load used by the kernels delivers, in every lane and register, the
// element that the MMA fragment definition asks for; and the accumulator-to-A conversion puts
// each probability back at the (row, key) the next MMA expects.
#include "distattn/fragments.h"
#include "harness.h"

using namespace distattn;
using frag::RowCol;

namespace {

// Position in the stored tile (relative to the load origin) that ldmatrix.x4 delivers to
// `lane`, register `reg`, half `j`, given the per-lane address map.
template <typename AddrFn>
RowCol ldmatrix_model(AddrFn addr, int lane, int reg, int j, bool trans) {
  const int r = trans ? 2 * (lane % 4) + j : lane / 4;  // row within the 8x8 matrix
  const int c = trans ? lane / 4 : 2 * (lane % 4) + j;  // column within the 8x8 matrix
  const RowCol row_start = addr(8 * reg + r);           // the lane that addressed that row
  return {row_start.row, row_start.col + c};
}

}  // namespace

int main() {
  // Each lane's address must be the start of a 16-byte (8-element) segment inside the 16x16
  // region, and the 32 addresses must name 32 distinct (row, segment) pairs.
  for (auto addr : {frag::ldsm_a_addr, frag::ldsm_b_nmajor_addr, frag::ldsm_b_kmajor_addr}) {
    bool seen[16][2] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const RowCol a = addr(lane);
      CHECK(a.row >= 0 && a.row < 16 && (a.col == 0 || a.col == 8)) << "lane " << lane;
      if (a.row >= 0 && a.row < 16 && (a.col == 0 || a.col == 8)) {
        CHECK(!seen[a.row][a.col / 8]) << "lane " << lane << " repeats an address";
        seen[a.row][a.col / 8] = true;
      }
    }
  }

  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 2; ++j) {
        // A operand from a row-major tile: stored (row, col) = A's (row, col).
        const RowCol a = ldmatrix_model(frag::ldsm_a_addr, lane, q, j, false);
        CHECK(a.row == g + 8 * (q % 2) && a.col == 2 * t + j + 8 * (q / 2))
            << "A lane " << lane << " reg " << q << " half " << j;

        // B operand, n-major tile (tile[n][k]): registers 0,1 = n-tile 0, 2,3 = n-tile 1.
        const int n_tile = q / 2, breg = q % 2;
        const int want_k = 2 * t + j + 8 * breg, want_n = g + 8 * n_tile;
        const RowCol bn = ldmatrix_model(frag::ldsm_b_nmajor_addr, lane, q, j, false);
        CHECK(bn.row == want_n && bn.col == want_k)
            << "B n-major lane " << lane << " reg " << q << " half " << j;

        // B operand, k-major tile (tile[k][n]), transposed load.
        const RowCol bk = ldmatrix_model(frag::ldsm_b_kmajor_addr, lane, q, j, true);
        CHECK(bk.row == want_k && bk.col == want_n)
            << "B k-major lane " << lane << " reg " << q << " half " << j;

        // Accumulator -> A: the C element taken for A reg q half j of slice s sits at
        // (row, column) = (g + 8*(e/2), 8*(2s + tile) + 2t + e%2), which must equal A's
        // (g + 8*(q%2), 16s + 2t + j + 8*(q/2)).
        for (int s = 0; s < 4; ++s) {
          const int tile = 2 * s + frag::acc_tile(q), e = frag::acc_elem(q, j);
          const int c_row = g + 8 * (e / 2), c_col = 8 * tile + 2 * t + e % 2;
          CHECK(c_row == g + 8 * (q % 2) && c_col == 16 * s + 2 * t + j + 8 * (q / 2))
              << "acc->A lane " << lane << " slice " << s << " reg " << q << " half " << j;
        }
      }
  }
  return harness::finish("test_fragments");
}
