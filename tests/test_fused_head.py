"""Heads ending in nn.Linear run through ``ops.linear_cross_entropy`` in every backprop engine.

The fused threshold is lowered to 0 so that small float64 heads take the fused path; every
engine is then checked against the independent double-backward reference (the penalty's
second derivative goes through the op's double backward), and the saved bytes show that the
(N, V) logits are no longer kept for backward.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgr_ext
from reference_sgr import sgr_gradients
from sgr_ext.engine import fused_head
from sgr_ext.memory import PeakMemory

V = 11


@pytest.fixture
def fused_calls(monkeypatch):
    """Every head that ends in a Linear takes the fused path; counts the op's calls."""
    calls = []
    real = fused_head.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_head, "FUSED_MIN_LOGITS", 0)
    monkeypatch.setattr(fused_head, "linear_cross_entropy", counting)
    return calls


def blocks_with_linear_heads(dtype=torch.float64):
    """A conv block with a Sequential head ending in Linear, an MLP block with a bare Linear head,
    a conv block with a plain head (not fused: ends in a module that is not a Linear)."""
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    blocks = [
        sgr_ext.LocalBlock(conv, nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 7), nn.ReLU(),
                                               nn.Linear(7, V))),
        sgr_ext.LocalBlock(nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 3, 9), nn.Tanh()), nn.Linear(9, V)),
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(9, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, V), nn.Identity())),
    ]
    return [b.to(dtype) for b in blocks]


def step_grads(blocks, x, y, **kw):
    net = sgr_ext.LocalNet(copy.deepcopy(blocks), **kw)
    stats = net.train_step(x, y)
    return [p.grad for p in net.parameters()], stats


@pytest.mark.parametrize("mode", ["exact", "fast", "double_backward"])
@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_every_engine_on_the_fused_path_matches_the_reference(fused_calls, mode, lam):
    torch.manual_seed(0)
    blocks = blocks_with_linear_heads()
    x, y = torch.randn(7, 2, 5, 3, dtype=torch.float64), torch.randint(0, V, (7,))
    want = [g for gs in sgr_gradients(copy.deepcopy(blocks), x, y, lam) for g in gs]
    got, stats = step_grads(blocks, x, y, lam=lam, mode=mode)
    assert len(fused_calls) >= 2  # blocks 0 and 1 went through the op
    tol = 1e-5 if mode == "fast" and lam > 0 else 1e-12  # fast: first-order finite difference
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    plain, plain_stats = step_grads_unfused(blocks, x, y, lam=lam, mode=mode)
    assert stats.accuracies == plain_stats.accuracies
    assert stats.losses == pytest.approx(plain_stats.losses, rel=1e-13)


def step_grads_unfused(blocks, x, y, **kw):
    saved = fused_head.FUSED_MIN_LOGITS
    fused_head.FUSED_MIN_LOGITS = float("inf")
    try:
        return step_grads(blocks, x, y, **kw)
    finally:
        fused_head.FUSED_MIN_LOGITS = saved


def test_small_heads_keep_the_plain_path(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_head, "linear_cross_entropy", lambda *a, **k: calls.append(1))
    blocks = blocks_with_linear_heads()
    step_grads(blocks, torch.randn(4, 2, 5, 3, dtype=torch.float64), torch.randint(0, V, (4,)), lam=0.5)
    assert not calls  # 4 x 11 logits: far below FUSED_MIN_LOGITS


def test_custom_loss_or_hooked_head_is_not_fused(fused_calls):
    blocks = blocks_with_linear_heads()
    x, y = torch.randn(4, 2, 5, 3, dtype=torch.float64), torch.randint(0, V, (4,))
    step_grads(blocks, x, y, lam=0.5, loss_fn=lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1))
    assert not fused_calls
    blocks[1].head.register_forward_hook(lambda *a: None)
    assert fused_head.split_head(blocks[1].head) is None


def test_fused_head_keeps_no_logits_for_backward(fused_calls):
    torch.manual_seed(0)
    n, width, vocab = 256, 16, 4096
    blocks = [sgr_ext.LocalBlock(nn.Sequential(nn.Linear(width, width), nn.Tanh()), nn.Linear(width, vocab))
              for _ in range(2)]
    x, y = torch.randn(n, width), torch.randint(0, vocab, (n,))
    logits_bytes = n * vocab * 4
    for fused in (True, False):
        net = sgr_ext.LocalNet(copy.deepcopy(blocks), lam=0.5)
        saved = fused_head.FUSED_MIN_LOGITS
        fused_head.FUSED_MIN_LOGITS = 0 if fused else float("inf")
        try:
            with PeakMemory("cpu") as mem:
                net.train_step(x, y)
        finally:
            fused_head.FUSED_MIN_LOGITS = saved
        if fused:
            assert mem.peak_bytes < logits_bytes / 4, mem.peak_bytes
        else:  # the same step unfused keeps the logits (and their softmax)
            assert mem.peak_bytes >= logits_bytes, mem.peak_bytes


@pytest.mark.parametrize("kw", [dict(side="output"), dict(side="handback"), dict(lam_mode="grad_ratio", distance="l2_rel")])
def test_fused_path_equals_plain_path_for_the_other_penalty_options(fused_calls, kw):
    torch.manual_seed(0)
    blocks = blocks_with_linear_heads()
    x, y = torch.randn(7, 2, 5, 3, dtype=torch.float64), torch.randint(0, V, (7,))
    got, stats = step_grads(blocks, x, y, lam=0.8, **kw)
    assert fused_calls
    want, plain_stats = step_grads_unfused(blocks, x, y, lam=0.8, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert stats.penalties[1:] == pytest.approx(plain_stats.penalties[1:], rel=1e-12)
    assert stats.penalties[0] is None and plain_stats.penalties[0] is None
