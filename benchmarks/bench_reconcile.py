"""pytest-benchmark: ``reconcile`` forward+backward, torch eager vs torch.compile vs Triton (CUDA only).

    python -m pytest benchmarks/bench_reconcile.py --benchmark-enable -q \
        --benchmark-columns=median,iqr,min,ops --benchmark-sort=name

Each round is one forward + backward (``torch.autograd.grad``) followed by
``torch.cuda.synchronize()``, after warm-up rounds (which also absorb torch.compile and Triton
compilation). Shapes: 1024x16x32x32 (B=1024, F=16384: a ResNet stage boundary at batch 1024)
and 8x512x768 (B=8, F=393216: a transformer block boundary); fp32 and bf16; both distances.
For floors, copy bandwidth and numerics run benchmarks/gpu_reconcile.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("reconcile benchmarks need a CUDA GPU", allow_module_level=True)

from sgr_ext.ops.reconcile import reconcile  # noqa: E402

SHAPES = {"1024x16x32x32": (1024, 16, 32, 32), "8x512x768": (8, 512, 768)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_eager(a, d, distance):
    return reconcile(a, d, distance=distance, impl="torch")


def _triton(a, d, distance):
    return reconcile(a, d, distance=distance, impl="triton")


_compiled = {}


def _torch_compiled(a, d, distance):
    key = (tuple(a.shape), a.dtype, distance)
    if key not in _compiled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled[key] = torch.compile(lambda x, y: reconcile(x, y, distance=distance, impl="torch"), dynamic=False)
    return _compiled[key](a, d)


IMPLS = {"torch_eager": _torch_eager, "torch_compile": _torch_compiled, "triton": _triton}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_reconcile_fwd_bwd(benchmark, shape, dtype, distance, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(SHAPES[shape], device="cuda", generator=g).to(DTYPES[dtype]).requires_grad_()
    d = torch.randn(SHAPES[shape], device="cuda", generator=g).to(DTYPES[dtype])
    fn = IMPLS[impl]

    def step():
        loss = fn(a, d, distance)
        (grad,) = torch.autograd.grad(loss, a)
        torch.cuda.synchronize()
        return loss, grad

    for _ in range(5):  # compile + caches
        step()
    benchmark.group = f"reconcile fwd+bwd {shape} {dtype} {distance}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), shape=shape, dtype=dtype, impl=impl)
    loss, grad = benchmark.pedantic(step, rounds=100, iterations=5, warmup_rounds=10)
    assert torch.isfinite(loss) and grad.shape == a.shape
