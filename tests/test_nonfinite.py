"""Non-finite values in ``LocalNet.train_step``: detection, the raise/skip/warn policies, rollback.

Every engine (exact, fast, double_backward, and the BP-free forward-gradient engine) and every
kind of source: NaN/Inf in the input batch, a non-finite loss (a block whose activations blow
up), a non-finite penalty (an input gradient A_k that is infinite while the loss is finite), a
non-finite boundary gradient D_k, and a non-finite parameter gradient alone (a gradient hook). Whatever the policy, no NaN/Inf may be
left in any ``p.grad`` (nor in BatchNorm running statistics), and an optimizer step afterwards
never makes a weight non-finite.
"""
import copy
import math
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import sgr_ext
from sgr_ext import LocalBlock, LocalNet, NonFiniteError

CLASSES = 3
ENGINES = {
    "exact": dict(mode="exact"),
    "fast": dict(mode="fast"),
    "double_backward": dict(mode="double_backward"),
    "forward": dict(grad="forward"),
}


class Scale(nn.Module):
    """x * scale (a buffer): scale = inf makes the block's activations, and its loss, non-finite."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        return x * self.scale


class SqrtAbs(nn.Module):
    """sqrt(|x|): finite forward, infinite input gradient at the ReLU zeros of the previous block,
    so A_k (and with it the penalty) is non-finite while the loss is not."""

    def forward(self, x):
        return x.abs().sqrt()


def make_blocks(source=None):
    """Three MLP blocks (BatchNorm in block 0); ``source`` plants a non-finite value."""
    b1_body = [nn.Linear(6, 5), nn.Tanh()]
    if source == "penalty":
        b1_body.insert(0, SqrtAbs())
    if source == "loss":
        b1_body.append(Scale())
    blocks = [
        LocalBlock(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), nn.Linear(6, CLASSES)),
        LocalBlock(nn.Sequential(*b1_body), nn.Linear(5, CLASSES)),
        LocalBlock(nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Linear(5, CLASSES)),
    ]
    if source == "loss":
        blocks[1].module[-1].scale.fill_(float("inf"))
    if source == "gradient":
        blocks[2].module[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    return blocks


def batch(source=None):
    x = torch.randn(8, 4)
    y = torch.randint(0, CLASSES, (8,))
    if source == "input-nan":
        x[3, 1] = float("nan")
    if source == "input-inf":
        x[0, 0] = -float("inf")
    return x, y


# what is flagged first, and which blocks are affected, for each source
EXPECTED = {
    "input-nan": (0, "input", [0, 1, 2]),
    "input-inf": (0, "input", [0, 1, 2]),
    "loss": (1, "loss", [1, 2]),
    "penalty": (1, "penalty", [1]),
    "gradient": (2, "gradient", [2]),
}
SOURCES = list(EXPECTED)


def prefill(net):
    """Pre-existing gradients on some parameters (gradient accumulation); others stay None."""
    for i, p in enumerate(net.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)


def state(net):
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    bufs = [b.clone() for b in net.buffers()]
    return grads, bufs


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert torch.equal(x, y)


def block_grads(net, k):
    return [None if p.grad is None else p.grad.clone() for p in net.blocks[k].parameters()]


def all_finite(tensors):
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def net_for(engine, source, policy):
    torch.manual_seed(1)
    blocks = make_blocks(source)
    lam = 0.0 if engine == "plain" else 0.5
    kwargs = ENGINES.get(engine, {})
    return LocalNet(blocks, lam=lam, nonfinite=policy, **kwargs)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("source", SOURCES)
def test_raise_names_block_and_restores_every_grad(engine, source):
    net = net_for(engine, source, "raise")
    prefill(net)
    before = state(net)
    x, y = batch(source)
    block, what, _ = EXPECTED[source]
    with pytest.raises(NonFiniteError, match=f"^block {block}: non-finite {what}") as info:
        net.train_step(x, y)
    assert (info.value.block, info.value.what) == (block, what)
    assert_same(state(net)[0], before[0])  # every p.grad as before the step (None stays None)
    assert_same(state(net)[1], before[1])  # BatchNorm running statistics too


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("source", SOURCES)
def test_skip_restores_every_grad_and_warns(engine, source):
    net = net_for(engine, source, "skip")
    prefill(net)
    before = state(net)
    x, y = batch(source)
    with pytest.warns(RuntimeWarning, match=r"non-finite values in block \d.*step was skipped"):
        stats = net.train_step(x, y)
    assert stats.skipped
    assert stats.nonfinite_blocks == EXPECTED[source][2]
    assert len(stats.losses) == 3
    assert_same(state(net)[0], before[0])
    assert_same(state(net)[1], before[1])


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("source", SOURCES)
def test_warn_restores_only_the_offending_blocks(engine, source):
    net = net_for(engine, source, "warn")
    x, y = batch(source)
    _, _, bad = EXPECTED[source]
    pattern = "non-finite values in " + r"[^,]*, ".join(rf"block {k} \(" for k in bad) + r"[^,]*; those blocks"
    with pytest.warns(RuntimeWarning, match=pattern):
        stats = net.train_step(x, y)
    assert not stats.skipped and stats.nonfinite_blocks == bad
    for k in range(3):
        grads = block_grads(net, k)
        if k in bad:
            assert all(g is None for g in grads), k  # restored to the pre-step None
        else:
            assert all(g is not None for g in grads) and all_finite(grads), k
    assert all_finite(list(net.blocks[0].buffers()))  # BatchNorm statistics (restored where needed)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_warn_keeps_the_good_blocks_gradients_exactly(engine):
    """A NaN gradient in the last block only: blocks 0 and 1 get the same gradients as a clean run."""
    clean = net_for(engine, None, "warn")
    poisoned = net_for(engine, "gradient", "warn")
    poisoned.load_state_dict(clean.state_dict())
    x, y = batch()
    torch.manual_seed(5)
    clean.train_step(x, y)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="block 2 \\(gradient\\)"):
        poisoned.train_step(x, y)
    for k in (0, 1):
        assert_same(block_grads(poisoned, k), block_grads(clean, k))
    assert all(g is None for g in block_grads(poisoned, 2))


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("policy", ["skip", "warn"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_step_after_skip_or_warn_keeps_weights_finite(engine, policy, opt_name):
    """Bad and good batches alternate; weights stay finite, good steps still train."""
    net = net_for(engine, None, policy)
    params = list(net.parameters())
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=0.01)
    for step, source in enumerate(["input-nan", None, "input-inf", None, "input-nan"]):
        x, y = batch(source)
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=step % 2 == 0)  # both zero_grad flavours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stats = net.train_step(x, y)
        assert all_finite([p.grad for p in params])
        opt.step()
        assert all_finite(params), (step, source)
        assert all_finite(list(net.buffers()))
        if source is None:
            assert not stats.nonfinite_blocks
            assert any(not torch.equal(p, b) for p, b in zip(params, before))  # it trained
        else:
            assert stats.nonfinite_blocks == [0, 1, 2]


def test_warn_policy_with_a_block_planted_nan_then_optimizer_steps():
    """The "loss" source under warn: block 0 trains, blocks 1-2 are left alone, weights stay finite."""
    net = net_for("exact", "loss", "warn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    w0 = [p.detach().clone() for p in net.blocks[0].parameters()]
    w12 = [p.detach().clone() for b in net.blocks[1:] for p in b.parameters()]
    for _ in range(3):
        opt.zero_grad()
        with pytest.warns(RuntimeWarning):
            net.train_step(*batch())
        opt.step()
    assert all_finite(list(net.parameters()))
    assert any(not torch.equal(p, w) for p, w in zip(net.blocks[0].parameters(), w0))
    assert all(torch.equal(p, w) for p, w in zip((p for b in net.blocks[1:] for p in b.parameters()), w12))


class PoisonOutputGrad(nn.Module):
    """Identity whose output gradient is NaN: D_k is non-finite while the loss is finite."""

    def forward(self, x):
        y = x * 1.0
        if y.requires_grad:
            y.register_hook(lambda g: torch.full_like(g, float("nan")))
        return y


@pytest.mark.parametrize("engine", ["exact", "fast", "double_backward"])
def test_non_finite_boundary_gradient_is_reported_with_its_block(engine):
    """D_0 is NaN: block 0 is named ("boundary gradient"), block 1's penalty is non-finite too,
    block 2 (finite x_1 and D_1) keeps its gradients under "warn"."""
    blocks = make_blocks()
    blocks[0].module.append(PoisonOutputGrad())
    net = LocalNet(blocks, lam=0.5, nonfinite="raise", **ENGINES[engine])
    x, y = batch()
    with pytest.raises(NonFiniteError, match="^block 0: non-finite boundary gradient"):
        net.train_step(x, y)
    assert all(p.grad is None for p in net.parameters())
    net.nonfinite = "warn"
    with pytest.warns(RuntimeWarning, match=r"block 0 \(boundary gradient/gradient\), block 1 \(penalty"):
        stats = net.train_step(x, y)
    assert stats.nonfinite_blocks == [0, 1] and math.isfinite(stats.losses[0])
    assert all(g is not None for g in block_grads(net, 2)) and all_finite(block_grads(net, 2))


def test_default_policy_is_raise_and_stats_are_clean_when_finite():
    net = LocalNet(make_blocks(), lam=0.5)
    assert net.nonfinite == "raise"
    stats = net.train_step(*batch())
    assert not stats.skipped and stats.nonfinite_blocks == []
    assert all(math.isfinite(v) for v in stats.losses + stats.penalties[1:])
    assert stats.penalties[0] is None


def test_integer_input_has_no_input_flag():
    """Token ids (an Embedding first) are not checked for NaN, and still train."""
    blocks = [
        LocalBlock(nn.Sequential(nn.Embedding(10, 6), nn.Flatten()), nn.Linear(12, CLASSES)),
        LocalBlock(nn.Sequential(nn.Linear(12, 5), nn.Tanh()), nn.Linear(5, CLASSES)),
    ]
    net = LocalNet(blocks, lam=0.3, mode="double_backward")
    stats = net.train_step(torch.randint(0, 10, (4, 2)), torch.randint(0, CLASSES, (4,)))
    assert stats.nonfinite_blocks == []


def test_shared_parameter_is_restored_once():
    """A parameter shared by two blocks is snapshotted once and restored to its pre-step value."""
    shared = nn.Linear(5, CLASSES)
    blocks = [
        LocalBlock(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), shared),
        LocalBlock(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), Scale()), shared),
    ]
    blocks[1].module[-1].scale.fill_(float("nan"))
    net = LocalNet(blocks, lam=0.0, nonfinite="warn")
    shared.weight.grad = torch.ones_like(shared.weight)
    with pytest.warns(RuntimeWarning, match="block 1"):
        net.train_step(*batch())
    assert torch.equal(shared.weight.grad, torch.ones_like(shared.weight))
    assert shared.bias.grad is None
    assert net.blocks[0].module[0].weight.grad is not None


# ------------------------------------------------------------------------------- host syncs

_SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


class _CountSyncs(TorchFunctionMode):
    """Counts the tensor -> Python conversions (each is a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_detection_costs_one_host_sync(engine):
    """Statistics, non-finite flags of all blocks and, with the default cross-entropy, the labels'
    range come back in one transfer: the step's only host sync."""
    blocks = make_blocks()
    ce = LocalNet(copy.deepcopy(blocks), lam=0.5, nonfinite="warn", **ENGINES[engine])
    custom = LocalNet(copy.deepcopy(blocks), lam=0.5, nonfinite="warn", **ENGINES[engine],
                      loss_fn=lambda out, y: nn.functional.mse_loss(out, nn.functional.one_hot(y, CLASSES).to(out.dtype)))
    x, y = batch()
    for net in (custom, ce):
        net.train_step(x, y)  # warm-up (lazy initialisation)
        with _CountSyncs() as counter:
            net.train_step(x, y)
        assert sum(counter.calls.values()) == 1, counter.calls


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("bad", [CLASSES, -1, -100])
def test_out_of_range_label_raises_at_the_read_and_leaves_state_as_before(engine, bad):
    """The label check runs with the step's one read, after the blocks: the blocks see labels
    clamped into range (no kernel may index out of bounds), then every p.grad and BatchNorm
    statistic is put back and the ValueError names y and the range."""
    net = LocalNet(make_blocks(), lam=0.5, **ENGINES[engine])
    x, y = batch()
    net.train_step(x, y)  # p.grad present: the restore must copy them back, not set None
    grads = [p.grad.clone() for p in net.parameters()]
    buffers = [b.clone() for b in net.buffers()]
    y[5] = bad
    lo, hi = min(bad, int(y.min())), max(bad, int(y.max()))
    with pytest.raises(ValueError, match=rf"^y: expected class indices in \[0, {CLASSES}\), got values in \[{lo}, {hi}\]"):
        net.train_step(x, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), buffers))


def test_nonfinite_error_is_a_floating_point_error_with_fields():
    err = NonFiniteError(4, "penalty")
    assert isinstance(err, FloatingPointError)
    assert str(err) == "block 4: non-finite penalty" and err.block == 4 and err.what == "penalty"
    assert sgr_ext.StepStats().skipped is False and sgr_ext.StepStats().nonfinite_blocks == []
