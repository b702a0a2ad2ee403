"""``LocalNet(verify=True)``: the first-step check of the engine against double backward."""
import copy

import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext.engine import dual, verify
from sgr_ext.engine.dual import modules as dual_modules

CLASSES = 3


def _blocks():
    torch.manual_seed(0)
    blocks = [
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, CLASSES)),
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2)),
                           nn.Linear(6, CLASSES)),
    ]
    return [b.double() for b in blocks]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (12,), generator=g)


def _drop_tanh_tangent(x):
    """A wrong rule: tanh's primal with a zero tangent (what an unhandled op used to give)."""
    if not isinstance(x, dual.Dual):
        return torch.tanh(x)
    p = torch.tanh(x.primal)
    return dual.Dual(torch.stack([p, torch.zeros_like(p)]))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_verify_leaves_the_step_unchanged(mode):
    x, y = _batch()
    nets = [sgr_ext.LocalNet(copy.deepcopy(_blocks()), lam=0.5, mode=mode, verify=v) for v in (True, False)]
    for net in nets:
        torch.manual_seed(5)  # the dropout draws of the step
        net.train_step(x, y)
        net.after = torch.rand(1)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p.grad, q.grad)
    for a, b in zip(nets[0].buffers(), nets[1].buffers()):
        assert torch.equal(a, b)  # running statistics updated once, by the step itself
    assert torch.equal(nets[0].after, nets[1].after)  # the same random numbers consumed


def test_verify_names_the_block_whose_engine_is_wrong(monkeypatch):
    rules = [(nn.Tanh, lambda m, x: _drop_tanh_tangent(x)) if types is nn.Tanh else (types, rule)
             for types, rule in dual_modules.MODULE_RULES]
    monkeypatch.setattr(dual_modules, "MODULE_RULES", rules)
    x, y = _batch()
    net = sgr_ext.LocalNet(_blocks(), lam=0.5, verify=True)
    with pytest.raises(verify.EngineMismatch, match="block 1: mode='exact'") as info:
        net.train_step(x, y)
    assert info.value.block == 1 and info.value.error > 0.01
    sgr_ext.LocalNet(_blocks(), lam=0.5).train_step(x, y)  # without the check: a plausible, wrong step


def test_verify_runs_once_and_again_when_a_block_changes(monkeypatch):
    calls = []
    real = verify.check
    monkeypatch.setattr(verify, "check", lambda k, *a: calls.append(k) or real(k, *a))
    x, y = _batch()
    net = sgr_ext.LocalNet(_blocks(), lam=0.5, verify=True)
    net.train_step(x, y)
    net.train_step(x, y)
    assert calls == [1]  # block 0 has no penalty; a block is checked once
    net.blocks[1].module[2] = nn.GELU()
    net.train_step(x, y)
    assert calls == [1, 1]
    net.blocks[1].module.eval()  # another code path (running statistics): checked again
    net.train_step(x, y)
    assert calls == [1, 1, 1]
    sgr_ext.LocalNet(_blocks(), lam=0.0, verify=True).train_step(x, y)  # plain local: nothing to check
    assert calls == [1, 1, 1]


def test_verify_must_be_a_bool():
    with pytest.raises(TypeError, match="verify"):
        sgr_ext.LocalNet(_blocks(), lam=0.5, verify="yes")
