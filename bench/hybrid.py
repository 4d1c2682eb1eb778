"""What a sequence-mixer layer (Mamba2, Gated DeltaNet, short conv) costs under SP: the gathered
form distattn runs today against the two alternatives, per layer, vs P and S.

Rows, per (P, S) and mixer:

- ``gather`` (implemented, ``distattn.mixers.gather``): bytes each rank sends, **measured** by
  wrapping torch.distributed (``count_sent_bytes``) around one forward + backward of a gathered
  layer on ``P`` CPU gloo processes, and checked against the formula: forward all-gather
  (P-1)/P S H of the layer input, backward all-reduce of the S x H input gradient (gloo's ring:
  2 (P-1)/P S H). Sequential steps: 1 forward, 1 backward. Compute per rank: the whole sequence.
- ``state pass`` (not implemented; a model): rank r waits for rank r-1's final state (Mamba2:
  heads x head_dim x state; GDN: heads x key_dim x value_dim; conv: (k-1) x channels) and
  sends its own, P-1 hops in sequence forward and backward. Compute per rank: S/P.
- ``all-to-all`` (not implemented; a model): Ulysses-style, heads split over the ranks, two
  all-to-alls of S/P x H forward (in and out) and two backward. Compute per rank: S/P, but P
  must divide the heads.

Writes ``hybrid.md`` / ``.csv`` to ``--out``. The modelled rows are labelled; only ``gather``
is measured.
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.distributed as dist

#: mixer -> (hidden size H, state elements per layer), tiny shapes of the mixer kinds
MIXERS = {
    "mamba2 (H=256, 8 heads x 32 x state 16)": (256, 8 * 32 * 16),
    "gated deltanet (H=256, 4 heads x 64 x 64)": (256, 4 * 64 * 64),
    "short conv (H=256, kernel 4)": (256, 3 * 256),
}


def _gather_bytes(rank: int, world: int, init: str, seq: int, hidden: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import distattn
    from distattn.inference import count_sent_bytes
    from distattn.mixers import gather_sequence, local_part

    mesh = distattn.SPMesh.build()
    x = torch.randn(1, seq // world, hidden, requires_grad=True)
    layer = torch.nn.Linear(hidden, hidden)       # stands for the mixer: token-wise is enough
    with count_sent_bytes() as wire:
        full = gather_sequence(x, mesh, "contiguous")
        local_part(layer(full), mesh, "contiguous").sum().backward()
    if rank == 0:
        queue.put(wire["bytes"])
    dist.destroy_process_group()


def measured_gather_bytes(world: int, seq: int, hidden: int) -> int:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    fd, init = tempfile.mkstemp(prefix="distattn_hybrid_")
    os.close(fd)
    os.unlink(init)
    procs = [ctx.Process(target=_gather_bytes, args=(r, world, init, seq, hidden, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    nbytes = queue.get(timeout=300)
    for p in procs:
        p.join()
    return nbytes


def rows(worlds, seqs, elem: int = 4):
    out, measured = [], {}
    for world in worlds:
        for seq in seqs:
            for mixer, (hidden, state) in MIXERS.items():
                if (world, seq, hidden) not in measured:
                    measured[world, seq, hidden] = measured_gather_bytes(world, seq, hidden)
                # count_sent_bytes counts an all-gather as input x (P-1) and an all-reduce
                # as its tensor: the formula in those terms
                formula = (seq // world) * hidden * elem * (world - 1) + seq * hidden * elem
                out.append(dict(P=world, S=seq, mixer=mixer, form="gather (measured)",
                                bytes=measured[world, seq, hidden], formula=formula, steps=2,
                                tokens_computed=seq))
                out.append(dict(P=world, S=seq, mixer=mixer, form="state pass (model)",
                                bytes=2 * state * elem, formula=2 * state * elem,
                                steps=2 * (world - 1), tokens_computed=seq // world))
                a2a = 4 * (seq // world) * hidden * elem * (world - 1) // world
                out.append(dict(P=world, S=seq, mixer=mixer, form="all-to-all (model)",
                                bytes=a2a, formula=a2a, steps=4, tokens_computed=seq // world))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--seqs", default="1024,4096")
    p.add_argument("--smoke", action="store_true", help="P 2, S 256: seconds, for the tests")
    p.add_argument("--out", default=common.DEFAULT_OUT)
    args = p.parse_args()
    worlds = [2] if args.smoke else [int(w) for w in args.worlds.split(",")]
    seqs = [256] if args.smoke else [int(s) for s in args.seqs.split(",")]
    table = rows(worlds, seqs)
    os.makedirs(args.out, exist_ok=True)
    head = ["P", "S", "mixer", "form", "bytes", "formula", "steps", "tokens_computed"]
    with open(os.path.join(args.out, "hybrid.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head)
        w.writeheader()
        w.writerows(table)
    lines = ["Per mixer layer and rank, forward + backward, fp32. bytes: sent by one rank "
             "(gather: measured on CPU gloo, count_sent_bytes; others: a model). steps: "
             "communication steps in sequence. tokens_computed: tokens the layer computes "
             "per rank.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join(f"{r[h]:,}" if isinstance(r[h], int) else str(r[h])
                                       for h in head) + " |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "hybrid.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
