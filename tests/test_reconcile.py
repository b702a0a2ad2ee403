"""reconcile(): values, first and second derivatives against autograd of the plain formula; bad input."""
import pytest
import torch

import sgr_ext
from reference_sgr import penalty


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2, 3, 3), (4, 123)])
def test_value_matches_formula(distance, shape):
    a = torch.randn(shape, dtype=torch.float64)
    d = torch.randn(shape, dtype=torch.float64)
    got = sgr_ext.reconcile(a, d, distance=distance, eps=1e-8)
    assert got.shape == ()
    torch.testing.assert_close(got, penalty(a, d, distance, 1e-8), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_first_and_second_derivatives(distance):
    a = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 2, 3, dtype=torch.float64)
    fn = lambda t: sgr_ext.reconcile(t, d, distance=distance)
    assert torch.autograd.gradcheck(fn, (a,))
    assert torch.autograd.gradgradcheck(fn, (a,))
    g_lib = torch.autograd.grad(fn(a), a, create_graph=True)[0]
    g_ref = torch.autograd.grad(penalty(a, d, distance, 1e-8), a, create_graph=True)[0]
    v = torch.randn_like(a)
    torch.testing.assert_close(g_lib, g_ref)
    h_lib = torch.autograd.grad((g_lib * v).sum(), a)[0]
    h_ref = torch.autograd.grad((g_ref * v).sum(), a)[0]
    torch.testing.assert_close(h_lib, h_ref)


def test_target_is_constant():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    d = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    sgr_ext.reconcile(a, d).backward()
    assert d.grad is None and a.grad is not None


def test_reaches_parameters_through_create_graph():
    lin = torch.nn.Linear(6, 3).double()
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = lin(u).pow(2).sum()
    (a,) = torch.autograd.grad(loss, u, create_graph=True)
    sgr_ext.reconcile(a, torch.randn_like(a)).backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "a, d, kwargs, exc, match",
    [
        (torch.randn(3, 4), torch.randn(3, 5), {}, ValueError, "d: expected the same shape"),
        (torch.randn(3, 4), torch.randn(2, 4), {}, ValueError, "d: expected the same shape"),
        (torch.randint(0, 3, (3, 4)), torch.randn(3, 4), {}, TypeError, "a: expected a real floating-point"),
        (torch.randn(3, 4), torch.randint(0, 3, (3, 4)), {}, TypeError, "d: expected a real floating-point"),
        (torch.randn(3, 4, dtype=torch.complex64), torch.randn(3, 4, dtype=torch.complex64), {}, TypeError, "a: expected a real"),
        (torch.randn(3, 4), torch.randn(3, 4).double(), {}, TypeError, "d: expected the same dtype"),
        (torch.randn(0, 4), torch.randn(0, 4), {}, ValueError, "a: expected a non-empty batch"),
        (torch.randn(()), torch.randn(()), {}, ValueError, "a: expected at least 1"),
        (torch.randn(3, 4), torch.randn(3, 4), {"distance": "l1"}, ValueError, "distance: expected one of"),
        (torch.randn(3, 4), torch.randn(3, 4), {"eps": -1.0}, ValueError, "eps: expected a finite number >= 0"),
        (torch.randn(3, 4), torch.randn(3, 4), {"eps": float("nan")}, ValueError, "eps"),
        (torch.randn(3, 4), torch.randn(3, 4), {"impl": "cuda"}, ValueError, "impl: expected one of"),
        ([1.0, 2.0], torch.randn(2), {}, TypeError, "a: expected a torch.Tensor"),
    ],
)
def test_bad_input(a, d, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sgr_ext.reconcile(a, d, **kwargs)
