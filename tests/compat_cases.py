"""Worker side of the compat tests: every ring_flash_attn entry point on this rank's shard vs
an fp64 dense reference of the whole sequence (out, lse and dq/dk/dv). Shards are cut here by
hand from upstream's documented conventions, independently of distattn.shard."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from dist_cases import _rel, dense_attention, visibility


def _index(kind: str, S: int, P: int, r: int, cu=None) -> torch.Tensor:
    """Global tokens rank r holds under upstream's sharding ``kind``."""
    if kind == "contiguous":
        n = S // P
        return torch.arange(r * n, (r + 1) * n)
    if kind == "zigzag":
        c = S // (2 * P)
        return torch.cat([torch.arange(r * c, (r + 1) * c),
                          torch.arange((2 * P - 1 - r) * c, (2 * P - r) * c)])
    if kind == "stripe":
        return torch.arange(r, S, P)
    # per document: each document's own contiguous / zigzag split, in document order
    parts = [cu[d] + _index(kind[4:], cu[d + 1] - cu[d], P, r) for d in range(len(cu) - 1)]
    return torch.cat(parts)


def _data(key: str, S: int, hq: int, hkv: int, D: int = 8):
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    q = torch.randn(1, S, hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, S, hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, S, hkv, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, S, hq, D, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _check(key, call, kind, S, P, r, *, hq=4, hkv=2, causal=False, cu=None, window=None,
           softcap=0.0, pack="", varlen=False) -> dict:
    """Run ``call(q, k, v)`` (or packed) on rank r's shard; errors vs the dense reference."""
    q, k, v, dout = _data(key, S, hq, hkv)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ins, visibility(S, cu, causal, window), softcap=softcap)
    ref_grads = torch.autograd.grad(ref_out, ins, dout)
    idx = _index(kind, S, P, r, cu)
    loc = [t[:, idx].detach().clone() for t in (q, k, v, dout)]
    if varlen:
        loc = [t[0] for t in loc]
    ql, kl, vl, dl = loc
    sd = 1 if varlen else 2                          # where the packing dimension goes
    if pack == "qkv":
        qkv = torch.stack([ql, kl, vl], dim=sd).requires_grad_()
        out, lse, none = call(qkv)
        out.backward(dl)
        grads = qkv.grad.unbind(sd)
    elif pack == "kv":
        ql.requires_grad_()
        kv = torch.stack([kl, vl], dim=sd).requires_grad_()
        out, lse, none = call(ql, kv)
        out.backward(dl)
        grads = (ql.grad, *kv.grad.unbind(sd))
    else:
        for t in (ql, kl, vl):
            t.requires_grad_()
        out, lse, none = call(ql, kl, vl)
        out.backward(dl)
        grads = (ql.grad, kl.grad, vl.grad)
    exp_lse = ref_lse[:, :, idx]
    if varlen:
        exp_lse = exp_lse[0]
        grads = [g.unsqueeze(0) for g in grads]
        out = out.unsqueeze(0)
    errs = {"out": _rel(out, ref_out[:, idx]), "third_is_none": none is None}
    if lse is not None:                      # the hf attention function returns no lse
        errs["lse"] = _rel(lse, exp_lse)
    errs.update({n: _rel(g, rg[:, idx]) for n, g, rg in zip(("dq", "dk", "dv"), grads,
                                                              ref_grads)})
    return errs


def run_compat(rank: int, world: int, subset: bool = False) -> dict:
    """``subset`` (the big world): causal, unpacked zigzag, zigzag varlen and llama3 only."""
    import distattn.compat.ring_flash_attn as rfa
    from distattn.compat.ring_flash_attn.adapters import hf_adapter

    P, r, res = world, rank, {}
    S = 6 * P                                             # divides by 2P, odd chunks of 3
    fixed = {"contiguous": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn",
             "stripe": "stripe_flash_attn"}
    for kind, base in fixed.items():
        if subset and kind != "zigzag":
            continue
        for causal in (True,) if subset else (False, True):
            for pack in ("",) if subset else ("", "kv", "qkv"):
                name = f"{base}_{pack + 'packed_' if pack else ''}func"
                fn = getattr(rfa, name)
                hkv = 4 if pack == "qkv" else 2
                kw = dict(causal=causal, return_attn_probs=True)
                res[f"{name}-c{causal}"] = _check(name + str(causal), lambda *a: fn(*a, **kw),
                                                  kind, S, P, r, hkv=hkv, causal=causal,
                                                  pack=pack)
        if subset:
            continue
        # a global window and softcap (upstream: per block, no softcap)
        fn = getattr(rfa, f"{base}_func")
        kw = dict(causal=True, window_size=(P + 1, 0), softcap=3.0, return_attn_probs=True)
        res[f"{base}-window-softcap"] = _check(base + "w", lambda *a: fn(*a, **kw), kind, S, P,
                                               r, causal=True, window=(P + 1, 0), softcap=3.0)
    # per-document varlen: documents divisible by 2P, local cu_seqlens = global / P
    cu = (0, 2 * P, 2 * P + 6 * P, 2 * P + 6 * P + 4 * P)
    local_cu = torch.tensor(cu, dtype=torch.int32) // P
    for kind, base in (("doc_contiguous", "ring_flash_attn_varlen"),
                       ("doc_zigzag", "zigzag_ring_flash_attn_varlen"))[subset:]:
        for causal in (True,) if subset else (False, True):
            for pack in ("",) if subset else ("", "kv", "qkv"):
                name = f"{base}_{pack + 'packed_' if pack else ''}func"
                fn = getattr(rfa, name)
                hkv = 4 if pack == "qkv" else 1
                call = lambda *a: fn(*a, local_cu, 6, causal=causal, return_attn_probs=True)
                res[f"{name}-c{causal}"] = _check(name + str(causal), call, kind, cu[-1], P, r,
                                                  hkv=hkv, causal=causal, cu=cu, pack=pack,
                                                  varlen=True)
    # llama3: the packed row split contiguously, documents anywhere
    cu3 = (0, 1, 3 * P + 2, 5 * P, 7 * P - 1, 8 * P)
    for causal in (True,) if subset else (False, True):
        prep = rfa.llama3_flash_attn_prepare_cu_seqlens(torch.tensor(cu3, dtype=torch.int32),
                                                        causal, r, P)
        cu_q, cu_k, mq, mk, ks = prep
        for pack in ("",) if subset else ("", "kv", "qkv"):
            name = f"llama3_flash_attn_varlen_{pack + 'packed_' if pack else ''}func"
            fn = getattr(rfa, name)
            hkv = 4 if pack == "qkv" else 2
            call = lambda *a: fn(*a, cu_q, cu_k, mq, mk, 1, ks, causal=causal,
                                 return_attn_probs=True)
            res[f"{name}-c{causal}"] = _check(name + str(causal), call, "contiguous", cu3[-1],
                                              P, r, hkv=hkv, causal=causal, cu=cu3, pack=pack,
                                              varlen=True)
        res[f"llama3-prepare-c{causal}"] = _prepare_facts(cu3, causal, r, P, prep)

    if subset:
        return res
    # hf adapter: the attention-interface function transformers' flash_attention_2 key calls
    class Layer(torch.nn.Module):
        is_causal = True
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    original = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    hf_adapter.substitute_hf_flash_attn(dist.group.WORLD, 1)
    hf_adapter.update_ring_flash_attn_params(torch.tensor(cu3, dtype=torch.int32),
                                             dist.group.WORLD)
    attn = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]

    def hf_call(q, k, v):
        out, none = attn(Layer(), *(t.transpose(1, 2) for t in (q, k, v)), None, scaling=None)
        return out, None, none
    res["hf_attention_function"] = _check("hf", hf_call, "contiguous", cu3[-1], P, r,
                                          causal=True, cu=cu3)
    res["hf_data_params"] = sorted(hf_adapter.DATA_PARAMS) == sorted(
        ["cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "local_k_slice"])
    hf_adapter.use_ring_attn(False)
    res["hf_switch_off"] = True
    hf_adapter.use_ring_attn(True)
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = original

    # refusals, raised before any communication
    q = torch.zeros(1, 6, 2, 8, dtype=torch.float64)
    for label, kw in (("dropout", dict(dropout_p=0.1)),
                      ("alibi", dict(alibi_slopes=torch.ones(2)))):
        try:
            rfa.ring_flash_attn_func(q, q, q, **kw)
            res[f"refuses-{label}"] = False
        except ValueError as e:
            res[f"refuses-{label}"] = label in str(e)
    return res


def _prepare_facts(cu, causal, r, P, prep) -> bool:
    """Upstream's meaning of prepare's five values, checked by brute force."""
    cu_q, cu_k, mq, mk, ks = prep
    n = cu[-1] // P
    lo, hi = r * n, (r + 1) * n
    doc = lambda t: max(i for i, b in enumerate(cu) if b <= t)
    first, last = doc(lo), doc(hi - 1)
    want_k = slice(cu[first], hi if causal else cu[last + 1])
    local_q = sorted({0, n} | {b - lo for b in cu if lo < b < hi})
    return (ks == want_k and cu_q.tolist() == local_q
            and mq == max(b - a for a, b in zip(local_q, local_q[1:]))
            and cu_k.tolist()[-1] == want_k.stop - want_k.start
            and mk == max(b - a for a, b in zip(cu_k.tolist(), cu_k.tolist()[1:])))


def run_yunchang(rank: int, world: int) -> dict:
    """USP 2 x 2 (world 4; use_ulysses_low) for the three ring impls, causal and not, the
    qkv-packed module, EXTRACT_FUNC_DICT's shards, and UlyssesAttention over the world."""
    from distattn.compat import yunchang as yc

    ud, rd = 2, world // 2
    yc.set_seq_parallel_pg(ud, rd, rank, world)
    S, res = 4 * world, {}
    kinds = {"basic": "contiguous", "zigzag": "zigzag", "strip": "stripe"}
    for impl, kind in kinds.items():
        ring_part = _index(kind, S, rd, rank // ud)
        n = ring_part.numel() // ud
        idx = ring_part[(rank % ud) * n:(rank % ud + 1) * n]   # then contiguous over Ulysses
        x = torch.arange(S * 3.0).view(1, S, 3)
        res[f"extract-{impl}"] = bool(torch.equal(
            yc.EXTRACT_FUNC_DICT[impl](x, rank, world, rd, ud), x[:, idx]))
        for causal in (False, True):
            attn = yc.LongContextAttention(ring_impl_type=impl)
            res[f"usp-{impl}-c{causal}"] = _check_usp(
                f"{impl}{causal}", lambda q, k, v: (attn(q, k, v, causal=causal), None, None),
                idx, S, causal)
        packed = yc.LongContextAttentionQKVPacked(ring_impl_type=impl)
        res[f"qkvpacked-{impl}"] = _check_usp(
            f"p{impl}", lambda q, k, v: (packed(torch.stack([q, k, v], 2), causal=True), None,
                                         None), idx, S, True, hkv=4)
    uly = yc.UlyssesAttention()
    n = S // world
    res["ulysses"] = _check_usp("uly", lambda q, k, v: (uly(q, k, v, causal=True), None, None),
                                torch.arange(rank * n, (rank + 1) * n), S, True)
    return res


def _check_usp(key, call, idx, S, causal, hq=4, hkv=2) -> dict:
    q, k, v, dout = _data(key, S, hq, hkv)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dense_attention(*ins, visibility(S, None, causal))
    ref_grads = torch.autograd.grad(ref_out, ins, dout)
    loc = [t[:, idx].detach().clone().requires_grad_() for t in (q, k, v)]
    out = call(*loc)[0]
    out.backward(dout[:, idx])
    errs = {"out": _rel(out, ref_out[:, idx])}
    errs.update({n: _rel(t.grad, rg[:, idx]) for n, t, rg in zip(("dq", "dk", "dv"), loc,
                                                                  ref_grads)})
    return errs
