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
    if distance == "l2_rel":
        return (((a - d) ** 2).sum(1) / ((d ** 2).sum(1) + eps)).mean()
    return (1 - (a * d).sum(1) / (a.norm(dim=1) * d.norm(dim=1) + eps)).mean()


def _combine(g_l, g_r, lam, lam_mode, shares):
    """g_l + lam_k g_r (lam_k = lam |g_l| / |g_r| under "grad_ratio"); the share goes to ``shares``."""
    n_l = torch.cat([g.flatten() for g in g_l]).norm()
    n_r = torch.cat([g.flatten() for g in g_r]).norm()
    lam_k = lam * n_l / n_r if lam_mode == "grad_ratio" else lam
    if shares is not None:
        shares.append(float(lam_k * n_r / n_l))
    return tuple(a + lam_k * b for a, b in zip(g_l, g_r))


def sgr_gradients(blocks, x, y, lam, distance="l2", eps=1e-8, lam_mode="fixed", shares=None):
    """grad of J_k = l_k + lam * R_k w.r.t. each block's parameters; list of tuples, one per block.

    lam_mode="grad_ratio": grad l_k + lam_k grad R_k with lam_k = lam |grad l_k| / |grad R_k|.
    shares: a list that receives |lam_k grad R_k| / |grad l_k| per block (None for block 0)."""
    batch = x.shape[0]
    grads, h, d_prev = [], x, None
    for k, block in enumerate(blocks):
        u = h.detach().requires_grad_(True)
        out = block.module(u)
        loss = F.cross_entropy(block.head(out), y)
        g_out, g_u = torch.autograd.grad(loss, [out, u], create_graph=True)
        params = [p for p in block.parameters() if p.requires_grad]
        if k == 0:
            grads.append(torch.autograd.grad(loss, params))
            if shares is not None:
                shares.append(None)
        else:
            g_l = torch.autograd.grad(loss, params, retain_graph=True)
            g_r = torch.autograd.grad(penalty(batch * g_u, d_prev, distance, eps), params)
            grads.append(_combine(g_l, g_r, lam, lam_mode, shares))
        h, d_prev = out.detach(), (batch * g_out).detach()
    return grads


def _chain(blocks, x, y):
    """One forward per block with its graph kept: (inputs u_k, outputs x_k, losses l_k)."""
    us, outs, losses, h = [], [], [], x
    for block in blocks:
        u = h.detach().requires_grad_(True)
        out = block.module(u)
        us.append(u)
        outs.append(out)
        losses.append(F.cross_entropy(block.head(out), y))
        h = out.detach()
    return us, outs, losses


def output_side_gradients(blocks, x, y, lam, distance="l2", eps=1e-8, lam_mode="fixed", shares=None):
    """LocalNet(side="output"): grad l_k + lam_k grad dist(D_k(theta_k), stop_grad(A_{k+1})) for
    every block but the last (which gets grad l_K). One forward per block, graphs kept.
    shares: receives |lam_k grad R'| / |grad l_k| per boundary (index k+1 for block k's penalty)."""
    batch = x.shape[0]
    us, outs, losses = _chain(blocks, x, y)
    grads = []
    if shares is not None:
        shares.append(None)
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        g_l = torch.autograd.grad(losses[k], params, retain_graph=True)
        if k == len(blocks) - 1:
            grads.append(g_l)
            continue
        a_next = batch * torch.autograd.grad(losses[k + 1], us[k + 1], retain_graph=True)[0]
        d_k = batch * torch.autograd.grad(losses[k], outs[k], create_graph=True)[0]
        g_r = torch.autograd.grad(penalty(d_k, a_next.detach(), distance, eps), params, retain_graph=True)
        grads.append(_combine(g_l, g_r, lam, lam_mode, shares))
    return grads


def handback_gradients(blocks, x, y, lam):
    """LocalNet(side="handback", lam_mode="fixed"): block k < K-1 descends l_k + lam l_{k+1}, the
    latter through x_k only (block k+1's parameters get grad l_{k+1} alone)."""
    us, outs, losses = _chain(blocks, x, y)
    grads = []
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        g = list(torch.autograd.grad(losses[k], params, retain_graph=True))
        if k < len(blocks) - 1:
            (g_next,) = torch.autograd.grad(losses[k + 1], us[k + 1], retain_graph=True)
            g_hand = torch.autograd.grad(outs[k], params, grad_outputs=g_next, retain_graph=True, allow_unused=True)
            g = [a + lam * (b if b is not None else 0) for a, b in zip(g, g_hand)]
        grads.append(g)
    return grads
