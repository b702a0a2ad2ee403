"""BP-free engine (``grad="forward"``): forward gradients with activity perturbation.

Three kinds of check:
* exactness in expectation: the Gaussian tangents are replaced by a design with exactly
  the same second moment (rows of sqrt(N) Q, Q^T Q = I), so the averaged estimate IS the
  expectation of the estimator; it must equal the double-backward reference to ~1e-13
  (float64), on a linear model, an MLP with in-place ReLU, and conv nets with norms;
* unbiasedness with real Gaussian tangents: z-scores of the sample mean of many
  independent estimates against the exact value, per coordinate and along the exact
  gradient (the scale statistic); the same samples must reject the gradient scaled by
  0.8 and 1.25 (and other wrong targets), so the test can fail;
* the plumbing: running statistics, no backward through layers, LocalNet, bad input.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import LocalBlock, LocalNet, NonFiniteError
from sgr_ext.engine import decomposed_norms, double_backward
from sgr_ext.engine import forward_grad as fg
from sgr_ext.engine.base import StepConfig
from reference_sgr import sgr_gradients

DT = torch.float64


def _cfg(lam=0.0, distance="l2", n=1, per_sample=True, track=False):
    return StepConfig(lam=lam, distance=distance, eps=1e-8, loss_fn=F.cross_entropy,
                      track_alignment=track, num_tangents=n, fg_per_sample=per_sample)


def _linear():
    return LocalBlock(nn.Linear(3, 4), nn.Linear(4, 3)).to(DT), (3,)


def _mlp():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 4), nn.Tanh())
    head = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    return LocalBlock(module, head).to(DT), (3,)


def _conv_bn():
    torch.manual_seed(2)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
    head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))
    return LocalBlock(module, head).to(DT), (1, 3, 3)


def _conv_ln():
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.Tanh())
    head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))
    return LocalBlock(module, head).to(DT), (1, 4, 4)


def _inputs(shape, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = 2 * torch.randn(batch, *shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (batch,), generator=g)
    d_prev = torch.randn(batch, *shape, generator=g, dtype=DT)
    return u, y, d_prev


def _grads(block):
    return torch.cat([p.grad.reshape(-1) for p in block.parameters()])


def _reference(block, u, y, d_prev, cfg):
    block.zero_grad(set_to_none=True)
    r = double_backward.step(block, u, y, d_prev, cfg, need_output_grad=True)
    g = _grads(block)
    block.zero_grad(set_to_none=True)
    return r, g


class _Design:
    """Stands in for ``forward_grad._draw``: the n-th pass of each phase gets row n of sqrt(N) Q_phase."""

    def __init__(self, shapes_per_phase, n):
        self.shapes = shapes_per_phase
        self.count = dict.fromkeys(shapes_per_phase, 0)
        g = torch.Generator().manual_seed(0)
        self.rows = {}
        for phase, shapes in shapes_per_phase.items():
            m = sum(math.prod(s) for s in shapes)
            q, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT))
            self.rows[phase] = q * math.sqrt(n)

    def __call__(self, shape, dtype, device, phase):
        shapes = self.shapes[phase]
        k = self.count[phase]
        self.count[phase] += 1
        npass, j = divmod(k, len(shapes))
        off = sum(math.prod(s) for s in shapes[:j])
        return self.rows[phase][npass, off:off + math.prod(shape)].reshape(shape).to(dtype)


def _shapes_per_phase(monkeypatch, block, u, y, d_prev, cfg):
    seen: dict = {}
    real = fg._draw

    def recording(shape, dtype, device, phase):
        seen.setdefault(phase, []).append(tuple(shape))
        return real(shape, dtype, device, phase)

    monkeypatch.setattr(fg, "_draw", recording)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    fg.step(block, u, y, d_prev, _cfg(lam=cfg.lam, distance=cfg.distance, per_sample=cfg.fg_per_sample), True)
    block.load_state_dict(state)
    block.zero_grad(set_to_none=True)
    return seen


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------- exact in expectation


@pytest.mark.parametrize(
    "make,per_sample",
    [(_linear, True), (_mlp, True), (_mlp, False), (_conv_bn, False), (_conv_ln, True)],
    ids=["linear", "mlp", "mlp-batch", "conv-bn-train-batch", "conv-groupnorm-layernorm"],
)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_expectation_is_exact(monkeypatch, make, per_sample, distance):
    block, shape = make()
    block.train()
    u, y, d_prev = _inputs(shape)
    cfg = _cfg(lam=0.7, distance=distance, per_sample=per_sample)
    shapes = _shapes_per_phase(monkeypatch, block, u, y, d_prev, cfg)
    assert set(shapes) == {"params", "output", "input", "penalty"}
    n = max(sum(math.prod(s) for s in v) for v in shapes.values())
    ref, g_ref = _reference(block, u, y, d_prev, cfg)

    monkeypatch.setattr(fg, "_draw", _Design(shapes, n))
    state = {k: v.clone() for k, v in block.state_dict().items()}
    out = fg.step(block, u, y, d_prev, _cfg(lam=0.7, distance=distance, n=n, per_sample=per_sample), True)
    block.load_state_dict(state)
    g_est = _grads(block)

    assert _rel(g_est, g_ref) < 1e-11
    assert _rel(out.output_grad, ref.output_grad) < 1e-11
    assert torch.allclose(out.penalty, ref.penalty, rtol=1e-11)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-13)
    assert torch.allclose(out.output, ref.output, rtol=1e-12, atol=1e-14)
    # The SGR term is a real part of this gradient, not a rounding error next to l's.
    _, g_plain = _reference(block, u, y, d_prev, _cfg(lam=0.0))
    assert _rel(g_ref, g_plain) > 0.05


@pytest.mark.parametrize(
    "make,per_sample", [(_mlp, True), (_conv_bn, False)], ids=["mlp", "conv-bn-train-batch"]
)
def test_expectation_is_exact_general_path(monkeypatch, make, per_sample):
    """The torch.func path (any module tree): same exactness, incl. the nested pass's norm fix."""
    monkeypatch.setattr(fg, "use_jets", lambda block, cfg: False)
    test_expectation_is_exact(monkeypatch, make, per_sample, "l2")


@pytest.mark.parametrize("make,per_sample", [(_mlp, True), (_conv_bn, False), (_conv_ln, True)],
                         ids=["mlp", "conv-bn-train-batch", "conv-norms"])
def test_jets_match_general_path(monkeypatch, make, per_sample):
    """Same tangents (same seed) -> the jet fast path and torch.func give the same estimates."""
    out = {}
    for jets in (True, False):
        block, shape = make()
        u, y, d_prev = _inputs(shape)
        monkeypatch.setattr(fg, "use_jets", lambda b, c, jets=jets: jets)
        torch.manual_seed(5)
        r = fg.step(block, u, y, d_prev, _cfg(lam=0.9, n=3, per_sample=per_sample, track=True), True)
        out[jets] = (_grads(block), r, block.state_dict())
    (g1, r1, s1), (g2, r2, s2) = out[True], out[False]
    assert _rel(g1, g2) < 1e-10
    assert _rel(r1.output_grad, r2.output_grad) < 1e-10
    for field in ("loss", "penalty", "cosine", "norm_ratio"):
        assert torch.allclose(getattr(r1, field), getattr(r2, field), rtol=1e-10), field
    for k in s1:
        assert torch.allclose(s1[k].double(), s2[k].double(), rtol=1e-10, atol=1e-12), k


def test_jets_cover_the_study_model_and_fall_back_otherwise():
    from sgr_ext.models.small_cnn import DigitsCNN
    from sgr_ext.split import split

    cfg = _cfg()
    blocks = split(DigitsCNN(width=4), 2)
    assert all(fg.use_jets(b, cfg) for b in blocks)
    custom = LocalBlock(_TupleOut(), nn.Sequential())
    assert not fg.use_jets(custom, cfg)
    assert not fg.use_jets(blocks[0], _cfg().__class__(**{**cfg.__dict__, "loss_fn": lambda o, t: o.mean()}))


# ---------------------------------------------------------------- statistical unbiasedness


def _z_max(samples: torch.Tensor, target: torch.Tensor) -> float:
    """max |z| of the per-coordinate sample means against ``target``. (No mean of z^2: the
    coordinates share their tangents, so they are correlated and it is not chi^2 / n.)"""
    m = samples.shape[0]
    sd = samples.std(dim=0).clamp_min(1e-12 * float(samples.abs().max()))
    z = (samples.mean(dim=0) - target) / (sd / math.sqrt(m))
    keep = samples.std(dim=0) > 0  # coordinates with an exactly known (zero) estimate carry no information
    return float(z[keep].abs().max())


def _z_scale(samples: torch.Tensor, target: torch.Tensor) -> float:
    """z-score of the mean of <estimate, target> / |target|^2 against 1: a scale bias of the
    estimator along the true gradient (far more sensitive to one than any single coordinate)."""
    p = samples @ target / target.pow(2).sum()
    return float((p.mean() - 1.0) / (p.std() / math.sqrt(len(p))))


def _assert_unbiased(samples, target, *wrong):
    """Passes for an unbiased estimator; the same samples must FAIL against the target scaled by
    0.8 and 1.25, and against each ``wrong`` target, so the check can fail."""
    zmax, zs = _z_max(samples, target), _z_scale(samples, target)
    assert zmax < 5.0 and abs(zs) < 4.0, (zmax, zs)
    for other in (0.8 * target, 1.25 * target, *wrong):
        zmax_b, zs_b = _z_max(samples, other), _z_scale(samples, other)
        assert zmax_b > 5.0 or abs(zs_b) > 4.0, ("no power against a wrong target", zmax_b, zs_b)


def _samples(block, u, y, d_prev, cfg, draws):
    grads, d_out = [], []
    state = {k: v.clone() for k, v in block.state_dict().items()}
    for _ in range(draws):
        block.zero_grad(set_to_none=True)
        r = fg.step(block, u, y, d_prev, cfg, True)
        block.load_state_dict(state)
        grads.append(_grads(block))
        d_out.append(r.output_grad.reshape(-1))
    block.zero_grad(set_to_none=True)
    return torch.stack(grads), torch.stack(d_out)


def test_unbiased_parameter_and_output_gradient():
    torch.manual_seed(10)
    block, shape = _mlp()
    u, y, _ = _inputs(shape, batch=4, seed=1)
    ref, g_ref = _reference(block, u, y, None, _cfg())
    grads, d_out = _samples(block, u, y, None, _cfg(n=8), draws=600)
    _assert_unbiased(grads, g_ref)
    _assert_unbiased(d_out, ref.output_grad.reshape(-1))


def test_unbiased_input_gradient():
    torch.manual_seed(11)
    block, shape = _mlp()
    u, y, _ = _inputs(shape, batch=4, seed=2)
    uu = u.clone().requires_grad_()
    a_ref = torch.autograd.grad(F.cross_entropy(block.predict(uu), y), uu)[0] * u.shape[0]
    run = fg._JetRun(block, fg._sites(block), u, y, _cfg())
    with torch.no_grad():
        est = torch.stack([run.boundary_phase("input", u).reshape(-1) for _ in range(1000)])
    _assert_unbiased(est, a_ref.reshape(-1))


@pytest.mark.parametrize("make", [_mlp, _conv_ln], ids=["mlp", "conv"])
def test_unbiased_sgr_gradient(make):
    """grad of l + lam * R, with the penalty's mixed second derivative from nested forward mode."""
    torch.manual_seed(12)
    block, shape = make()
    u, y, d_prev = _inputs(shape, batch=3, seed=3)
    cfg = _cfg(lam=2.0, n=8)
    _, g_ref = _reference(block, u, y, d_prev, cfg)
    _, g_plain = _reference(block, u, y, d_prev, _cfg())
    assert _rel(g_ref, g_plain) > 0.3  # the penalty term is a large part of what is tested
    grads, _ = _samples(block, u, y, d_prev, cfg, draws=400)
    # must reject: no penalty term, half of it, and 1.5 x the whole
    _assert_unbiased(grads, g_ref, g_plain, 0.5 * (g_ref + g_plain), 1.5 * g_ref)


def test_more_tangents_less_variance():
    torch.manual_seed(13)
    block, shape = _mlp()
    u, y, _ = _inputs(shape, batch=4, seed=4)
    _, g_ref = _reference(block, u, y, None, _cfg())
    mse = {}
    for n in (1, 8):
        grads, _ = _samples(block, u, y, None, _cfg(n=n), draws=120)
        mse[n] = float((grads - g_ref).pow(2).sum(1).mean())
    assert 0.06 < mse[8] / mse[1] < 0.25  # 1/8 expected


def test_per_sample_beats_batch_contraction():
    torch.manual_seed(14)
    block, shape = _mlp()
    u, y, _ = _inputs(shape, batch=8, seed=5)
    _, g_ref = _reference(block, u, y, None, _cfg())
    mse = {}
    for per_sample in (True, False):
        grads, _ = _samples(block, u, y, None, _cfg(n=1, per_sample=per_sample), draws=120)
        mse[per_sample] = float((grads - g_ref).pow(2).sum(1).mean())
    assert mse[True] < 0.5 * mse[False]


# ----------------------------------------------------------------------------- plumbing


def test_second_order_norm_decompositions():
    """The nested pass's norm decompositions: same values as torch, and correct 2nd-order forward AD."""
    torch.manual_seed(15)
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    v1, v2 = torch.randn_like(x), torch.randn_like(x)
    w, b = torch.rand(3, dtype=DT) + 0.5, torch.randn(3, dtype=DT)
    cases = [
        (lambda t: F.batch_norm(t, None, None, w, b, training=True),
         lambda t: decomposed_norms._batch_norm(t, None, None, w, b, training=True)),
        (lambda t: F.layer_norm(t, (5, 5)), lambda t: decomposed_norms._layer_norm(t, (5, 5))),
        (lambda t: F.instance_norm(t, weight=w, bias=b), lambda t: decomposed_norms._instance_norm(t, weight=w, bias=b)),
    ]
    for native, ours in cases:
        assert torch.allclose(native(x), ours(x), atol=1e-12)

        def mixed(op):
            def f(a, c):
                return (op(x + a * v1 + c * v2) ** 3).sum()

            zero, one = torch.zeros((), dtype=DT), torch.ones((), dtype=DT)
            inner = lambda c: torch.func.jvp(lambda a: f(a, c), (zero,), (one,))[1]  # noqa: E731
            with decomposed_norms._DecomposedNorms():
                return torch.func.jvp(inner, (zero,), (one,))[1], f

        value, f = mixed(native)  # native op routed through the decomposition
        h = 1e-4
        fd = (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h * h)
        assert abs(float(value - fd)) < 1e-5 * (1 + abs(float(fd)))


def test_running_stats_updated_once():
    block, shape = _conv_bn()
    twin, _ = _conv_bn()
    u, y, d_prev = _inputs(shape, batch=5)
    with torch.no_grad():
        twin.module(u)
    fg.step(block, u, y, d_prev, _cfg(lam=1.0, n=3), True)
    for name, buf in twin.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.allclose(block.state_dict()[name], buf, atol=1e-14), name


@pytest.mark.parametrize("jets", [True, False], ids=["jets", "torch.func"])
def test_no_backward_through_layers(monkeypatch, jets):
    """Every autograd call differentiates one site layer w.r.t. its own parameters, or the penalty
    w.r.t. the estimated A_k: no gradient ever flows through a chain of layers."""
    monkeypatch.setattr(fg, "use_jets", lambda block, cfg: jets)
    block, shape = _conv_bn()
    u, y, d_prev = _inputs(shape)
    own = {m: {id(p) for p in m.parameters(recurse=False)} for m in block.modules()}
    calls = []
    real_grad = torch.autograd.grad

    def leaves(outputs):
        found, stack, seen = set(), [t.grad_fn for t in outputs if t.grad_fn is not None], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if hasattr(node, "variable"):
                found.add(id(node.variable))
            stack.extend(f for f, _ in node.next_functions)
        return found

    def spy(outputs, inputs, *args, **kwargs):
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        calls.append(leaves(outputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    fg.step(block, u, y, d_prev, _cfg(lam=1.0, n=2), True)
    param_ids = {id(p) for p in block.parameters()}
    per_layer = [ids for ids in calls if ids & param_ids]
    assert len(per_layer) == len(fg._sites(block))  # one call per site call
    for ids in per_layer:
        assert ids <= param_ids and any(ids <= o for o in own.values() if o), "a graph spans several layers"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def _blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return centers[y] + 0.5 * torch.randn(n, 4, generator=g), y


def _two_blocks(seed):
    torch.manual_seed(seed)
    return [
        LocalBlock(nn.Sequential(nn.Linear(4, 16), nn.Tanh()), nn.Linear(16, 3)),
        LocalBlock(nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3)),
    ]


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_localnet_forward_grad_learns(lam):
    net = LocalNet(_two_blocks(0), lam=lam, grad="forward", num_tangents=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    x, y = _blobs()
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        stats = net.train_step(x, y)
        opt.step()
        losses.append(stats.losses[-1])
    assert stats.penalties[0] is None
    assert (stats.penalties[1] is not None and stats.penalties[1] > 0) == (lam > 0)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert stats.accuracies[-1] > 0.8


def test_localnet_backward_default_unchanged():
    """Without ``grad=`` (and with the forward-gradient options set, which it must ignore) a
    step gives the double-backward definition's gradients (tests/reference_sgr.py)."""
    x, y = _blobs(16)
    x = x.double()
    blocks = [b.double() for b in _two_blocks(1)]
    want = sgr_gradients(copy.deepcopy(blocks), x, y, 0.5)
    for options in ({}, {"num_tangents": 3, "fg_per_sample": False}):
        net = LocalNet(copy.deepcopy(blocks), lam=0.5, **options)
        assert net.grad == "backward"
        net.train_step(x, y)
        for block, grads in zip(net.blocks, want):
            for p, g in zip(block.trainable_parameters(), grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"grad": "sideways"}, ValueError, "grad"),
        ({"grad": None}, ValueError, "grad"),
        ({"num_tangents": 0}, ValueError, "num_tangents"),
        ({"num_tangents": -3}, ValueError, "num_tangents"),
        ({"num_tangents": 2.0}, TypeError, "num_tangents"),
        ({"num_tangents": True}, TypeError, "num_tangents"),
        ({"fg_per_sample": "yes"}, TypeError, "fg_per_sample"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LocalNet(_two_blocks(0), lam=0.1, **kwargs)


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.lin(x) * self.scale, x


class _NoBatch(nn.Module):
    """A site whose output drops the batch dimension."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * self.w).sum(0)


def test_bad_models():
    x, y = _blobs(8)
    net = LocalNet([LocalBlock(_TupleOut(), nn.Sequential())], lam=0.0, grad="forward",
                   loss_fn=lambda out, t: out[0].pow(2).mean())
    with pytest.raises(TypeError, match="floating-point tensor"):
        net.train_step(x, y)

    class Head(nn.Module):
        def forward(self, v):
            return v.expand(8, 4)

    net = LocalNet([LocalBlock(_NoBatch(), Head())], lam=0.0, grad="forward",
                   loss_fn=lambda out, t: out.pow(2).mean())
    with pytest.raises(ValueError, match="batch dimension"):
        net.train_step(x, y)
    net = LocalNet([LocalBlock(_NoBatch(), Head())], lam=0.0, grad="forward", fg_per_sample=False,
                   loss_fn=lambda out, t: out.pow(2).mean())
    net.train_step(x, y)  # whole-batch contraction has no batch-dimension requirement

    inorm = LocalBlock(nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.InstanceNorm1d(1, track_running_stats=True),
                                     nn.Flatten()), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="InstanceNorm1d"):
        LocalNet([inorm], lam=0.0, grad="forward").train_step(x, y)


def test_bad_input_and_non_finite():
    net = LocalNet(_two_blocks(0), lam=0.5, grad="forward")
    x, y = _blobs(8)
    with pytest.raises(ValueError, match="y"):
        net.train_step(x, y[:4])
    with pytest.raises(ValueError, match="class indices"):
        net.train_step(x, y + 5)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        net.train_step(bad, y)


def test_custom_loss_per_sample():
    """A non-default mean loss goes through vmap for per-sample losses; still exact in expectation."""
    x, y = _blobs(6)
    block = _two_blocks(2)[0].to(DT)
    x = x.to(DT)

    def loss_fn(logits, t):
        return (logits.log_softmax(1).gather(1, t[:, None]) ** 2).mean()

    cfg = StepConfig(lam=0.0, distance="l2", eps=1e-8, loss_fn=loss_fn, num_tangents=1)
    loss_of = fg._loss_fn(cfg, y, 6)
    logits = block.predict(x)
    assert torch.allclose(loss_of(logits).mean(), loss_fn(logits, y))
