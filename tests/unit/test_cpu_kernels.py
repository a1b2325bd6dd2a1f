"""vLLM's C++ RMSNorm kernels as an IR implementation for eager CPU engines (pipeline_lib/generation/cpu_kernels.py):
when they are used, and that they compute what vLLM's native form computes (against float64 by hand)."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.generation import cpu_kernels


def _ulp(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t.abs(), torch.tensor(float("inf"), dtype=t.dtype)) - t.abs()).double()


def test_engine_args_choose_the_kernels_only_for_eager_cpu_engines():
    want = {"ir_op_priority": {"rms_norm": [cpu_kernels.PROVIDER, "native"],
                               "fused_add_rms_norm": [cpu_kernels.PROVIDER, "native"]}}
    assert cpu_kernels.engine_args("auto", on_gpu=False, eager=True) == want
    assert cpu_kernels.engine_args("auto", on_gpu=False, eager=False) == {}  # Inductor fuses the native form
    assert cpu_kernels.engine_args("auto", on_gpu=True, eager=True) == {}  # vLLM's own GPU kernels
    assert cpu_kernels.engine_args("native", on_gpu=False, eager=True) == {}
    with pytest.raises(ValueError, match="cpu_kernels='fast'"):
        cpu_kernels.engine_args("fast", on_gpu=False, eager=True)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 1.5), (torch.float32, 8.0)])
@pytest.mark.parametrize("rows,hidden", [(7, 64), (128, 576), (3, 2048)])
def test_kernels_match_native_and_float64(dtype, bound, rows, hidden):
    from vllm import ir

    cpu_kernels.register()
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).mul(3).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    native = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x.clone(), res.clone(), w, 1e-5)
    xc, rc = x.clone(), res.clone()
    kernel = ir.ops.fused_add_rms_norm.impls[cpu_kernels.PROVIDER].impl_fn(xc, rc, w, 1e-5)
    assert torch.equal(kernel[1], native[1])  # the residual stream: the same rounded sum
    s = x.double() + res.double()
    exact = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    for out in (native[0], kernel[0]):
        assert ((out.double() - exact).abs() / _ulp(out)).max() <= bound
    # rms_norm alone
    exact1 = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    out1 = ir.ops.rms_norm.impls[cpu_kernels.PROVIDER].impl_fn(x, w, 1e-5)
    assert ((out1.double() - exact1).abs() / _ulp(out1)).max() <= bound


def test_calls_the_kernel_cannot_take_go_to_the_native_form():
    from vllm import ir

    cpu_kernels.register()
    impl = ir.ops.rms_norm.impls[cpu_kernels.PROVIDER]
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert impl.supports_args(x, w, 1e-5)
    assert not impl.supports_args(x, None, 1e-5)  # no weight
    assert not impl.supports_args(x, w.float(), 1e-5)  # weight of another dtype
    assert not impl.supports_args(x.t().contiguous().t(), w, 1e-5)  # strided rows
    assert not impl.supports_args(x, w, 1e-5, 32)  # a variance over part of the features
