// Lane-to-element maps of the warp-level tensor-core code (kernels/mma.cuh), kept in a header
// that g++ can compile so tests/cpp can check them against a model of the PTX instructions.
//
// Notation: lane = 4*g + t. Positions are (row, col) relative to the 16x16 (A) or 16x16-wide
// pair of 8-column B tiles being loaded.
#pragma once

#include "tiling.h"

namespace distattn {
namespace frag {

struct RowCol {
  int row;
  int col;
};

// Row address (start of an 8-element, 16-byte row segment) that `lane` hands to ldmatrix.x4
// for each of the three fragment loads. Lanes 8i..8i+7 address the 8 rows of matrix i.
//   A fragment, 16x16 block of a row-major tile: matrices (rows 0-7|8-15) x (cols 0-7|8-15),
//   ordered rows-first so they land in A's reg0..reg3.
DA_HD RowCol ldsm_a_addr(int lane) { return {lane % 16, 8 * (lane / 16)}; }
//   B fragments of two n-tiles from an n-major tile (tile[n][k]); matrix order
//   (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
DA_HD RowCol ldsm_b_nmajor_addr(int lane) {
  return {lane % 8 + 8 * (lane / 16), 8 * ((lane / 8) % 2)};
}
//   B fragments of two n-tiles from a k-major tile (tile[k][n]), transposed load; matrix
//   order (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
DA_HD RowCol ldsm_b_kmajor_addr(int lane) { return {lane % 16, 8 * (lane / 16)}; }

// Accumulator -> A operand: half `j` of A register `q` of 16-column slice s comes from
// element acc_elem(q, j) of accumulator tile 2*s + acc_tile(q).
DA_HD constexpr int acc_tile(int q) { return q / 2; }
DA_HD constexpr int acc_elem(int q, int j) { return 2 * (q % 2) + j; }

}  // namespace frag
}  // namespace distattn
