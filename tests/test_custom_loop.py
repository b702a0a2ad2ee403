"""The README's "your own loop" example gives the same gradients as LocalNet.train_step."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import sgr_ext


def readme_loop_step(modules, heads, x, y, lam):
    # --- the loop body shown in README.md ("Use it in your own loop") ---
    h, d_prev, B = x, None, x.shape[0]
    for k, (f, g) in enumerate(zip(modules, heads)):
        u = h.detach().requires_grad_(k > 0)
        out = f(u)
        loss = F.cross_entropy(g(out), y)
        g_out, *g_in = torch.autograd.grad(loss, [out] + [u] * (k > 0), create_graph=k > 0, retain_graph=True)
        J = loss if k == 0 else loss + lam * sgr_ext.reconcile(B * g_in[0], d_prev)
        J.backward(inputs=[*f.parameters(), *g.parameters()])
        h, d_prev = out.detach(), (B * g_out).detach()


def test_readme_loop_equals_local_net():
    modules = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]
    heads = [nn.Linear(8, 4) for _ in range(3)]
    blocks = [sgr_ext.LocalBlock(copy.deepcopy(f), copy.deepcopy(g)) for f, g in zip(modules, heads)]
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    readme_loop_step(modules, heads, x, y, lam=0.3)
    sgr_ext.LocalNet(blocks, lam=0.3).train_step(x, y)
    for (f, g), b in zip(zip(modules, heads), blocks):
        for p, q in zip([*f.parameters(), *g.parameters()], b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
