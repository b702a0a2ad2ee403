"""Dual-interpreter rules that used to be silently wrong (issue #13): tensor-valued
attributes, InstanceNorm, SyncBatchNorm across processes, the float64 LeakyReLU slope."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sgr_ext.engine import dual


class _Attr(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.lin = nn.Linear(4, 4)

    def forward(self, x):  # x: (B, T, D) tokens
        if self.name == "mT":
            return torch.tanh(self.lin(x.mT)).mT
        if self.name == "T":  # on a (B, D) matrix
            return (self.lin(x[:, 0]).T * 1.5).T
        if self.name == "mH":
            return self.lin(x.mH).mH
        return self.lin(x.real)


def _jvp_and_dual(m, x, t):
    ref = copy.deepcopy(m)
    with dual.frozen_norm_stats(ref):
        p_ref, t_ref = torch.func.jvp(ref, (x,), (t,))
    with dual.frozen_norm_stats(m):
        out = dual.run_module(m, dual.pack(x, t))
    return out, p_ref, t_ref


@pytest.mark.parametrize("name", ["mT", "T", "mH", "real"])
def test_tensor_attributes_carry_the_tangent(name):
    m = _Attr(name).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    out, p_ref, t_ref = _jvp_and_dual(m, x, t)
    torch.testing.assert_close(out.primal, p_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.tangent, t_ref, rtol=1e-12, atol=1e-14)


class _Data(nn.Module):
    def forward(self, x):
        return x.data * 2.0  # the primal alone: no tangent rule can exist


def test_other_tensor_attributes_are_refused_by_name():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(dual.UnsupportedOpError, match=r"\.data"):
        dual.run_module(_Data(), dual.pack(x, torch.ones_like(x)))


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("cls,shape", [(nn.InstanceNorm1d, (5, 3, 7)), (nn.InstanceNorm2d, (5, 3, 4, 3)),
                                       (nn.InstanceNorm3d, (4, 3, 2, 3, 2))])
def test_instance_norm_tangent_gradients_and_frozen_statistics(cls, shape, track):
    """Tangent = J t, parameter gradients of <p, gp> + <J t, gt> as double backward gives them,
    running statistics untouched by the recompute."""
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 3]
    m = nn.Sequential(conv(3, 3, 1), cls(3, affine=True, track_running_stats=track)).double().train()
    x = torch.randn(*shape, dtype=torch.float64)
    t = torch.randn_like(x)
    ref = copy.deepcopy(m)
    with dual.frozen_norm_stats(ref):
        u = x.clone().requires_grad_()
        out_ref = ref(u)
        gp, gt = torch.randn_like(out_ref), torch.randn_like(out_ref)
        (vjp,) = torch.autograd.grad(out_ref, u, gt, create_graph=True)
        want = torch.autograd.grad((out_ref * gp).sum() + (vjp * t).sum(), list(ref.parameters()))
    before = [b.clone() for b in m.buffers()]
    out, p_ref, t_ref = _jvp_and_dual(m, x, t)
    torch.testing.assert_close(out.tangent, t_ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((out.primal * gp).sum() + (out.tangent * gt).sum(), list(m.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(m.buffers(), before):
        assert torch.equal(a, b)


def test_frozen_norm_stats_freezes_instance_norm_in_a_plain_forward():
    """The fast engine's perturbed forward is a plain forward under ``frozen_norm_stats``."""
    m = nn.InstanceNorm2d(3, track_running_stats=True).train()
    before = [b.clone() for b in m.buffers()]
    with dual.frozen_norm_stats(m):
        m(torch.randn(4, 3, 5, 5))
    for a, b in zip(m.buffers(), before):
        assert torch.equal(a, b)
    assert m.running_mean is not None and m.track_running_stats  # restored


def test_sync_batchnorm_across_processes_is_refused(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "group", type("G", (), {"WORLD": None}))
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3), nn.ReLU()).double().train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(dual.UnsupportedOpError, match="SyncBatchNorm"):
        with dual.frozen_norm_stats(m):
            dual.run_module(m, dual.pack(x, torch.ones_like(x)))


def test_sync_batchnorm_in_one_process_is_batchnorm():
    m = nn.SyncBatchNorm(3).double().train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.randn_like(x)
    out, p_ref, t_ref = _jvp_and_dual(m, x, t)
    torch.testing.assert_close(out.tangent, t_ref, rtol=1e-10, atol=1e-12)


def test_leaky_relu_slope_in_float64():
    m = nn.LeakyReLU(0.2).double()
    x = torch.randn(50, dtype=torch.float64)
    t = torch.randn_like(x)
    out, p_ref, t_ref = _jvp_and_dual(m, x, t)
    assert torch.equal(out.primal, p_ref) and torch.equal(out.tangent, t_ref)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed_hw"])
def test_dual_batchnorm_triton_multi_tile_any_layout(layout):
    """Several row tiles (n*H*W = 780 >= 3 x BLOCK_P), a partial channel tile (C = 67, not a
    multiple of BLOCK_C) and several finalize programs (C > 64), in every layout: an output
    whose (2n, C, S) view would be a copy (H, W transposed) must still be written."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from sgr_ext.kernels import dual_batchnorm as kernels

    assert kernels._blocks(67, 780) == (256, 16) and kernels._finalize_blocks(67)[1] < 67
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shape = (8, 67, 13, 15)
    z64 = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.7).to(dev)
    g64 = torch.randn(*shape, dtype=torch.float64).to(dev)
    w64, b64 = torch.randn(67, dtype=torch.float64).to(dev), torch.randn(67, dtype=torch.float64).to(dev)

    def arrange(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed_hw":
            return t.transpose(2, 3).contiguous().transpose(2, 3)  # same values, H/W strides swapped
        return t

    def go(dtype, force):
        dual._TRITON_FORCE = force
        try:
            z = arrange(z64.to(dtype)).requires_grad_()
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            w, b = w64.to(acc).clone().requires_grad_(), b64.to(acc).clone().requires_grad_()
            out = dual.DualBatchNorm.apply(z, w, b, 1e-5, True)
            out.backward(arrange(g64.to(dtype)))
            return [t.double() for t in (out, z.grad, w.grad, b.grad)]
        finally:
            dual._TRITON_FORCE = False

    for got, want in zip(go(torch.float32, True), go(torch.float64, False)):
        assert float((got - want).norm() / want.norm()) < 1e-5
