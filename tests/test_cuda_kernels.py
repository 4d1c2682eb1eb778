"""The ``cuda`` backend (csrc kernels) against the fp64 reference.

Every GPU test is ``@pytest.mark.cuda`` and skips when ``distattn._C`` or a GPU is missing.
The checks themselves live in tests/kernel_checks.py (FlashAttention's error rule, poisoned
outputs); tests/test_emulate.py runs the same checks on the same kernels compiled for the CPU
CTA emulator.

The CPU tests at the top check that a build without the extension says so clearly.
"""
from __future__ import annotations

import pytest
import torch

import kernel_checks as kc
from distattn.kernels import Mask, get_backend
from distattn.kernels.cuda import CudaBackend, arch_error, extension_error
from distattn.kernels.reference import ReferenceBackend

EXT_ERROR = extension_error()
needs_gpu = pytest.mark.skipif(EXT_ERROR is not None, reason=f"cuda backend absent: {EXT_ERROR}")


# ---------------------------------------------------------------------------------------------
# CPU: the absent extension is reported, never a crash or a silent fallback.
# ---------------------------------------------------------------------------------------------
def test_extension_error_is_a_reason_or_none():
    err = extension_error()
    assert err is None or (isinstance(err, str) and err and "\n" not in err)
    if err is None:
        assert torch.cuda.is_available()


def test_get_backend_cuda_raises_clearly_when_absent():
    if extension_error() is None:
        pytest.skip("the extension is available here")
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        get_backend("cuda", q, q, q)
    assert CudaBackend().applicable(q, q, q) is False
    # auto never picks it without the extension
    assert get_backend("auto", q, q, q).name != "cuda"


def test_check_names_the_argument_on_cpu_tensors():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        CudaBackend().check(q, q, q)


def test_arch_error_follows_sass_compatibility():
    built = ("90a", "80")
    for cap in ((9, 0), (8, 0), (8, 6), (8, 9)):
        assert arch_error(built, cap) is None, cap
    for cap in ((10, 0), (12, 0), (7, 5), (9, 1)):
        why = arch_error(built, cap)
        assert why and "sm_90a, sm_80" in why and f"{cap[0]}.{cap[1]}" in why
        assert f'DISTATTN_CUDA_ARCHS="{cap[0]}{cap[1]}"' in why
    assert arch_error(("86",), (8, 0)) is not None   # no code for older minors
    assert arch_error(("100a",), (10, 0)) is None


def test_check_refuses_a_gpu_without_code_and_auto_falls_back(monkeypatch):
    """check() (through _check_device_code) raises a ValueError naming the build's archs for
    a GPU they do not run on; applicable() is then False, so auto picks another backend."""
    class FakeExt:
        @staticmethod
        def archs():
            return ["90a", "80"]

    class Fake(CudaBackend):
        _ext = FakeExt()

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    with pytest.raises(ValueError, match=r"cannot run on cuda:0.*sm_90a, sm_80.*10\.0"):
        Fake()._check_device_code(torch.device("cuda:0"))
    monkeypatch.setattr(Fake, "check", lambda self, q, k, v: self._check_device_code(q.device))
    q = torch.randn(1, 4, 2, 64)
    assert Fake().applicable(q, q, q) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert Fake().applicable(q, q, q) is True


# ---------------------------------------------------------------------------------------------
# GPU: forward, lse and gradients
# ---------------------------------------------------------------------------------------------
MASKS = [Mask.none(), Mask.causal(0), Mask.causal(-1), Mask.causal(-17), Mask.causal(5),
         Mask.causal(100), Mask.causal(-1500)]
# (Sq, Sk, Hq, Hkv): odd lengths, GQA and MQA, one-token blocks.
SHAPES = [(1, 1, 2, 2), (17, 17, 4, 2), (17, 1000, 4, 1), (1000, 17, 6, 3),
          (1000, 1000, 4, 4), (4097, 4097, 2, 1)]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,d_v", [(64, 64), (128, 128), (192, 128)],
                         ids=["d64", "d128", "d192v128"])  # (192, 128): MLA
@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_against_fp64(dtype, d, d_v, mask, shape):
    kc.check_forward_backward(CudaBackend(), "cuda", dtype, d, shape, mask, d_v=d_v)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backend_api_and_strided_views(dtype):
    """Through CudaBackend: packed qkv views, accumulators in slices of bigger buffers,
    deterministic backward; auto picks the kernels once they are verified on hardware."""
    from distattn.kernels import CUDA_KERNELS_VERIFIED
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=dtype)
    assert get_backend("cuda", q, q, q).name == "cuda"
    assert (get_backend("auto", q, q, q).name == "cuda") == CUDA_KERNELS_VERIFIED
    kc.check_backend_api_and_strided_views(CudaBackend(), "cuda", dtype)


@pytest.mark.cuda
@needs_gpu
def test_bad_inputs_raise_python_errors():
    kc.check_bad_inputs(CudaBackend(), "cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_kernel_matches_torch_merge(dtype):
    kc.check_merge_kernel(CudaBackend(), "cuda", dtype)


# ---------------------------------------------------------------------------------------------
# The fused ring step over a simulated ring (all ranks' blocks on one device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ring_simulation_is_exact_with_reference_backend(layout, causal):
    """CPU check of the simulation itself (block masks of each layout): with the fp64
    reference backend the simulated ring reproduces full attention to 1e-10."""
    world, seq = 4, 8 * 5
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(1, seq, 1, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(1, seq, 1, 8, dtype=torch.float64, generator=gen)
    dout = torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen)
    be = ReferenceBackend()
    mask = Mask.causal(0) if causal else Mask.none()
    out, lse = be.forward(q, k, v, scale=0.3, mask=mask)
    outs, lses, dq, dk, dv = kc.ring(be.forward_into, be.backward_into, q, k, v, dout, out,
                                     lse, layout, world, causal, 0.3)
    for r in range(world):
        pos = kc.positions(layout, r, world, seq)
        torch.testing.assert_close(outs[r], out[:, pos], atol=1e-10, rtol=0)
        torch.testing.assert_close(lses[r], lse[:, :, pos], atol=1e-10, rtol=0)
    for got, want in zip((dq, dk, dv), be.backward(dout, q, k, v, out, lse, scale=0.3,
                                                   mask=mask)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_fused_ring_equals_unfused_and_reference(layout, causal, heads):
    # 131-token zigzag chunks: ragged tiles everywhere
    kc.check_fused_ring(CudaBackend(), "cuda", layout, causal, heads, world=4, seq=8 * 131, d=64)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["zigzag", "stripe"])
def test_fused_ring_mla(layout):
    """MLA's (192, 128): fused epilogues at V's head dim."""
    kc.check_fused_ring(CudaBackend(), "cuda", layout, True, (4, 1), world=4, seq=8 * 131,
                        d=192, d_v=128)
