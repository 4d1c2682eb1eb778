"""Generate from a long prompt with its KV cache sharded over the ranks of an SP group.

A stock transformers ``LlamaForCausalLM`` (built from a config, random weights: nothing is
downloaded) generates greedily from a long prompt twice: once in one process with
``model.generate``, once with ``dtf.generate`` over the SP group, where each rank runs its
share of the prompt and keeps the K/V of its own tokens. Printed: prefill tokens/s, decode
ms/token and KV-cache memory per rank for both, and the checks of ``checks`` (tokens equal,
cache length per rank and in total, the prompt prefilled once); ``--check`` exits 1 if one
fails.

    python examples/generate.py                          # 4 CPU processes over gloo
    python examples/generate.py --nproc 4 --ulysses 2 --prompt-len 8192
    torchrun --nproc-per-node 8 examples/generate.py --prompt-len 131072 --dtype bf16

Timing: a streamer records when each token comes out. Prefill = prompt in -> first new
token (all of the prompt, plus the first decode step); decode = the mean interval between
the following tokens. The one-process run goes first, alone (spawn: in the launching process;
torchrun: on rank 0's device while the others wait), on one device like one SP rank's (on
CPU: the same number of threads, cores / ranks). CPU times say little about GPUs. The cache
memory is exact: K/V bytes held and allocated (``ShardedCache.sharded.nbytes()`` per rank,
which grows its buffers by a quarter when full; the ``DynamicCache`` tensors for one process).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distattn  # noqa: E402
from distattn.integrations import hf, transformers as dtf  # noqa: E402


class TokenClock:
    """A transformers streamer that records the time of every ``put`` (the prompt first, then
    each new token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def summary(self, start: float, prompt_len: int) -> tuple[float, float]:
        """(prefill tokens/s, decode ms/token) from the recorded times."""
        first, rest = self.times[1], self.times[1:]
        decode = (rest[-1] - rest[0]) / max(len(rest) - 1, 1) * 1e3
        return prompt_len / (first - start), decode


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.prompt_len + args.new_tokens,
                      tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def timed_generate(fn, ids, device, **kwargs):
    """(ids, prefill tok/s, decode ms/token) of ``fn(ids, streamer=..., **kwargs)``."""
    clock = TokenClock()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(ids, streamer=clock, **kwargs)
    tok_s, ms = clock.summary(start, ids.shape[1])
    return out, tok_s, ms


def one_process(args, model, ids, device):
    """model.generate on one device: (ids, prefill tok/s, decode ms/token, cache MiB)."""
    out, tok_s, ms = timed_generate(model.generate, ids, device, max_new_tokens=args.new_tokens,
                                    do_sample=False, return_dict_in_generate=True)
    cache = hf.output_cache(out)
    mib = sum(t.numel() * t.element_size() for layer in cache.layers
              for t in (layer.keys, layer.values)) / 2**20
    return out.sequences, tok_s, ms, mib


def setup(args, device, world):
    """(model, prompt ids, short warm-up ids): the same in every process."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build_model(args, device, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    return model, ids, ids[:, :max(2 * world, 16)]


def reference(args, device, world):
    """The one-process run (after an untimed warm-up): (ids, tok/s, ms/token, cache MiB). On
    CPU it gets the threads of one SP rank: one rank against one device of the same size."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(world))
    model, ids, warm = setup(args, device, world)
    model.generate(warm, max_new_tokens=2, do_sample=False)
    return one_process(args, model, ids, device)


def run(args, ref=None) -> int:
    """One SP rank. ``ref``: the one-process result when the launcher computed it already."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ref is None and rank == 0 and not args.skip_reference:   # torchrun: rank 0 does it
        ref = reference(args, device, world)
    dist.barrier()
    model, ids, warm = setup(args, device, world)
    mesh = distattn.SPMesh.build(ulysses_degree=args.ulysses)
    dtf.generate(model, warm, mesh, max_new_tokens=2, do_sample=False, layout=args.layout)
    cache = dtf.sharded_cache(mesh, model.config, layout=args.layout)
    out, tok_s, ms = timed_generate(
        lambda x, **kw: dtf.generate(model, x, mesh, past_key_values=cache, **kw), ids, device,
        max_new_tokens=args.new_tokens, do_sample=False)
    stats = {"rank": rank, "tok_s": tok_s, "ms": ms, "tokens": cache.sharded.local_len,
             "cached": cache.sharded.seq_len, "work": dict(cache.sharded.work),
             "used": cache.sharded.nbytes(used=True) / 2**20,
             "mib": cache.sharded.nbytes() / 2**20}
    gathered = [None] * world
    dist.all_gather_object(gathered, stats)
    if rank != 0:
        return 0
    print(f"distattn generate: {world} ranks ({dist.get_backend()}, {device.type}), mesh "
          f"{mesh}, layout {args.layout}, {str(model.dtype).replace('torch.', '')}\n"
          f"model: Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads}; prompt {args.batch} x {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens (greedy)")
    print(f"{'':<14s}{'prefill tok/s':>14s}{'decode ms/tok':>15s}{'cache tokens':>14s}"
          f"{'cache MiB used':>16s}{'allocated':>11s}")
    if ref is not None:
        print(f"{'one process':<14s}{ref[1]:>14,.0f}{ref[2]:>15.2f}"
              f"{ref[0].shape[1] - 1:>14d}{ref[3]:>16.2f}{ref[3]:>11.2f}")
    for s in gathered:
        print(f"{'SP rank ' + str(s['rank']):<14s}{s['tok_s']:>14,.0f}{s['ms']:>15.2f}"
              f"{s['tokens']:>14d}{s['used']:>16.2f}{s['mib']:>11.2f}")
    failed = [name for name, ok in checks(args, out, gathered, ref) if not ok]
    if failed:
        print(f"check FAILED: {', '.join(failed)}")
    return 1 if args.check and failed else 0


def checks(args, out, gathered, ref) -> list[tuple[str, bool]]:
    """What can be wrong, each printed with its numbers: (name, ok) pairs.

    - the tokens equal one-process ``model.generate`` (when it ran);
    - the cache holds prompt + generated - 1 tokens (the last new token is never fed back) on
      every rank, each token on exactly one rank, none holding more than its share + 1;
    - prefill work: the prompt, all but its last token, was prefilled once, sharded (the
      ranks' sharded queries add up to it), and every replicated step (one per generated
      token) fed exactly one token: nothing was re-fed."""
    world, prompt = len(gathered), args.prompt_len
    generated = out.shape[1] - prompt
    expected = prompt + generated - 1
    held = [s["tokens"] for s in gathered]
    sharded = sum(s["work"]["sharded_queries"] for s in gathered)
    replicated = [(s["work"]["replicated_queries"], s["work"]["replicated_steps"])
                  for s in gathered]
    result = []

    def report(name, ok, detail):
        print(f"{name + ':':<28s}{'yes' if ok else 'NO '}  ({detail})")
        result.append((name, ok))

    if ref is not None:
        same = torch.equal(out.cpu(), ref[0].cpu())
        agree = (out.cpu() == ref[0].cpu())[:, prompt:].float().mean().item()
        report("tokens identical", same, f"{agree:.0%} of new tokens agree with one process")
    report("cache length", all(s["cached"] == expected for s in gathered) and sum(held) ==
           expected, f"{[s['cached'] for s in gathered]} cached, {sum(held)} held in all; "
           f"expected {prompt} + {generated} - 1 = {expected}")
    report("cache per rank", max(held) <= -(-expected // world) + 1,
           f"{held} tokens per rank, share {expected / world:.1f}")
    report("prompt prefilled once", sharded == prompt - 1,
           f"{sharded} queries in sharded steps over all ranks, prompt - 1 = {prompt - 1}")
    report("one token per decode step", all(q == n == generated for q, n in replicated),
           f"(queries, steps) per rank {sorted(set(replicated))}, {generated} generated")
    return result


# ---------------------------------------------------------------------------------------------
# launching: torchrun, or spawn local processes
# ---------------------------------------------------------------------------------------------
def _spawned(rank, world, port, args, ref, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(cpu_threads(world))
    try:
        results[rank] = run(args, ref)
    finally:
        dist.destroy_process_group()


def cpu_threads(world: int) -> int:
    """Threads per CPU process: the machine's cores shared by ``world`` processes."""
    return max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="CPU processes to spawn (no torchrun)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree inside the SP group")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "stripe"])
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp64"], default=None,
                   help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true",
                   help="no one-process run (for prompts one device cannot hold)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the tokens equal the one-process ones, the cache holds "
                        "prompt + generated - 1 tokens spread over the ranks, and the prompt "
                        "was prefilled once, sharded")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            return run(args)
        finally:
            dist.destroy_process_group()
    import torch.multiprocessing as mp
    # the one-process run first, alone on the machine (not next to waiting ranks)
    ref = None if args.skip_reference else reference(args, torch.device("cpu"), args.nproc)
    # ranks forked from a server that imported torch and transformers once, not a fresh
    # interpreter each (seconds of imports per rank)
    mp.set_forkserver_preload(["torch", "transformers"])
    results = mp.get_context("forkserver").Manager().dict()
    mp.start_processes(_spawned, args=(args.nproc, _free_port(), args, ref, results),
                       nprocs=args.nproc, join=True, start_method="forkserver")
    return max(results.values(), default=1)


if __name__ == "__main__":
    sys.exit(main())
