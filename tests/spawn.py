"""Run a function on a real multi-process torch.distributed group (gloo, CPU) and collect
each rank's return value. Used by the distributed tests: one world per call, many cases
inside it, results asserted in the pytest process.

Ranks are forked from a fork server that imported torch (and transformers, where installed)
once for the whole session: a fresh interpreter per rank spent ~3 s of CPU importing them,
which made up most of the suite's time on 2 cores. Each rank is still a fresh process for
the test's own state: it takes the pytest process's environment as it is at the call,
before the function and its arguments (and so the test module and distattn, which read
some variables at import) are unpickled.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, env: dict, call: bytes, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        fn, args = pickle.loads(call)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        result = fn(rank, world, *args)
        # as bytes: a tensor put on the queue as itself travels by a file descriptor that
        # this process must still serve when the parent unpickles it -- it may have exited
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure to the parent, whatever it is
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_PRELOAD = ["torch", "torch.distributed", "transformers"]   # a missing one is skipped


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_world(world: int, fn, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return the per-rank results.
    Raises RuntimeError with the worker's traceback if any rank fails, or on timeout."""
    ctx = _context()
    queue = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="distattn_pg_")
    os.close(fd)
    os.unlink(init_file)  # the FileStore creates it
    call, env = pickle.dumps((fn, args)), dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, env, call, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # other ranks may now hang in a collective; stop waiting for them
    except Exception as exc:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout}s waiting for ranks "
                      f"{sorted(set(range(world)) - set(results))}: {exc!r}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join()
        if os.path.exists(init_file):
            os.unlink(init_file)
    if errors:
        raise RuntimeError("distributed worker failed: " + "\n".join(errors))
    return [results[r] for r in range(world)]
