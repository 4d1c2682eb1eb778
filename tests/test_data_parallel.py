"""docs/TRAINING.md's DDP and FSDP2 recipe over a (dp, sp) DeviceMesh, on 4 gloo ranks.

The world is a (dp=2, sp=2) DeviceMesh; the SP mesh comes from its "sp" dimension (a ring of
2, zigzag). A tiny fp64 Llama trains 2 SGD steps with the recipe's lines: the data-parallel
replica d takes its own rows of each step's global batch (its two SP ranks the same rows),
``dtf.shard_batch``, ``dtf.sp_loss``, ``(loss * mesh.size).backward()``, the wrapper averaging
over every rank. Wrappers: DDP over all ranks, FSDP2 (``fully_shard``) over a 1-D mesh of all
ranks, and FSDP2 over the 2-D (dp, sp) mesh itself (HSDP: replicated over dp, sharded over
sp). The weights after the steps must equal one process training on the same batches (sdpa
attention -- eager takes its softmax in float32 --, each step's loss the mean over the replicas
of their token-mean losses, as data parallelism without SP gives) to 1e-10, on every rank.
"""
import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, build_model, rel_err

pytest.importorskip("transformers")

WORLD, DP, VOCAB, SEQ, ROWS, STEPS, LR, TOL = 4, 2, 101, 32, 2, 2, 0.1, 1e-10
WRAPPERS = ("ddp", "fsdp2", "hsdp")


def global_batch(step: int) -> torch.Tensor:
    """Step ``step``'s global batch: ROWS rows per data-parallel replica."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (DP * ROWS, SEQ), generator=g)


def run_cases(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import distattn
    from distattn.integrations import transformers as dtf

    device_mesh = init_device_mesh("cpu", (DP, world // DP), mesh_dim_names=("dp", "sp"))
    world_mesh = init_device_mesh("cpu", (world,))
    mesh = distattn.SPMesh.from_device_mesh(device_mesh, sp_dim="sp")
    name = dtf.register(mesh, layout="zigzag")
    dp_rank = device_mesh.get_local_rank("dp")
    results = {}
    for wrapper in WRAPPERS:
        model = build_model("llama").double()
        model.set_attn_implementation(name)
        if wrapper == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            shard_mesh = world_mesh if wrapper == "fsdp2" else device_mesh
            for layer in model.model.layers:
                fully_shard(layer, mesh=shard_mesh)
            wrapped = fully_shard(model, mesh=shard_mesh)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            rows = global_batch(step)[dp_rank * ROWS:(dp_rank + 1) * ROWS]
            local = dtf.shard_batch({"input_ids": rows}, mesh, layout="zigzag")
            out = wrapped(**{k: v for k, v in local.items() if k != "shift_labels"},
                          use_cache=False)
            loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
            (loss * mesh.size).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().clone())
        weights = {}
        for pname, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[pname] = full.detach().clone()
        results[wrapper] = {"weights": weights, "losses": losses}
        dist.barrier()
    results["dp_rank"] = dp_rank
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def reference():
    model = build_model("llama").double()
    model.set_attn_implementation("sdpa")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step)
        per_replica = [model(input_ids=ids[d * ROWS:(d + 1) * ROWS], labels=ids[d * ROWS:(d + 1)
                                                                                 * ROWS],
                             use_cache=False).loss for d in range(DP)]
        losses.append([l.detach() for l in per_replica])
        (sum(per_replica) / DP).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return initial, losses, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_recipe_trains_like_one_process(world_results, reference, wrapper):
    initial, ref_losses, ref_weights = reference
    for rank, r in enumerate(world_results):
        for step, loss in enumerate(r[wrapper]["losses"]):
            ref = ref_losses[step][r["dp_rank"]]
            assert rel_err(loss.double(), ref) <= 1e-6, (rank, step, loss, ref)  # fp32 loss
        for name, w in r[wrapper]["weights"].items():
            change, ref_change = w - initial[name], ref_weights[name] - initial[name]
            assert ref_change.abs().max() > 0, name
            err = rel_err(change, ref_change)
            assert err <= TOL, f"rank {rank} {name}: relative error of the change {err:.2e}"
