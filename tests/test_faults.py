"""Faults and disagreeing ranks on 4 gloo ranks (USP 2 x 2, zigzag): every process ends, each
live rank with a distattn ValueError or RuntimeError that says what differed or which
collective was waiting, within the mesh timeout plus a few seconds (issue 13).

All scenarios run in one world (see fault_cases.py); rank 3 is the odd one out."""
import pytest

from fault_cases import LAST_RANK, SCENARIOS, TIMEOUT_S, run_ranks

WORLD = 4
LIVE = [r for r in range(WORLD) if r != LAST_RANK]
MARGIN_S = 5.0            # "the mesh timeout + a few seconds"
FAST_S = TIMEOUT_S / 2    # an error that needs no timeout comes well before it
DATA_PATH = ("ring step", "Ulysses all-to-all")   # the collectives of the attention itself

# scenario -> (ranks, exception type, words the message must all contain, words of which
# one must appear, at most seconds)
EXPECTED = {
    "check_causal": (range(WORLD), "ValueError",
                     ["'causal'", "dist_flash_attn", "ranks 0, 1, 2: True", "rank 3: False"],
                     (), FAST_S),
    "check_length": (range(WORLD), "ValueError",
                     ["'q'", "ranks 0, 1, 2: tensor(shape=(1, 4, 4, 8)",
                      "rank 3: tensor(shape=(1, 8, 4, 8)"], (), FAST_S),
    "check_local_error": (range(WORLD), "ValueError",
                          ["softmax_scale", "-1.0", "raised on rank 3"], (), FAST_S),
    "check_window": (range(WORLD), "ValueError",
                     ["'window'", "ranks 0, 1, 2: (3, 0)", "rank 3: (2, 0)"], (), FAST_S),
    "check_backward_skipped": (range(WORLD), "ValueError",
                               ["'requires_grad'", "rank 3: False"], (), FAST_S),
    "mask": (range(WORLD), "ValueError", ["padding masks", "raised on rank 3"], (), FAST_S),
    "documents": (range(WORLD), "ValueError",
                  ["'cu_seqlens'", "ranks 0, 1, 2: (0, 16)", "rank 3: (0, 5, 16)"], (), FAST_S),
    "length": (range(WORLD), "ValueError", ["'q'", "rank 3: tensor(shape=(1, 8, 4, 8)"], (),
               FAST_S),
    "length_steady": (LIVE, "CommunicationError", ["failed after waiting", "mesh timeout"],
                      DATA_PATH, TIMEOUT_S + MARGIN_S),
    "skip": (LIVE, "CommunicationError", ["failed after waiting", "skipped this call"],
             DATA_PATH, TIMEOUT_S + MARGIN_S),
    "skip_check": (LIVE, "CommunicationError",
                   ["DISTATTN_CHECK collective of dist_flash_attn", "over ranks [0, 1, 2, 3]"],
                   (), TIMEOUT_S + MARGIN_S),
    "die": (LIVE, "CommunicationError", ["died"], DATA_PATH, TIMEOUT_S + MARGIN_S),
}


@pytest.fixture(scope="module")
def outcomes():
    return run_ranks(WORLD, list(SCENARIOS), deadline_s=150)


def test_every_process_ends_and_how(outcomes):
    for rank, res in enumerate(outcomes):
        assert not res["killed"], f"rank {rank} still ran at the deadline: {res}"
        # rank 3 leaves through os._exit(17) in "die"; every other rank finishes its scenarios
        assert res["exitcode"] == (17 if rank == LAST_RANK else 0), (rank, res["exitcode"])
        ran = set(SCENARIOS) - ({"die"} if rank == LAST_RANK else set())
        assert ran <= set(res), f"rank {rank} did not report {sorted(ran - set(res))}"
    assert "die" not in outcomes[LAST_RANK]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_raises_clearly_in_time(outcomes, name):
    ranks, kind, words, any_of, limit = EXPECTED[name]
    for rank in ranks:
        got = outcomes[rank][name]
        assert got["kind"] == kind, f"{name}, rank {rank}: {got}"
        msg = got.get("message", "")
        assert kind == "ValueError" or got["is_runtime"], f"{name}: not a RuntimeError"
        for w in words:
            assert w in msg, f"{name}, rank {rank}: message lacks {w!r}: {msg}"
        assert not any_of or any(w in msg for w in any_of), \
            f"{name}, rank {rank}: message names none of {any_of}: {msg}"
        assert got["seconds"] <= limit, f"{name}, rank {rank}: {got['seconds']:.1f} s > {limit}"


def test_timeouts_reach_the_waits(outcomes):
    """A rank that changed its arguments alone waits in the agreement, and the others in the
    attention's first exchange, each for the mesh timeout (not the default group's 60 s)."""
    odd = outcomes[LAST_RANK]["length_steady"]
    assert odd["kind"] == "CommunicationError"
    assert "agreement on the arguments of dist_flash_attn" in odd["message"]
    for name in ("length_steady", "skip", "skip_check"):
        for rank in LIVE:
            assert outcomes[rank][name]["seconds"] >= TIMEOUT_S * 0.9, (name, rank)
    for name in ("skip", "skip_check"):
        assert outcomes[LAST_RANK][name] == {"kind": "ok", "value": "skipped",
                                             "seconds": outcomes[LAST_RANK][name]["seconds"]}


def test_mesh_timeouts(outcomes):
    """[mesh.timeout, control, Ulysses, ring group timeouts] in seconds: the explicit one,
    else the default group's (60 s here), for build and from_device_mesh alike."""
    for res in outcomes:
        t = res["timeouts"]["value"]
        assert t["explicit"] == [TIMEOUT_S] * 4
        assert t["inherited"] == [60.0] * 4
        assert t["device_mesh"] == [60.0] * 4      # DeviceMesh's own groups have 30 min
        assert t["device_mesh_short"] == [9.0] * 4
        assert t["ring"] == [7.0] * 3              # U = 1: no Ulysses group
        assert t["own_control_group"]
        assert t["shape"] == [1, 4, 4, 8]
        assert "timeout must be a positive datetime.timedelta" in t["bad_timeout"]
        assert "got 5" in t["bad_timeout"]


def test_check_variable_and_canonical_text(monkeypatch):
    import torch

    from distattn.agree import canonical, check_enabled

    for value, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("DISTATTN_CHECK", value)
        assert check_enabled() is on
    monkeypatch.setenv("DISTATTN_CHECK", "maybe")
    with pytest.raises(ValueError, match="DISTATTN_CHECK='maybe'"):
        check_enabled()
    # tensors compare by shape, dtype and device type, never by data
    assert canonical(torch.zeros(2, 3)) == canonical(torch.ones(2, 3))
    assert canonical(torch.zeros(2, 3)) != canonical(torch.zeros(3, 2))
    assert canonical(torch.zeros(2, dtype=torch.float64)) != canonical(torch.zeros(2))
    assert canonical({"b": (1, 2.5), "a": None}) == canonical({"a": None, "b": (1, 2.5)})
    assert canonical(0.1) != canonical(0.1 + 1e-17 * 10)
    with pytest.raises(TypeError, match="cannot compare a object"):
        canonical(object())
