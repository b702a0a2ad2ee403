"""pytest-benchmark: fused linear + cross-entropy, forward+backward (CUDA only).

    python -m pytest benchmarks/bench_linear_ce.py --benchmark-enable -q \
        --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name

Compares torch eager (logits in bf16, softmax in fp32), torch.compile (inductor) of the same
function, Liger-Kernel's fused linear cross-entropy (when importable) and sgr_ext
(impl="triton", and impl=None: the size-based dispatch) on bf16 inputs:

* LLM heads: N=8192 H=768 V=32000 and N=16384 H=2048 V=128256;
* CIFAR heads: N=1024, H in {64, 128, 256, 512}, V in {10, 100}.

Each round is one forward + backward (``torch.autograd.grad`` w.r.t. x and W) followed by
``torch.cuda.synchronize()``, after warm-up rounds that also absorb compilation; the median
is the number to read. Peak memory of one step goes into ``extra_info``. Numerics, peak
memory tables and plots: benchmarks/gpu_linear_ce.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("linear cross-entropy benchmarks need a CUDA GPU", allow_module_level=True)

from sgr_ext.ops import linear_cross_entropy  # noqa: E402
from sgr_ext.reference import linear_cross_entropy_torch  # noqa: E402

IGNORE = -100
SIZES = {
    "N8192_H768_V32000": (8192, 768, 32000),
    "N16384_H2048_V128256": (16384, 2048, 128256),
    **{f"N1024_H{h}_V{v}": (1024, h, v) for v in (10, 100) for h in (64, 128, 256, 512)},
}

try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except Exception:  # noqa: BLE001
    liger_fused_linear_cross_entropy = None

_compiled = {}


def _torch_compiled(x, w, t):
    key = (tuple(x.shape), tuple(w.shape))
    if key not in _compiled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled[key] = torch.compile(
            lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c, ignore_index=IGNORE), dynamic=False
        )
    return _compiled[key](x, w, t)


def _liger(x, w, t):
    if liger_fused_linear_cross_entropy is None:
        pytest.skip("liger_kernel is not importable")
    return liger_fused_linear_cross_entropy(x, w, t, ignore_index=IGNORE)


IMPLS = {
    "torch_eager": lambda x, w, t: linear_cross_entropy_torch(x, w, t, None, "mean", IGNORE),
    "torch_compile": _torch_compiled,
    "liger": _liger,
    "sgr_ext_triton": lambda x, w, t: linear_cross_entropy(x, w, t, impl="triton"),
    "sgr_ext_auto": lambda x, w, t: linear_cross_entropy(x, w, t),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_linear_ce_fwd_bwd(benchmark, size, impl):
    n, h, v = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2.0 / math.sqrt(h))).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    fn = IMPLS[impl]

    def step():
        loss = fn(x, w, t)
        torch.autograd.grad(loss, [x, w])
        torch.cuda.synchronize()

    step()  # compile / autotune outside the measured rounds
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    big = n * v >= 1 << 26
    benchmark.pedantic(step, rounds=10 if big else 50, warmup_rounds=3 if big else 10, iterations=1)
    benchmark.extra_info.update(
        {"peak_mib": round(peak_mib, 2), "device": torch.cuda.get_device_name(), "N": n, "H": h, "V": v}
    )
