"""Penalty strength: the relative distance ``l2_rel``, ``lam_mode="grad_ratio"`` and the
penalty's share of the update (``StepStats.penalty_shares``), every backward engine against
the independent double-backward reference (tests/reference_sgr.py)."""
import copy

import pytest
import torch
from torch import nn

import sgr_ext
from reference_sgr import sgr_gradients
from test_engines import CLASSES, conv_blocks, flat_grads, mlp_blocks, rel, resnet_blocks

MODES_EXACT = ["exact", "double_backward"]


def _reference(blocks, x, y, lam, distance, lam_mode):
    ref = copy.deepcopy(blocks)
    shares = []
    grads = sgr_gradients(ref, x, y, lam, distance, lam_mode=lam_mode, shares=shares)
    return ref, [torch.cat([g.flatten() for g in gs]) for gs in grads], shares


def _run(blocks, x, y, mode, lam, distance, **kw):
    bl = copy.deepcopy(blocks)
    stats = sgr_ext.LocalNet(bl, lam=lam, distance=distance, mode=mode, **kw).train_step(x, y)
    return bl, stats


@pytest.mark.parametrize("mode", MODES_EXACT)
@pytest.mark.parametrize("make", [mlp_blocks, resnet_blocks])
@pytest.mark.parametrize("distance,lam_mode", [("l2_rel", "fixed"), ("l2", "grad_ratio"),
                                                ("l2_rel", "grad_ratio"), ("cosine", "grad_ratio")])
def test_engines_equal_double_backward_float64(mode, make, distance, lam_mode):
    torch.manual_seed(0)
    blocks, x = make()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    lam = 0.3
    ref, want, shares = _reference(blocks, x, y, lam, distance, lam_mode)
    got, stats = _run(blocks, x, y, mode, lam, distance, lam_mode=lam_mode, track_share=True)
    for g, w in zip(flat_grads(got), want):
        assert rel(g, w) < 1e-10
    for b, rb in zip(got, ref):  # running statistics updated once, as in the reference
        for s, r in zip(b.buffers(), rb.buffers()):
            assert torch.equal(s, r)
    assert stats.penalty_shares[0] is None
    for s, r in zip(stats.penalty_shares[1:], shares[1:]):
        assert s == pytest.approx(r, rel=1e-9)
    if lam_mode == "grad_ratio":  # the penalty gets exactly lam of the loss gradient's norm
        assert stats.penalty_shares[1:] == pytest.approx([lam] * (len(blocks) - 1), rel=1e-9)


@pytest.mark.parametrize("distance", ["l2", "l2_rel"])
def test_fast_grad_ratio_within_its_bound(distance):
    torch.manual_seed(1)
    blocks, x = conv_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    _, want, _ = _reference(blocks, x, y, 0.5, distance, "grad_ratio")
    base, _ = _run(blocks, x, y, "exact", 0.0, distance)  # grad l alone: judge the penalty part
    got, stats = _run(blocks, x, y, "fast", 0.5, distance, lam_mode="grad_ratio")
    for g, w, b in list(zip(flat_grads(got), want, flat_grads(base)))[1:]:
        assert rel(g - b, w - b) < 1e-4  # fp64 finite difference: first order in h
    assert stats.penalty_shares[1:] == pytest.approx([0.5] * 2, rel=1e-3)


def test_fixed_mode_without_tracking_reports_no_share_and_is_unchanged():
    torch.manual_seed(2)
    blocks, x = resnet_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    plain, stats = _run(blocks, x, y, "exact", 0.7, "l2")
    tracked, tstats = _run(blocks, x, y, "exact", 0.7, "l2", track_share=True)
    assert stats.penalty_shares == [None, None, None]
    assert all(s is not None and s > 0 for s in tstats.penalty_shares[1:])
    for a, b in zip(flat_grads(plain), flat_grads(tracked)):  # measuring does not change the step
        assert rel(a, b) < 1e-12


def test_lam_zero_has_no_share():
    blocks, x = mlp_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    _, stats = _run(blocks, x, y, "exact", 0.0, "l2", lam_mode="grad_ratio")
    assert stats.penalty_shares == [None, None, None]


def test_reconcile_l2_rel_is_scale_free():
    a, d = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    base = sgr_ext.reconcile(a, d, distance="l2_rel", eps=0.0)
    for c in (1e-6, 3.0, 1e5):
        assert float(sgr_ext.reconcile(a * c, d * c, distance="l2_rel", eps=0.0)) == pytest.approx(float(base), rel=1e-12)
    # and differs from l2 (a mutant that ignores the normalisation fails here)
    assert float(sgr_ext.reconcile(a, d, distance="l2")) != pytest.approx(float(base), rel=1e-3)


def test_bad_strength_arguments():
    blocks, _ = mlp_blocks()
    with pytest.raises(ValueError, match="lam_mode"):
        sgr_ext.LocalNet(blocks, lam=0.1, lam_mode="ratio")
    with pytest.raises(TypeError, match="track_share"):
        sgr_ext.LocalNet(blocks, lam=0.1, track_share=1)
    with pytest.raises(ValueError, match="grad='backward'"):
        sgr_ext.LocalNet(blocks, lam=0.1, lam_mode="grad_ratio", grad="forward")
    with pytest.raises(ValueError, match="distance"):
        sgr_ext.LocalNet(blocks, lam=0.1, distance="l1")


def test_block_without_penalty_path_gets_loss_gradient_only():
    """A block whose output ignores its input: grad R = 0, the share is 0, no NaN from 0/0."""

    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(5, dtype=torch.float64))

        def forward(self, x):
            return self.b.expand(x.shape[0], 5) + 0 * x.sum()

    blocks, x = mlp_blocks()
    blocks[1] = sgr_ext.LocalBlock(Const(), nn.Linear(5, CLASSES).double())
    blocks[2] = sgr_ext.LocalBlock(nn.Linear(5, 4).double(), nn.Linear(4, CLASSES).double())
    y = torch.randint(0, CLASSES, (x.shape[0],))
    _, want, _ = _reference(blocks, x, y, 0.0, "l2", "fixed")
    got, stats = _run(blocks, x, y, "exact", 0.5, "l2", lam_mode="grad_ratio")
    assert rel(flat_grads(got)[1], want[1]) < 1e-12
    assert stats.penalty_shares[1] == 0.0


# ------------------------------------------------------------------ side="output"


@pytest.mark.parametrize("mode", ["exact", "fast", "double_backward"])
@pytest.mark.parametrize("make", [mlp_blocks, resnet_blocks])
@pytest.mark.parametrize("distance,lam_mode", [("l2", "fixed"), ("l2", "grad_ratio"), ("cosine", "grad_ratio")])
def test_output_side_equals_double_backward_float64(mode, make, distance, lam_mode):
    from reference_sgr import output_side_gradients

    torch.manual_seed(3)
    blocks, x = make()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    ref = copy.deepcopy(blocks)
    shares = []
    want = output_side_gradients(ref, x, y, 0.4, distance, lam_mode=lam_mode, shares=shares)
    got, stats = _run(blocks, x, y, mode, 0.4, distance, lam_mode=lam_mode, side="output")
    for g, w in zip(flat_grads(got), want):
        assert rel(g, torch.cat([t.flatten() for t in w])) < 1e-10
    for b, rb in zip(got, ref):  # running statistics updated once (the recompute is frozen)
        for s, r in zip(b.buffers(), rb.buffers()):
            assert torch.equal(s, r)
    assert stats.penalty_shares[0] is None and stats.penalties[0] is None  # no boundary 0
    assert stats.penalty_shares[1:] == pytest.approx(shares[1:], rel=1e-9)
    assert all(p > 0 for p in stats.penalties[1:])


def test_output_side_replays_dropout_and_leaves_the_rng_as_without_replay():
    from reference_sgr import output_side_gradients

    blocks, x = mlp_blocks(dropout=0.3)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    ref = copy.deepcopy(blocks)
    torch.manual_seed(4)
    want = output_side_gradients(ref, x, y, 0.4)
    after_ref = torch.rand(3)
    torch.manual_seed(4)
    got, _ = _run(blocks, x, y, "exact", 0.4, "l2", side="output")
    after = torch.rand(3)
    for g, w in zip(flat_grads(got), want):
        assert rel(g, torch.cat([t.flatten() for t in w])) < 1e-10
    assert torch.equal(after, after_ref)


def test_output_side_refusals():
    blocks, _ = mlp_blocks()
    with pytest.raises(ValueError, match="side"):
        sgr_ext.LocalNet(blocks, lam=0.1, side="both")
    with pytest.raises(ValueError, match="side='handback' needs grad='backward'"):
        sgr_ext.LocalNet(blocks, lam=0.1, side="handback", grad="forward")
    with pytest.raises(ValueError, match="side='output' needs grad='backward'"):
        sgr_ext.LocalNet(blocks, lam=0.1, side="output", grad="forward")
    with pytest.raises(ValueError, match="side='output'"):
        sgr_ext.LocalNet(blocks, lam=0.1, side="output", overlap=True)


@pytest.mark.parametrize("mode", ["exact", "double_backward"])
def test_handback_equals_one_boundary_backprop_float64(mode):
    from reference_sgr import handback_gradients

    torch.manual_seed(5)
    blocks, x = resnet_blocks()
    y = torch.randint(0, CLASSES, (x.shape[0],))
    ref = copy.deepcopy(blocks)
    want = handback_gradients(ref, x, y, 0.6)
    got, stats = _run(blocks, x, y, mode, 0.6, "l2", side="handback")
    for g, w in zip(flat_grads(got), want):
        assert rel(g, torch.cat([t.flatten() for t in w])) < 1e-10
    for b, rb in zip(got, ref):
        for s, r in zip(b.buffers(), rb.buffers()):
            assert torch.equal(s, r)
    assert all(s > 0 for s in stats.penalty_shares[1:])


@pytest.mark.parametrize("side", ["input", "output", "handback"])
def test_saved_bytes_do_not_grow_over_steps(side):
    """Nothing a step saves for backward outlives it, also under the CPU memory meter: a retained
    head graph (handback) and the meter's own reference cycle for never-backpropagated branches
    (the split grad_ratio path) once kept each step's tensors alive (28 MiB after 10 digits steps)."""
    from sgr_ext.memory import PeakMemory
    from sgr_ext.models import DigitsCNN

    torch.manual_seed(6)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    net = sgr_ext.LocalNet(sgr_ext.split(DigitsCNN(10), 4, example_input=x[:2]), lam=1.0, lam_mode="grad_ratio",
                           side=side)
    one, many = PeakMemory(torch.device("cpu")), PeakMemory(torch.device("cpu"))
    with one:
        net.train_step(x, y)
    for _ in range(6):
        with many:
            net.train_step(x, y)
    assert many.peak_bytes <= 1.05 * one.peak_bytes
    assert one.held_bytes == 0 and many.held_bytes == 0
