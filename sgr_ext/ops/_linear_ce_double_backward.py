"""The exact double backward of ``linear_cross_entropy`` (the backward's own backward, which the
SGR penalty differentiates through), chunked over rows with the saved per-row lse.

Math (mean; c_i = g / N_valid, 0 on ignored rows; z = x W^T + b; p = softmax(z)):

    dz_i = c_i (p_i - e_{y_i});  dx = dz W;  dW = dz^T x;  db = sum_i dz_i
    given cotangents (gdx, gdW, gdb) of (dx, dW, db):
        Gdz  = gdx W^T + x gdW^T + gdb
        Gz_i = c_i (p_i * Gdz_i - p_i <p_i, Gdz_i>)
        grad_x = Gz W + dz gdW;  grad_W = Gz^T x + dz^T gdx;  grad_b = sum_i Gz_i
        grad_g = sum_i (c_i / g) <p_i - e_{y_i}, Gdz_i>
"sum" has c_i = g, "none" c_i = g_i (and grad_g_i = <p_i - e_{y_i}, Gdz_i>). Everything is
chunked over rows with the saved per-row lse, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from sgr_ext.ops._linear_ce_fused import _empty, _row_scale, _triton, _valid
from sgr_ext._tensor_util import accumulate_dtype

# budget of the float32/float64 working buffers of the (chunked) double backward
DOUBLE_BACKWARD_CHUNK_BYTES = 64 << 20


def double_backward(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index,
                    use_triton, need_g, need_x, need_w, need_b):
    """VJP of (g, x, W, b) -> (dx, dW, db) for cotangents (gdx, gdW, gdb); chunked over rows.

    Runs in the accumulate dtype; the elementwise core is one Triton pass per chunk when
    ``use_triton`` and chunked torch otherwise. No (N, V) buffer: chunks of at most
    DOUBLE_BACKWARD_CHUNK_BYTES. (``lse`` is part of the op contract but each chunk
    renormalises with the lse of its float32/float64 logits.)
    """
    n, h = x.shape
    v = weight.shape[0]
    acc = accumulate_dtype(x.dtype)
    dev = x.device
    need_b = need_b and bias is not None
    c = _row_scale(grad_out, target, reduction, ignore_index, acc)
    valid = _valid(target, ignore_index)
    xa, wa = x.to(acc), weight.to(acc)
    ba = bias.to(acc) if bias is not None else None
    gdxa = gdx.to(acc) if gdx is not None else None
    gdwa = gdw.to(acc) if gdw is not None else None
    gdba = gdb.to(acc) if gdb is not None else None
    grad_x = torch.zeros((n, h), dtype=acc, device=dev) if need_x else None
    grad_w = torch.zeros((v, h), dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    dots = torch.zeros(n, dtype=acc, device=dev)
    if gdxa is not None or gdwa is not None or gdba is not None:
        elem = torch.finfo(acc).bits // 8
        rows = max(1, min(n, DOUBLE_BACKWARD_CHUNK_BYTES // max(1, 2 * v * elem)))
        k = _triton() if use_triton else None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            xc, tc, cc = xa[s:e], target[s:e], c[s:e]
            z = xc @ wa.t()
            if ba is not None:
                z += ba
            gz = torch.zeros_like(z)
            if gdxa is not None:
                gz.addmm_(gdxa[s:e], wa.t())
            if gdwa is not None:
                gz.addmm_(xc, gdwa.t())
            if gdba is not None:
                gz += gdba
            # the chunk holds whole rows: normalise with their own lse (for half inputs the
            # saved one came from rounded logits)
            lse_c = torch.logsumexp(z, dim=1)
            if k is not None:  # z -> dz, gz -> Gz, dots <- <p - e_y, Gdz>
                k.ce_double(z, gz, tc, lse_c, cc, dots[s:e], ignore_index)
                dz = z
            else:
                p = torch.exp(z - lse_c[:, None])
                vc = valid[s:e]
                ysafe = torch.where(vc, tc, torch.zeros_like(tc))[:, None]
                pg = (p * gz).sum(1)
                dots[s:e] = torch.where(vc, pg - gz.gather(1, ysafe)[:, 0], torch.zeros((), dtype=acc, device=dev))
                gz = cc[:, None] * p * (gz - pg[:, None])
                dz = p.mul_(cc[:, None])
                dz.scatter_add_(1, ysafe, -cc[:, None])
            if grad_x is not None:
                grad_x[s:e] = gz @ wa
                if gdwa is not None:
                    grad_x[s:e] += dz @ gdwa
            if grad_w is not None:
                grad_w.addmm_(gz.t(), xc)
                if gdxa is not None:
                    grad_w.addmm_(dz.t(), gdxa[s:e])
            if grad_b is not None:
                grad_b += gz.sum(0)
    grad_g = None
    if need_g:
        if reduction == "none":
            grad_g = dots
        else:
            grad_g = dots.sum()
            if reduction == "mean":
                grad_g = grad_g / valid.sum().to(acc)
        grad_g = grad_g.to(grad_out.dtype)
    return (
        grad_g if grad_g is not None else _empty(grad_out),
        grad_x.to(x.dtype) if grad_x is not None else _empty(x),
        grad_w.to(weight.dtype) if grad_w is not None else _empty(weight),
        grad_b.to(bias.dtype) if grad_b is not None else _empty(x),
    )
