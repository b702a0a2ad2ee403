"""LocalNet.train_step against the independent double-backward reference; isolation, release, bad input."""
import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgr_ext
from reference_sgr import penalty, sgr_gradients

CLASSES = 5


def mlp_blocks(dtype=torch.float64):
    dims = [6, 7, 5, 4]
    blocks = [
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(a, b), nn.Tanh()), nn.Linear(b, CLASSES))
        for a, b in zip(dims[:-1], dims[1:])
    ]
    return [b.to(dtype) for b in blocks], torch.randn(9, 6, dtype=dtype)


def conv_blocks(dtype=torch.float64):
    def body(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    blocks = [
        sgr_ext.LocalBlock(body(2, 3), sgr_ext.heads.conv_head(3, CLASSES, hidden=6)),
        sgr_ext.LocalBlock(body(3, 4), sgr_ext.heads.conv_head(4, CLASSES, hidden=6)),
        sgr_ext.LocalBlock(nn.Sequential(body(4, 4), nn.MaxPool2d(2)), nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES))),
    ]
    return [b.to(dtype) for b in blocks], torch.randn(6, 2, 4, 4, dtype=dtype)


def grads_of(blocks):
    return [tuple(p.grad.clone() for p in b.parameters()) for b in blocks]


@pytest.mark.parametrize("make", [mlp_blocks, conv_blocks])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_train_step_matches_double_backward_reference(make, distance, lam):
    blocks, x = make()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    ref_blocks = copy.deepcopy(blocks)
    expected = sgr_gradients(ref_blocks, x, y, lam, distance)

    net = sgr_ext.LocalNet(blocks, lam=lam, distance=distance)
    stats = net.train_step(x, y)

    for got, want in zip(grads_of(blocks), expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # train-mode BatchNorm statistics are updated exactly once, as in the reference
    for b, rb in zip(blocks, ref_blocks):
        for s, r in zip(b.buffers(), rb.buffers()):
            torch.testing.assert_close(s, r, rtol=0, atol=0)
    assert len(stats.losses) == len(stats.penalties) == len(blocks)
    assert stats.penalties[0] is None  # block 0 has no penalty
    computed = stats.penalties[1:] if lam > 0 else []
    assert all(v is None for v in stats.penalties[1:]) == (lam == 0)
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.losses + computed)
    if lam > 0:
        assert all(p > 0 for p in stats.penalties[1:])


def test_penalty_statistic_is_the_defined_penalty():
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    stats = sgr_ext.LocalNet(copy.deepcopy(blocks), lam=0.3).train_step(x, y)
    u = x.detach().requires_grad_()
    out0 = blocks[0].module(u)
    (g0,) = torch.autograd.grad(F.cross_entropy(blocks[0].head(out0), y), out0)
    u1 = out0.detach().requires_grad_()
    (g1,) = torch.autograd.grad(F.cross_entropy(blocks[1].predict(u1), y), u1)
    want = penalty(x.shape[0] * g1, x.shape[0] * g0, "l2", 1e-8)
    assert stats.penalties[1] == pytest.approx(float(want), rel=1e-10)


def test_reference_itself_against_finite_differences():
    """Guard the test oracle: its gradient of J_2 matches central finite differences."""
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    b0, b1 = blocks[0], blocks[1]
    h = b0.module(x).detach()
    out0 = h.clone().requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(b0.head(out0), y), out0)
    d_prev = (x.shape[0] * g0).detach()
    params = list(b1.parameters())

    def objective(*flat):
        saved = [p.data for p in params]
        for p, v in zip(params, flat):
            p.data = v
        try:
            u = h.clone().requires_grad_()
            loss = F.cross_entropy(b1.predict(u), y)
            (gu,) = torch.autograd.grad(loss, u, create_graph=True)
            return loss + 0.5 * penalty(x.shape[0] * gu, d_prev, "l2", 1e-8)
        finally:
            for p, v in zip(params, saved):
                p.data = v

    values = [p.detach().clone() for p in params]
    want = sgr_gradients([b0, b1], x, y, 0.5)[1]
    eps = 1e-6
    for i, (v, w) in enumerate(zip(values, want)):
        flat = v.reshape(-1)
        for j in range(0, flat.numel(), max(1, flat.numel() // 4)):
            plus = [t.clone() for t in values]
            minus = [t.clone() for t in values]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            fd = (objective(*plus) - objective(*minus)) / (2 * eps)
            assert float(fd.detach()) == pytest.approx(float(w.reshape(-1)[j]), rel=1e-5, abs=1e-7)


def test_lam_zero_is_plain_local_learning():
    blocks, x = conv_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    plain = copy.deepcopy(blocks)
    sgr_ext.LocalNet(blocks, lam=0.0).train_step(x, y)
    h = x
    for b in plain:  # each block trained on its own loss, input detached
        out = b.module(h.detach())
        F.cross_entropy(b.head(out), y).backward()
        h = out
    for got, want in zip(grads_of(blocks), grads_of(plain)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_gradients_accumulate_into_existing_grad():
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    net = sgr_ext.LocalNet(blocks, lam=0.2)
    net.train_step(x, y)
    once = grads_of(blocks)
    net.train_step(x, y)
    for g1, g2 in zip(once, grads_of(blocks)):
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, 2 * a)


def test_gradient_isolation_later_blocks_do_not_reach_earlier_ones():
    blocks, x = conv_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    first = copy.deepcopy(blocks)
    sgr_ext.LocalNet(first, lam=0.5).train_step(x, y)
    # Scramble every parameter of the last two blocks: blocks 0 and 1 must not notice.
    second = copy.deepcopy(blocks)
    with torch.no_grad():
        for p in second[2].parameters():
            p.normal_()
    sgr_ext.LocalNet(second, lam=0.5).train_step(x, y)
    for got, want in zip(grads_of(second)[:2], grads_of(first)[:2]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    # ...while block 1 does depend on block 0 (through x_0 and D_0), so the check can fail.
    third = copy.deepcopy(blocks)
    with torch.no_grad():
        for p in third[0].module.parameters():
            p.normal_()
    sgr_ext.LocalNet(third, lam=0.5).train_step(x, y)
    assert not torch.allclose(grads_of(third)[1][0], grads_of(first)[1][0])


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_block_activations_are_released_before_the_next_block_runs(lam):
    blocks, x = conv_blocks(torch.float32)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    inner = {k: [] for k in range(len(blocks))}

    def remember(k):
        return lambda mod, inp, out: inner[k].append(weakref.ref(out))

    for k, b in enumerate(blocks):
        b.module[0].register_forward_hook(remember(k))  # first conv output: internal to the block
        b.head.register_forward_hook(remember(k))  # head logits
    alive_at_start = {}

    def check(k):
        def hook(mod, inp):
            if k > 0 and k not in alive_at_start:
                gc.collect()
                alive_at_start[k] = sum(r() is not None for r in inner[k - 1])
        return hook

    for k, b in enumerate(blocks):
        b.module.register_forward_pre_hook(check(k))
    sgr_ext.LocalNet(blocks, lam=lam).train_step(x, y)
    assert all(inner[k] for k in inner)
    assert alive_at_start == {1: 0, 2: 0}


def test_inference_is_the_chain_of_blocks():
    blocks, x = conv_blocks()
    net = sgr_ext.LocalNet(blocks, lam=0.1).eval()
    h = x
    for b in blocks:
        h = b.module(h)
    torch.testing.assert_close(net(x), blocks[-1].head(h))


def test_alignment_tracked_under_plain_local_learning():
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    stats = sgr_ext.LocalNet(blocks, lam=0.0, track_alignment=True).train_step(x, y)
    assert stats.cosines[0] is None and all(-1 <= c <= 1 for c in stats.cosines[1:])
    assert all(r > 0 for r in stats.norm_ratios[1:])
    plain = sgr_ext.LocalNet(copy.deepcopy(blocks), lam=0.0).train_step(x, y)
    assert plain.cosines == [None] * len(blocks)


def test_non_finite_loss_is_reported_with_block_index():
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    with torch.no_grad():
        blocks[1].head.weight[0, 0] = float("nan")
    with pytest.raises(sgr_ext.NonFiniteError, match="block 1: non-finite loss") as info:
        sgr_ext.LocalNet(blocks, lam=0.1).train_step(x, y)
    assert info.value.block == 1


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"lam": -0.1}, ValueError, "lam: expected a finite number >= 0"),
        ({"lam": float("nan")}, ValueError, "lam: expected a finite number >= 0"),
        ({"lam": float("inf")}, ValueError, "lam"),
        ({"lam": "0.1"}, TypeError, "lam: expected a real number"),
        ({"lam": 0.1, "distance": "l1"}, ValueError, "distance: expected one of"),
        ({"lam": 0.1, "mode": "approx"}, ValueError, "mode: expected one of"),
        ({"lam": 0.1, "eps": -1.0}, ValueError, "eps"),
        ({"lam": 0.1, "loss_fn": 3}, TypeError, "loss_fn: expected a callable"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    blocks, _ = mlp_blocks()
    with pytest.raises(exc, match=match):
        sgr_ext.LocalNet(blocks, **kwargs)


def test_bad_blocks():
    with pytest.raises(ValueError, match="blocks: expected at least one"):
        sgr_ext.LocalNet([], lam=0.1)
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected a LocalBlock"):
        sgr_ext.LocalNet([nn.Linear(2, 2)], lam=0.1)
    with pytest.raises(TypeError, match="head: expected an nn.Module"):
        sgr_ext.LocalBlock(nn.Linear(2, 2), "head")


@pytest.mark.parametrize(
    "x, y, exc, match",
    [
        (torch.randn(0, 6), torch.zeros(0, dtype=torch.long), ValueError, "x: expected a non-empty batch"),
        (torch.randn(9, 6), torch.full((9,), CLASSES), ValueError, r"y: expected class indices in \[0, 5\)"),
        (torch.randn(9, 6), torch.full((9,), -1), ValueError, "y: expected class indices"),
        (torch.randn(9, 6), torch.zeros(8, dtype=torch.long), ValueError, r"y: expected shape \(9,\)"),
        (torch.randn(9, 6), torch.zeros(9), TypeError, "y: expected an integer tensor"),
        (torch.randn(9, 6), torch.zeros(9, 2, dtype=torch.long), ValueError, "y: expected shape"),
        ("x", torch.zeros(9, dtype=torch.long), TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_bad_step_input(x, y, exc, match):
    blocks, _ = mlp_blocks(torch.float32)
    with pytest.raises(exc, match=match):
        sgr_ext.LocalNet(blocks, lam=0.1).train_step(x, y)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_boundary_tensors_are_released_once_the_next_block_consumed_them(lam):
    # x_k and D_k are block k+1's inputs only: by the time block k+2 starts, nothing
    # (the step's statistics included) may still hold them.
    blocks, x = conv_blocks(torch.float32)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    boundary = {}
    alive_at_start = {}

    def keep_weak(k, r):
        boundary[k] = [weakref.ref(t) for t in (r.output, r.output_grad) if t is not None]

    def check(k):
        def hook(mod, inp):
            if k >= 2 and k not in alive_at_start:
                gc.collect()
                alive_at_start[k] = sum(ref() is not None for ref in boundary[k - 2])
        return hook

    for k, b in enumerate(blocks):
        b.module.register_forward_pre_hook(check(k))
    sgr_ext.LocalNet(blocks, lam=lam, track_alignment=True).train_step(x, y, on_block_end=keep_weak)
    assert len(boundary[0]) == 2  # x_0 and D_0 were produced, so the check below can fail
    assert alive_at_start == {2: 0}


def test_class_count_probe_of_linear_free_heads_leaves_no_trace():
    # Heads without a Linear are run once (eval mode, one sample) to read their class
    # count: that must neither update BatchNorm running statistics nor leave eval mode on.
    def block(cin):
        head = nn.Sequential(nn.Conv2d(4, CLASSES, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return sgr_ext.LocalBlock(nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), head)

    blocks = [block(3), block(4)]
    twin = copy.deepcopy(blocks)
    x = torch.randn(6, 3, 5, 5)
    y = torch.randint(0, CLASSES, (6,))
    net = sgr_ext.LocalNet(blocks, lam=0.5)
    net.train_step(x, y)
    assert net._probed_classes == {0: CLASSES, 1: CLASSES}
    assert all(m.training for m in net.modules())
    with torch.no_grad():  # one train-mode forward per block: the running statistics of one step
        h = x
        for b in twin:
            h = b.module(h)
    for got, want in zip(blocks, twin):
        torch.testing.assert_close(got.module[1].running_mean, want.module[1].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(got.module[1].running_var, want.module[1].running_var, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["exact", "fast", "double_backward"])
def test_train_step_inside_torch_compile_runs_eagerly_and_exactly(mode):
    # A compiled training function around train_step must give the eager gradients: dynamo
    # skips the step (its partial capture once gave wrong penalty gradients silently).
    first, x = conv_blocks(torch.float32)
    second = copy.deepcopy(first)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    sgr_ext.LocalNet(first, lam=0.5, mode=mode).train_step(x, y)
    net = sgr_ext.LocalNet(second, lam=0.5, mode=mode)

    def user_step(x, y):
        return net.train_step(x * 1.0, y)  # the multiply is compiled, the step is not

    torch._dynamo.reset()
    stats = torch.compile(user_step, backend="aot_eager")(x, y)
    assert len(stats.losses) == len(first)
    for block_a, block_b in zip(grads_of(first), grads_of(second)):
        for a, b in zip(block_a, block_b):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(Exception, match="a local-learning step always runs eagerly"):
        torch.compile(net.train_step, fullgraph=True, backend="aot_eager")(x, y)


def test_class_count_probe_tolerates_modules_that_need_a_batch():
    # BatchNorm without running statistics uses batch statistics even in eval mode: the probe
    # runs two samples, and a probe that fails anyway leaves the check to the step itself.
    def head():
        return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16, track_running_stats=False))
    blocks = [sgr_ext.LocalBlock(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 16, 1),
                                                                               nn.AdaptiveAvgPool2d(1), *head()))]
    x, y = torch.randn(5, 3, 4, 4), torch.randint(0, 16, (5,))
    stats = sgr_ext.LocalNet(blocks, lam=0.0).train_step(x, y)
    assert math.isfinite(stats.losses[0])


def test_eager_step_works_with_a_torch_without_disable_reasons(monkeypatch):
    calls = []

    def old_disable(fn=None, recursive=True):  # torch < 2.8: no ``reason``
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch.compiler, "disable", old_disable)
    f = sgr_ext.net.eager_step(lambda: 7)
    assert f() == 7 and len(calls) == 1
