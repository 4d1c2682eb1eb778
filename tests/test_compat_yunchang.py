"""distattn.compat.yunchang on a gloo world of 4 (USP 2 x 2): the three ring impls, causal and
not, the qkv-packed module and UlyssesAttention vs fp64 dense attention (out, dq, dk, dv at
1e-10), and EXTRACT_FUNC_DICT's shards against yunchang's rule written out by hand."""
from __future__ import annotations

from compat_cases import run_yunchang
from spawn import run_world


def test_usp_2x2_matches_dense_reference():
    for rank, res in enumerate(run_world(4, run_yunchang)):
        for name, r in res.items():
            if isinstance(r, dict):
                assert max(r.values()) <= 1e-10, (rank, name, r)
            else:
                assert r is True, (rank, name)
