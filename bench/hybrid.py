"""What a sequence-mixer layer (Mamba2, Gated DeltaNet, short conv) costs under SP: the two
forms distattn runs against a third, per layer, vs P and S.

Rows, per (P, S) and mixer:

- ``gather`` (``distattn.mixers.gather``; zigzag/stripe, padding, Jamba): bytes each rank
  sends, **measured** by wrapping torch.distributed (``count_sent_bytes``) around one
  forward + backward of a gathered layer on ``P`` CPU gloo processes, and checked against
  the formula: forward all-gather (P-1)/P S H of the layer input, backward all-reduce of the
  S x H input gradient. Compute per rank: the whole sequence.
- ``state pass`` (``distattn.mixers.passing``; contiguous): **measured** the same way on a
  layer that hands its state down the ranks (``receive_from_previous`` / ``send_to_next``;
  the short conv: ``exchange_halo`` of k - 1 inputs): the most any rank sends, against the
  formula (the state forward with its header, the state's gradient backward). A recurrent
  layer is a chain: rank r starts when rank r-1 has finished, so its critical path holds
  all S tokens (P x S/P, in sequence) while each rank computes S/P; the conv halo is
  exchanged by all ranks at once.
- ``all-to-all`` (not implemented; a model): Ulysses-style, heads split over the ranks, two
  all-to-alls of S/P x H forward (in and out) and two backward. Compute per rank: S/P, but P
  must divide the heads.

``critical_tokens``: tokens of this layer computed one after another across the group (the
latency in units of one token's work). Writes ``hybrid.md`` / ``.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile

import common  # (also puts the repository root on sys.path)
import torch
import torch.distributed as dist

#: mixer -> (hidden size H, state elements per layer), tiny shapes of the mixer kinds
MIXERS = {
    "mamba2 (H=256, 8 heads x 32 x state 16)": (256, 8 * 32 * 16),
    "gated deltanet (H=256, 4 heads x 64 x 64)": (256, 4 * 64 * 64),
    "short conv (H=256, kernel 4)": (256, 3 * 256),
}


HEADER_BYTES = 9 * 8     # passing.py: one int64 header per state slot (presence, dtype, shape)


def _measure(rank: int, world: int, init: str, seq: int, hidden: int, state: int, form: str,
             queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import distattn
    from distattn.inference import count_sent_bytes
    from distattn.mixers import gather_sequence, local_part
    from distattn.mixers.passing import exchange_halo, receive_from_previous, send_to_next

    mesh = distattn.SPMesh.build()
    x = torch.randn(1, seq // world, hidden, requires_grad=True)
    layer = torch.nn.Linear(hidden, hidden)       # stands for the mixer: token-wise is enough
    with count_sent_bytes() as wire:
        if form == "gather":
            full = gather_sequence(x, mesh, "contiguous")
            local_part(layer(full), mesh, "contiguous").sum().backward()
        elif form == "halo":                      # state = (k - 1) x hidden conv inputs
            tail = x[:, -(state // hidden):]
            halo = exchange_halo(tail, mesh)
            (layer(x).sum() + halo.sum()).backward()
        else:                                     # a recurrent state of `state` elements
            (prev,) = receive_from_previous(x, 1, mesh)
            final = x.sum() * torch.ones(state) + (0 if prev is None else prev)
            out = layer(x) + final.sum()          # the output depends on the state, as a scan's
            send_to_next(out, [final], mesh).sum().backward()
    queue.put((rank, wire["bytes"]))
    dist.destroy_process_group()


def measured_bytes(world: int, seq: int, hidden: int, state: int, form: str) -> int:
    """The most bytes any rank sends for one forward + backward of ``form``."""
    ctx = common.process_context()
    queue = ctx.Queue()
    fd, init = tempfile.mkstemp(prefix="distattn_hybrid_")
    os.close(fd)
    os.unlink(init)
    procs = [ctx.Process(target=_measure, args=(r, world, init, seq, hidden, state, form,
                                                queue)) for r in range(world)]
    for p in procs:
        p.start()
    sent = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return max(sent.values())


def rows(worlds, seqs, elem: int = 4):
    out, gathered = [], {}
    for world in worlds:
        for seq in seqs:
            for mixer, (hidden, state) in MIXERS.items():
                if (world, seq, hidden) not in gathered:
                    gathered[world, seq, hidden] = measured_bytes(world, seq, hidden, 0,
                                                                  "gather")
                # count_sent_bytes counts an all-gather as input x (P-1) and an all-reduce
                # as its tensor: the formula in those terms
                formula = (seq // world) * hidden * elem * (world - 1) + seq * hidden * elem
                out.append(dict(P=world, S=seq, mixer=mixer, form="gather (measured)",
                                bytes=gathered[world, seq, hidden], formula=formula, steps=2,
                                tokens_computed=seq, critical_tokens=seq))
                conv = mixer.startswith("short conv")
                passed = measured_bytes(world, seq, hidden, state, "halo" if conv else "chain")
                # a middle rank: its tail / state forward (a chain adds its header) and the
                # gradient of what it received backward; with 2 ranks, each sends one way
                header = 0 if conv else HEADER_BYTES
                formula = (state * elem + header if world == 2
                           else 2 * state * elem + header)
                out.append(dict(P=world, S=seq, mixer=mixer, form="state pass (measured)",
                                bytes=passed, formula=formula,
                                steps=2 if conv else 2 * (world - 1),
                                tokens_computed=seq // world,
                                critical_tokens=seq // world if conv else seq))
                a2a = 4 * (seq // world) * hidden * elem * (world - 1) // world
                out.append(dict(P=world, S=seq, mixer=mixer, form="all-to-all (model)",
                                bytes=a2a, formula=a2a, steps=4, tokens_computed=seq // world,
                                critical_tokens=seq // world))
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
    head = ["P", "S", "mixer", "form", "bytes", "formula", "steps", "tokens_computed",
            "critical_tokens"]
    with open(os.path.join(args.out, "hybrid.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head)
        w.writeheader()
        w.writerows(table)
    lines = ["Per mixer layer and rank, forward + backward, fp32. bytes: sent by one rank "
             "(measured on CPU gloo with count_sent_bytes, the most any rank sends, where "
             "marked; otherwise a model). steps: communication steps in sequence. "
             "tokens_computed: tokens the layer computes per rank. critical_tokens: tokens "
             "computed one after another across the group.", "", "| " + " | ".join(head) + " |",
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
