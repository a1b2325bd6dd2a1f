"""vLLM's own C++ RMSNorm kernels for eager engines on x86 CPUs.

Why: vLLM 0.32 dispatches RMSNorm and fused residual-add + RMSNorm through its IR ops, whose only implementation on a
CPU is the PyTorch-native one (up-cast to float32, square, mean, rsqrt, scale, down-cast: about a dozen elementwise
passes per call, 61 calls per decode step of a 30-layer Llama). vLLM relies on torch.compile (Inductor) to fuse them,
and on CPU our engines run eager (vllm_worker.enforce_eager: compiling costs about a minute per engine start). The CPU
build of vLLM ships fused kernels for both ops (``torch.ops._C.rms_norm`` / ``fused_add_rms_norm``, csrc/cpu), which
its IR only selects on GPUs; this module registers them as an IR implementation for CPUs and names it first in the
engine's ``ir_op_priority``, with "native" after it for any call the kernel does not take (see ``_takes``).

Measured (2026-12-05, the 2-core Intel Xeon, quiet; bench.generation, 32 prompts x 4 samples, <= 128 tokens, one
run): 662 tokens/s against 624 native (1.06x); a torch.profiler run of 64-token decoding showed why it is small: the
native norm's elementwise ops (copy_, mul, add, pow, sum, mean: 24,931 copies for 65 steps, 1,274 with the kernels)
were 15-19% of the step, the matmuls 36%, attention 18% and the sampler's Gumbel argmax over the 49,152-token
vocabulary 13%. Compiled engines (Inductor fuses all elementwise work) made 876 tokens/s in the same run.

Numerics: the two forms round at different points (the native one rounds the normalised row to bfloat16 before the
weight multiply). Against a float64 computation both stay within 1.5 bfloat16 ulps
(measured on random rows of 64-2,048 features) and they differ from each other by at most 2 ulps; the residual sum is
identical (tests/unit/test_cpu_kernels.py). Sampled tokens can therefore differ from the native path's for the same
seed while the distribution stays the model's: tests/integration/test_vllm_compiled_distribution.py checks it.
"""

# (no ``from __future__ import annotations``: torch infers the kernels' op schemas from real annotations)

from typing import Optional

PROVIDER = "alignflow_cpu_c"
OPS = ("rms_norm", "fused_add_rms_norm")
_registered = False
calls = 0  # kernel calls in this process: the worker reports it, so a silent fallback to the native form shows


def _takes(x, weight, variance_size) -> bool:
    """Calls the C kernel handles: contiguous rows, a weight of the input's dtype, the full hidden size."""
    import torch

    return (variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float32))


def register() -> None:
    """Register the kernels with vLLM's IR once per process (before the engine is built)."""
    global _registered
    if _registered:
        return
    import torch
    from torch import Tensor
    from vllm import ir
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    on_cpu = current_platform.is_cpu() and hasattr(torch.ops._C, "fused_add_rms_norm")

    @ir.ops.rms_norm.register_impl(
        PROVIDER, supported=on_cpu,
        supports_args=lambda x, weight, epsilon, variance_size=None: _takes(x, weight, variance_size))
    def _rms_norm(x: Tensor, weight: Optional[Tensor], epsilon: float,
                  variance_size: Optional[int] = None) -> Tensor:
        global calls
        calls += 1
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, epsilon)
        return out

    @ir.ops.fused_add_rms_norm.register_impl(
        PROVIDER, supported=on_cpu, inplace=True,
        supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: (
            _takes(x, weight, variance_size) and x_residual.is_contiguous() and x_residual.dtype == x.dtype))
    def _fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Optional[Tensor], epsilon: float,
                            variance_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        # in place, as the op's contract allows: x <- norm(x + residual) * weight, x_residual <- x + residual
        global calls
        calls += 1
        torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
        return x, x_residual

    _registered = True


def engine_args(mode: str, on_gpu: bool, eager: bool) -> dict:
    """vLLM engine arguments for the ``cpu_kernels`` setting: "auto" uses the C kernels in eager CPU engines (a
    compiled engine fuses the native form itself; GPUs have vLLM's own kernels), "native" never does."""
    modes = {"auto": lambda: eager and not on_gpu, "native": lambda: False}
    if mode not in modes:
        raise ValueError(f"cpu_kernels={mode!r}: expected one of {sorted(modes)}")
    if not modes[mode]():
        return {}
    register()
    return {"ir_op_priority": {op: [PROVIDER, "native"] for op in OPS}}


def active() -> bool:
    """Whether the engine built in this process dispatches both ops to the C kernels first (read back from vLLM's IR,
    not from what was asked: the worker reports it, so a silent fallback to the native form would show)."""
    if not _registered:
        return False
    from vllm import ir

    return all((getattr(ir.ops, op).get_priority() or [None])[0] == PROVIDER for op in OPS)
