"""An independent, plain double-backward computation of every block's SGR gradient.

Written from DESIGN.md §1 without sharing code with the library, so that the
library's engines are checked against the definition, not against themselves.
"""
import torch
import torch.nn.functional as F


def penalty(a, d, distance, eps):
    a, d = a.flatten(1), d.flatten(1)
    if distance == "l2":
        return ((a - d) ** 2).sum(1).mean()
    return (1 - (a * d).sum(1) / (a.norm(dim=1) * d.norm(dim=1) + eps)).mean()


def sgr_gradients(blocks, x, y, lam, distance="l2", eps=1e-8):
    """grad of J_k = l_k + lam * R_k w.r.t. each block's parameters; list of tuples, one per block."""
    batch = x.shape[0]
    grads, h, d_prev = [], x, None
    for k, block in enumerate(blocks):
        u = h.detach().requires_grad_(True)
        out = block.module(u)
        loss = F.cross_entropy(block.head(out), y)
        g_out, g_u = torch.autograd.grad(loss, [out, u], create_graph=True)
        objective = loss
        if k > 0:
            objective = loss + lam * penalty(batch * g_u, d_prev, distance, eps)
        params = [p for p in block.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(objective, params))
        h, d_prev = out.detach(), (batch * g_out).detach()
    return grads
