"""The test harness itself (tests/spawn.py): a failing world reports every rank's failure,
and only gloo's connection-setup failure makes it run once more."""
import os

import pytest

from spawn import _TRANSPORT_SETUP_FLAKE, run_world


def _every_rank_fails(rank, world):
    raise ValueError(f"rank {rank} fails")


def _setup_fails(rank, world, marker, times):
    """Fails like gloo's connection setup on the first ``times`` runs of the world (counted
    by rank 0 in ``marker``), then returns the rank."""
    runs = int(open(marker).read()) if os.path.exists(marker) else 0
    if runs < times:
        if rank == 0:
            with open(marker, "w") as f:
                f.write(str(runs + 1))
        raise RuntimeError(f"{_TRANSPORT_SETUP_FLAKE} with [...] Connection closed by peer")
    return rank


def test_a_failing_world_reports_every_rank():
    with pytest.raises(RuntimeError) as info:
        run_world(2, _every_rank_fails)
    assert "rank 0 fails" in str(info.value) and "rank 1 fails" in str(info.value)


def test_a_connection_setup_failure_runs_the_world_once_more(tmp_path):
    with pytest.warns(UserWarning, match="connection setup failed"):
        assert run_world(2, _setup_fails, str(tmp_path / "once"), 1) == [0, 1]
    with pytest.warns(UserWarning, match="connection setup failed"), \
            pytest.raises(RuntimeError, match=_TRANSPORT_SETUP_FLAKE):   # twice: it raises
        run_world(2, _setup_fails, str(tmp_path / "twice"), 2)
