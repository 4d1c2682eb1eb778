"""Train a small Llama-architecture model with sequence parallelism (distattn's main job).

Every rank of a sequence-parallel (SP) group holds a slice of each training sequence; the
model is a stock transformers ``LlamaForCausalLM`` built from a config (nothing is
downloaded) whose attention is distattn's. Data: a corpus this script writes itself, read
byte by byte (a 256-symbol tokenizer). Each paragraph of the corpus is followed by a copy of
itself, so much of the text can only be predicted by attending far back, across shards.

    python examples/train.py                      # 4 CPU processes over gloo (or all GPUs)
    python examples/train.py --nproc 2 --ulysses 2 --checkpoint remat
    torchrun --nproc-per-node 8 examples/train.py --ulysses 2 --seq-len 16384
    python examples/train.py --check              # 20 steps, compared with a one-process model
    python examples/train.py --packed --layout packed --check   # packed documents

With ``--packed`` each step packs documents of varied lengths (``--docs``) into one row of
``batch-size x seq-len`` tokens, as transformers' DataCollatorWithFlattening does: position
ids restart at every document, labels are -100 at document starts, and no token attends
across documents (the row takes any length; the layout pads what it needs).

With ``--check``, rank 0 also runs an ordinary single-process copy of the model on the full
sequences (transformers' own attention and loss) at the same weights every step, prints the
loss and gradient differences and exits non-zero when they exceed the tolerance.

Gradients: ``dtf.sp_loss`` gives each rank its share of the gradient; DDP spans every rank
and averages, so the loss is scaled by the SP size before backward (see docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distattn  # noqa: E402
from distattn.integrations import hf, transformers as dtf  # noqa: E402
from distattn.layout import seq_multiple  # noqa: E402

VOCAB = 256  # bytes


# ---------------------------------------------------------------------------------------------
# data: a generated corpus and a byte tokenizer
# ---------------------------------------------------------------------------------------------
_SUBJECTS = ["the ring", "every rank", "the query block", "a key", "the zigzag layout",
             "the helper schedule", "the all-to-all", "each head", "the softmax", "the model",
             "the long sequence", "a value block", "the merge step", "the gradient"]
_VERBS = ["sends", "receives", "merges", "balances", "splits", "gathers", "attends to",
          "rescales", "overlaps", "accumulates", "recomputes", "keeps"]
_OBJECTS = ["the next chunk", "two partial results", "its own tokens", "the running maximum",
            "a block of keys", "the causal mask", "half of the heads", "the output",
            "the log-sum-exp", "the previous rank", "every position", "the last token"]
_TAILS = ["", " in float32", " without a host sync", " one hop at a time", " exactly once",
          " before the next step", " across the group", " on the diagonal"]


def make_corpus(n_bytes: int, seed: int = 0) -> bytes:
    """Deterministic text: paragraphs of generated sentences, each followed by
    'once more:' and a verbatim copy of itself."""
    rng = random.Random(seed)
    parts, size, number = [], 0, 1
    while size < n_bytes:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                 f"{rng.choice(_TAILS)}.")
            sentences.append(s[0].upper() + s[1:])
        para = " ".join(sentences)
        block = f"[{number}] {para}\nonce more: {para}\n\n"
        parts.append(block)
        size += len(block)
        number += 1
    return "".join(parts).encode("ascii")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def document_lengths(spec: str, total: int, rng: random.Random) -> list[int]:
    """Lengths of the documents of one packed row of ``total`` tokens: ``spec`` "mix" draws a
    long-tailed mix (many short documents, a few up to a quarter of the row); a list like
    "100,700,30" repeats those lengths. The last document is cut to fit."""
    lens = []
    while sum(lens) < total:
        if spec == "mix":
            lens.append(max(2, int(math.exp(rng.uniform(math.log(8), math.log(total / 4))))))
        else:
            lens.append(int(spec.split(",")[len(lens) % len(spec.split(","))]))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def packed_batches(corpus: torch.Tensor, total: int, spec: str, seed: int):
    """Endless packed rows: (input_ids [1, total], labels, position_ids, document lengths).
    Each document is its own random window of the corpus."""
    rng = random.Random(seed)
    while True:
        lens = document_lengths(spec, total, rng)
        docs = [corpus[s:s + n] for n in lens
                for s in [rng.randrange(0, corpus.numel() - n)]]
        ids = torch.cat(docs).unsqueeze(0)
        labels = ids.clone()
        starts = torch.tensor([0] + lens).cumsum(0)[:-1]
        labels[0, starts] = -100          # nothing predicts a document's first token
        pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
        yield ids, labels, pos, lens


def batches(corpus: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Endless random windows of the corpus ([batch, seq_len] int64), the same sequence on
    every rank that passes the same seed."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, corpus.numel() - seq_len, (batch,), generator=g)
        yield torch.stack([corpus[s:s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------
# model and reporting
# ---------------------------------------------------------------------------------------------
def build_model(args, attn_implementation: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
                      rope_theta=10000.0, tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=dtype).train()


def peak_memory_mb(device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPUs, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress(step: int, total: int, loss: float, tok_s: float, mem: float, width: int = 24) -> str:
    done = int(width * step / total)
    return (f"[{'#' * done}{'.' * (width - done)}] {step:>4}/{total}  loss {loss:6.3f}  "
            f"{tok_s:10,.0f} tok/s  peak {mem:8.1f} MiB")


def lr_at(step: int, args) -> float:
    warm = max(1, args.steps // 10)
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------
def train(args) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or
                                                            ("bf16" if device.type == "cuda" else "fp32")]
    sp = args.sp or world
    if world % sp:
        raise SystemExit(f"--sp {sp} must divide the world size {world}")
    if sp % args.ulysses:
        raise SystemExit(f"--ulysses {args.ulysses} must divide the SP size {sp}")
    if args.layout == "packed" and not args.packed:
        raise SystemExit("--layout packed places documents: add --packed")
    if args.docs != "mix" and not args.packed:
        raise SystemExit("--docs describes packed documents: add --packed")
    if not args.packed:
        multiple = seq_multiple(args.layout, sp // args.ulysses, args.ulysses)
        if args.seq_len % multiple:
            raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of {multiple} for "
                             f"layout {args.layout} over {args.ulysses} x {sp // args.ulysses} "
                             f"(or use --packed: a packed row takes any length)")
    if args.check and sp != world:
        raise SystemExit("--check compares one SP group with one process: use --sp = world")

    # SP groups are consecutive ranks; data-parallel replicas are the SP groups.
    dp_rank, sp_group = rank // sp, None
    for g in range(world // sp):
        grp = dist.new_group(list(range(g * sp, (g + 1) * sp)))
        if g == dp_rank:
            sp_group = grp
    mesh = distattn.SPMesh.build(ulysses_degree=args.ulysses, group=sp_group)
    name = dtf.register(mesh, layout=args.layout)
    model = build_model(args, name, device, dtype)
    if args.checkpoint == "remat":
        dtf.checkpoint_layers(model)
    elif args.checkpoint == "torch":
        hf.plain_checkpointing(model)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    corpus = torch.tensor(list(make_corpus(args.corpus_bytes, seed=args.seed)), dtype=torch.long)
    row_tokens = args.batch_size * args.seq_len
    data = (packed_batches(corpus, row_tokens, args.docs, seed=args.seed + 1 + dp_rank)
            if args.packed else batches(corpus, args.batch_size, args.seq_len,
                                        seed=args.seed + 1 + dp_rank))

    ref = ref_opt = None
    if args.check and rank == 0:
        ref = build_model(args, "sdpa", device, dtype)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"distattn train: {world} ranks ({dist.get_backend()}, {device.type}), "
              f"{world // sp} data-parallel x SP {mesh}, layout {args.layout}, "
              f"checkpoint {args.checkpoint}, {str(dtype).replace('torch.', '')}\n"
              f"model: Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
              f"{args.kv_heads} (GQA), {n_params / 1e6:.2f} M parameters; "
              + (f"packed rows of {row_tokens} tokens (documents: {args.docs})"
                 if args.packed else f"batch {args.batch_size} x {args.seq_len} tokens, "
                                     f"{args.seq_len // sp} per rank"),
              flush=True)

    tty = sys.stdout.isatty()
    tokens_per_step = args.batch_size * args.seq_len * (world // sp)
    losses, check_worst = [], {"loss": 0.0, "grad": 0.0}
    t_start = time.perf_counter()
    for step in range(args.steps):
        if args.packed:
            ids, labels, pos, lens = (t.to(device) if torch.is_tensor(t) else t
                                      for t in next(data))
            batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        else:
            ids = next(data).to(device)
            batch, lens = {"input_ids": ids}, None
        local = dtf.shard_batch(batch, mesh, layout=args.layout)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        # every key but shift_labels is a model input (packed rows: document boundaries too)
        out = ddp(**{k: v for k, v in local.items() if k != "shift_labels"}, use_cache=False)
        loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
        # DDP averages over all dp*sp ranks; sp_loss gradients must be summed over SP.
        (loss * mesh.size).backward()
        if ref is not None:
            check_worst = _check_step(step, model, ref, batch, lens, loss, check_worst)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if rank == 0 and (tty or (step + 1) % args.log_every == 0 or step + 1 == args.steps):
            tok_s = tokens_per_step * (step + 1) / (time.perf_counter() - t_start)
            line = progress(step + 1, args.steps, losses[-1], tok_s, peak_memory_mb(device))
            print(("\r" + line) if tty else line, end="" if tty and step + 1 < args.steps else "\n",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t_start

    stats = {"rank": rank, "tok_s": args.batch_size * (args.seq_len // sp) * args.steps / elapsed,
             "mem": peak_memory_mb(device)}
    gathered = [None] * world
    dist.all_gather_object(gathered, stats)
    status = 0
    if rank == 0:
        print(f"done: {args.steps} steps in {elapsed:.1f} s, loss {losses[0]:.3f} -> "
              f"{sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of last 5), "
              f"{tokens_per_step * args.steps / elapsed:,.0f} tokens/s overall")
        for s in gathered:
            print(f"  rank {s['rank']}: {s['tok_s']:10,.0f} local tokens/s, peak memory "
                  f"{s['mem']:8.1f} MiB ({'CUDA allocator' if device.type == 'cuda' else 'process RSS'})")
        if ref is not None:
            tol = CHECK_TOL[dtype]
            ok = check_worst["loss"] <= tol and check_worst["grad"] <= tol
            print(f"check: worst relative loss difference {check_worst['loss']:.2e}, worst "
                  f"relative gradient difference {check_worst['grad']:.2e} (tolerance {tol:g}): "
                  f"{'OK' if ok else 'FAILED'}")
            status = 0 if ok else 1
        if args.sample:
            print("sample (greedy):\n" + _sample(args, model, device, dtype))
    flag = torch.tensor([status], device=device)
    dist.broadcast(flag, 0)
    return int(flag.item())


CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _reference_loss(ref, batch, lens):
    """The single-process loss on the full batch; for a packed row, every document on its
    own (the token mean over all documents), which is what packing must reproduce."""
    ids = batch["input_ids"]
    if lens is None:
        return ref(input_ids=ids, labels=ids, use_cache=False).loss
    total, count, start = 0.0, 0, 0
    for n in lens:
        logits = ref(input_ids=ids[:, start:start + n], use_cache=False).logits[0, :-1]
        target = batch["labels"][0, start + 1:start + n]
        total = total + torch.nn.functional.cross_entropy(logits.float(), target,
                                                          ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
        start += n
    return total / count


def _check_step(step, model, ref, batch, lens, loss, worst):
    """Rank 0 only: the single-process model at the same weights, on the full batch."""
    ref.load_state_dict(model.state_dict())
    ref.zero_grad(set_to_none=True)
    ref_loss = _reference_loss(ref, batch, lens)
    ref_loss.backward()
    loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    # Gradient difference relative to the gradient's overall scale: tensors whose gradient is
    # nearly zero (q/k projections early in training) carry only rounding noise.
    diffs = torch.cat([(p.grad - q.grad).flatten() for p, q in zip(model.parameters(),
                                                                    ref.parameters())])
    ref_grads = torch.cat([q.grad.flatten() for q in ref.parameters()])
    grad_err = max((diffs.norm() / ref_grads.norm()).item(),
                   (diffs.abs().max() / ref_grads.abs().max()).item())
    print(f"  check step {step + 1}: loss {loss.item():.6f} vs {ref_loss.item():.6f} "
          f"(rel {loss_err:.1e}), relative gradient difference {grad_err:.1e}", flush=True)
    return {"loss": max(worst["loss"], loss_err), "grad": max(worst["grad"], grad_err)}


@torch.no_grad()
def _sample(args, model, device, dtype) -> str:
    """Greedy continuation, with a single-process copy of the trained weights, of a paragraph
    the model has never seen followed by 'once more:': copying it needs attention far back."""
    para = make_corpus(1, seed=10_000 + args.seed).decode().split("\nonce more: ")[0]
    prompt = para + "\nonce more: "
    ref = build_model(args, "sdpa", device, dtype).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.tensor([encode(prompt)], device=device)
    target = para.split("] ", 1)[1]
    for _ in range(len(target)):
        nxt = ref(input_ids=ids[:, -args.seq_len:], use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    got = decode(ids[0, len(encode(prompt)):].tolist())
    same = sum(a == b for a, b in zip(got, target)) / len(target)
    return f"{prompt}{got}\n  ({same:.0%} of the unseen paragraph copied correctly)"


# ---------------------------------------------------------------------------------------------
# launching: torchrun, or spawn local processes
# ---------------------------------------------------------------------------------------------
def _init_and_train(rank, world, port, args) -> int:
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.gloo
    if use_nccl:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_nccl else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def _spawned(rank, world, port, args):
    os.environ["LOCAL_RANK"] = str(rank)
    if _init_and_train(rank, world, port, args):
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to spawn when not under torchrun (default: the GPU count, "
                        "or 4 CPU processes)")
    p.add_argument("--sp", type=int, default=None, help="SP group size (default: all ranks)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree inside the SP group")
    p.add_argument("--layout", default="zigzag",
                   choices=["zigzag", "contiguous", "stripe", "packed"],
                   help="token layout; 'packed' (with --packed) keeps short documents whole")
    p.add_argument("--packed", action="store_true",
                   help="pack documents into one row of batch-size x seq-len tokens")
    p.add_argument("--docs", default="mix",
                   help="with --packed: 'mix' (long-tailed lengths) or lengths like 100,700,30")
    p.add_argument("--checkpoint", default="remat", choices=["none", "remat", "torch"],
                   help="activation checkpointing: rematerialization-aware, plain, or none")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: 200, or 20 with --check)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--corpus-bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample", type=int, default=1,
                   help="print a greedy sample at the end (0: no)")
    p.add_argument("--check", action="store_true",
                   help="compare every step with a single-process model; exit 1 if they differ")
    p.add_argument("--gloo", action="store_true", help="use CPU processes even with GPUs")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.check else 200
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # torchrun
        use_nccl = torch.cuda.is_available() and not args.gloo
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_nccl else "gloo")
        try:
            return train(args)
        finally:
            dist.destroy_process_group()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.gloo else 0
    world = args.nproc or (gpus if gpus else 4)
    if world == 1:
        return _init_and_train(0, 1, _free_port(), args)
    import torch.multiprocessing as mp
    # ranks forked from a server that imported torch and transformers once, not a fresh
    # interpreter each (seconds of imports per rank)
    mp.set_forkserver_preload(["torch", "transformers"])
    try:
        mp.start_processes(_spawned, args=(world, _free_port(), args), nprocs=world,
                           join=True, start_method="forkserver")
    except mp.ProcessExitedException as exc:
        print(f"train.py: a rank failed ({exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
