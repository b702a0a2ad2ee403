"""``net(x, y).loss.backward()``: LocalNet in an ordinary training loop (issue 14's contract).

Every engine and the BP-free setting against ``train_step`` in float64 (1e-12), with a scale
factor and two accumulated micro-batches; parameter hooks; no double counting; the
end-to-end trap of a plain ``net(x)``; GradScaler (float64 arithmetic, float16 autocast).
"""
import copy
import math

import pytest
import torch
from torch import nn

import sgr_ext

CLASSES = 5
SETTINGS = [("exact", "backward"), ("fast", "backward"), ("double_backward", "backward"), ("exact", "forward")]


def conv_blocks(dtype=torch.float64, dropout=0.0):
    """Conv + train-mode BatchNorm + ReLU blocks (odd sizes), dropout in the middle block and the last head."""
    def body(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    blocks = [
        sgr_ext.LocalBlock(body(2, 3), sgr_ext.heads.conv_head(3, CLASSES, hidden=6)),
        sgr_ext.LocalBlock(nn.Sequential(body(3, 4), nn.Dropout(dropout)), sgr_ext.heads.conv_head(4, CLASSES, hidden=6)),
        sgr_ext.LocalBlock(nn.Sequential(body(4, 4), nn.MaxPool2d(2)), nn.Sequential(
            nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Dropout(dropout), nn.Linear(6, CLASSES))),
    ]  # the last head has running statistics and draws random numbers: .logits must change neither
    return [b.to(dtype) for b in blocks]


def mlp_blocks(dtype=torch.float64):
    dims = [6, 7, 5, 4]
    return [sgr_ext.LocalBlock(nn.Sequential(nn.Linear(a, b), nn.Tanh()), nn.Linear(b, CLASSES)).to(dtype)
            for a, b in zip(dims[:-1], dims[1:])]


def batch(n=7, dtype=torch.float64, shape=(2, 4, 3)):
    return torch.randn(n, *shape, dtype=dtype), torch.randint(0, CLASSES, (n,))


def twin_nets(blocks, mode, grad, lam=0.6, **extra):
    kw = dict(lam=lam, mode=mode, grad=grad, num_tangents=2, **extra)
    blocks_b = copy.deepcopy(blocks)
    return sgr_ext.LocalNet(blocks, **kw), sgr_ext.LocalNet(blocks_b, **kw)


def assert_grads(net_a, net_b, factor=1.0):
    for (name, p), q in zip(net_a.named_parameters(), net_b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, factor * p.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode, grad", SETTINGS)
@pytest.mark.parametrize("make", ["conv", "mlp"])  # mlp: the forward-gradient engine's jet path
def test_backward_of_loss_adds_train_step_gradients_times_scale(mode, grad, make):
    torch.manual_seed(1)
    blocks = conv_blocks(dropout=0.3) if make == "conv" else mlp_blocks()
    ref, net = twin_nets(blocks, mode, grad)
    x, y = batch(shape=(2, 4, 3) if make == "conv" else (6,))
    torch.manual_seed(2)
    ref_stats = ref.train_step(x, y)
    torch.manual_seed(2)
    out = net(x, y)
    assert all(p.grad is None for p in net.parameters())  # forward puts nothing into p.grad
    (2.5 * out.loss).backward()
    assert_grads(ref, net, 2.5)
    # running statistics updated once, as by train_step (the logits recompute leaves no trace)
    for a, b in zip(ref.buffers(), net.buffers()):
        assert torch.equal(a, b)
    assert out.stats.losses == ref_stats.losses and out.stats.penalties == ref_stats.penalties
    want = sum(l + ref.lam * (r or 0.0) for l, r in zip(ref_stats.losses, ref_stats.penalties))
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float64 and float(out.loss.detach()) == pytest.approx(want, rel=1e-14)
    assert out.logits.shape == (x.shape[0], CLASSES) and not out.logits.requires_grad


@pytest.mark.parametrize("mode", ["exact", "fast", "double_backward"])
@pytest.mark.parametrize("kw", [dict(lam_mode="grad_ratio", distance="l2_rel"), dict(side="output"),
                                dict(side="handback", lam_mode="grad_ratio")])
def test_penalty_options_keep_the_contract(mode, kw):
    torch.manual_seed(1)
    ref, net = twin_nets(conv_blocks(), mode, "backward", **kw)
    x, y = batch()
    ref_stats = ref.train_step(x, y)
    out = net(x, y)
    (0.5 * out.loss).backward()
    assert_grads(ref, net, 0.5)
    assert out.stats.penalty_shares == ref_stats.penalty_shares


@pytest.mark.parametrize("mode, grad", SETTINGS)
def test_two_accumulated_micro_batches(mode, grad):
    torch.manual_seed(1)
    ref, net = twin_nets(conv_blocks(dropout=0.3), mode, grad)
    micro = [batch(5), batch(4)]
    start = [torch.randn_like(p) for p in ref.parameters()]  # a gradient already there is added to
    for p, q, g in zip(ref.parameters(), net.parameters(), start):
        p.grad, q.grad = g.clone(), g.clone()
    torch.manual_seed(3)
    for xb, yb in micro:
        ref.train_step(xb, yb)
    torch.manual_seed(3)  # the same random draws (dropout, forward-gradient tangents) as the two train_steps
    for xb, yb in micro:
        (net(xb, yb).loss / len(micro)).backward()
    for p, q, g in zip(ref.parameters(), net.parameters(), start):
        torch.testing.assert_close(q.grad - g, (p.grad - g) / 2, rtol=0, atol=1e-12)


def test_parameter_hooks_fire_and_see_the_scaled_gradients():
    torch.manual_seed(0)
    ref, net = twin_nets(mlp_blocks(), "exact", "backward")
    x, y = batch(shape=(6,))
    ref.train_step(x, y)
    seen = {}
    for name, p in net.named_parameters():
        p.register_hook(lambda g, name=name: seen.__setitem__(name, g.clone()))
    (3.0 * net(x, y).loss).backward()
    assert set(seen) == {name for name, _ in net.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(seen[name], 3.0 * p.grad, rtol=0, atol=1e-12)


def test_shared_parameters_get_the_step_gradient_once():
    torch.manual_seed(0)
    shared = nn.Linear(4, CLASSES).double()
    blocks = [sgr_ext.LocalBlock(nn.Sequential(nn.Linear(6, 4), nn.Tanh()).double(), shared),
              sgr_ext.LocalBlock(nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double(), shared)]
    ref, net = twin_nets(blocks, "exact", "backward")
    x, y = batch(shape=(6,))
    ref.train_step(x, y)
    net(x, y).loss.backward()
    assert_grads(ref, net)


def test_step_failure_leaves_the_callers_gradients_in_place():
    torch.manual_seed(0)
    net = sgr_ext.LocalNet(mlp_blocks(), lam=0.5)
    before = [torch.randn_like(p) for p in net.parameters()]
    for p, g in zip(net.parameters(), before):
        p.grad = g.clone()
    x, y = batch(shape=(6,))
    x[0, 0] = float("nan")
    with pytest.raises(sgr_ext.NonFiniteError):
        net(x, y)
    for p, g in zip(net.parameters(), before):
        assert torch.equal(p.grad, g)


def test_plain_call_in_training_mode_cannot_train_end_to_end():
    torch.manual_seed(0)
    net = sgr_ext.LocalNet(mlp_blocks(), lam=0.5)
    x, y = batch(shape=(6,))
    logits = net(x)
    torch.testing.assert_close(logits, net.eval()(x), rtol=0, atol=0)  # same numbers as inference
    net.train()
    with pytest.raises(RuntimeError, match=r"END TO END.*net\(x, y\)\.loss\.backward\(\)"):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for p in net.parameters())
    # inference stays plain: eval mode or no_grad give an ordinary tensor without the trap
    with torch.no_grad():
        assert net(x).grad_fn is None
    net.eval()
    torch.nn.functional.cross_entropy(net(x), y).backward()  # eval mode: the user's own business


def test_eval_mode_call_with_labels_only_evaluates():
    torch.manual_seed(0)
    net = sgr_ext.LocalNet(mlp_blocks(), lam=0.5).eval()
    x, y = batch(shape=(6,))
    out = net(x, y)
    assert out.loss.grad_fn is None and all(p.grad is None for p in net.parameters())
    h, want = x, []
    for b in net.blocks:
        h = b(h)
        want.append(float(torch.nn.functional.cross_entropy(b.head(h), y).detach()))
    assert out.stats.losses == pytest.approx(want, rel=1e-14)
    assert float(out.loss) == pytest.approx(sum(want), rel=1e-14)
    torch.testing.assert_close(out.logits, net(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- GradScaler


def test_grad_scaler_arithmetic_is_exact_in_float64():
    torch.manual_seed(0)
    ref, net = twin_nets(conv_blocks(), "exact", "backward")
    x, y = batch()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    for step in range(3):
        opt_ref.zero_grad()
        opt.zero_grad()
        ref.train_step(x, y)
        opt_ref.step()
        scale = scaler.get_scale()
        scaler.scale(net(x, y).loss).backward()
        assert_grads(ref, net, scale)  # the scaler's factor reaches p.grad exactly
        scaler.unscale_(opt)
        assert_grads(ref, net)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 2 * scale  # no inf: the scale grows
        for p, q in zip(ref.parameters(), net.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode, grad", SETTINGS)
def test_float16_autocast_with_grad_scaler_every_engine(mode, grad):
    torch.manual_seed(0)
    net = sgr_ext.LocalNet(conv_blocks(torch.float32), lam=0.5, mode=mode, grad=grad)
    x, y = batch(8, torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # The first step's scaled gradients overflow (as a fresh scaler's 2**16 overflows float16
    # gradients): the scaler must skip that step and leave every weight as it was.
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    for step in range(4):
        before = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = net(x, y)
        assert math.isfinite(float(out.loss.detach()))
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update(2.0 ** 12 if step == 0 else None)
        changed = any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
        if step == 0:
            assert not changed  # skipped by the scaler
        else:
            assert changed and all(torch.isfinite(p).all() for p in net.parameters())


# --------------------------------------------------------------------------- trainer frameworks


def test_lightning_automatic_optimization_with_accumulation():
    lightning = pytest.importorskip("lightning")

    class LitSGR(lightning.LightningModule):  # the README's example
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.net(x, y).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    ref, net = twin_nets(mlp_blocks(), "exact", "backward")
    batches = [batch(5, shape=(6,)) for _ in range(4)]
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 4, 2):  # two optimizer steps of two accumulated micro-batches each
        opt.zero_grad()
        for xb, yb in batches[i:i + 2]:
            ref.train_step(xb, yb)
        for p in ref.parameters():
            p.grad /= 2
        opt.step()
    trainer = lightning.Trainer(
        max_steps=2, accumulate_grad_batches=2, accelerator="cpu", precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitSGR(net), torch.utils.data.DataLoader(batches, batch_size=None))
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
