"""``linear_cross_entropy``'s torch.library custom ops and their autograd formulas.

Ops (namespace ``sgr_ext``, registered with ``torch.library.custom_op`` + ``register_fake`` +
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces them without breaks):

    linear_ce_forward(x, weight, bias?, target, reduction, ignore_index, impl, need_dx, need_dw, need_db)
        -> (loss, lse, dx, dw, db)      dx/dw/db: gradient of the loss for grad_out = 1 when
                                         need_* (the precomputed mode), else empty
    linear_ce_backward(grad_out, x, weight, bias?, target, lse, cache_dx, cache_dw, cache_db,
                       reduction, ignore_index, impl, need_dx, need_dw, need_db) -> (dx, dw, db)
    linear_ce_double_backward(gdx?, gdw?, gdb?, grad_out, x, weight, bias?, target, lse,
                              reduction, ignore_index, impl, need_g, need_x, need_w, need_b)
        -> (grad_grad_out, grad_x, grad_w, grad_b)
    linear_ce_scale_(dx!, dw!, db!, grad_out)   in-place rescale of the precomputed gradient
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from sgr_ext.ops import _backends
from sgr_ext.ops._linear_ce_double_backward import double_backward
from sgr_ext.ops._linear_ce_fused import _cpp, _empty, _reduce, _row_scale, _triton, fused_backward, fused_forward
from sgr_ext._tensor_util import accumulate_dtype, autocast_off


def _loss_shape(x: Tensor, reduction: str) -> tuple:
    return (x.shape[0],) if reduction == "none" else ()


@contextlib.contextmanager
def _no_autocast(x: Tensor):
    """Kernels choose their own precision (autocast must not recast the GEMMs inside them)
    and run on x's device (Triton launches on the current device)."""
    with autocast_off(x.device.type):
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                yield
        else:
            yield


@torch.library.custom_op("sgr_ext::linear_ce_forward", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, reduction: str, ignore_index: int,
    impl: str, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _no_autocast(x):
        if impl == "triton":
            loss, lse, dx, dw, db = fused_forward(x, weight, bias, target, reduction, ignore_index, need_dx,
                                                  need_dw, need_db, check_target=x.device.type == "cuda")
            return loss, lse, dx, dw, db
        if impl == "cpp":
            loss_rows, lse = _cpp().linear_ce_forward(x, weight, bias, target, ignore_index)
            return _reduce(loss_rows, target, reduction, ignore_index), lse, _empty(x), _empty(weight), _empty(x)
    raise ValueError(f"sgr_ext::linear_ce_forward: impl must be 'triton' or 'cpp', got {impl!r}")


@_forward_op.register_fake
def _(x, weight, bias, target, reduction, ignore_index, impl, need_dx, need_dw, need_db):
    acc = accumulate_dtype(x.dtype)
    n, h = x.shape
    v = weight.shape[0]
    return (
        x.new_empty(_loss_shape(x, reduction), dtype=acc),
        x.new_empty((n,), dtype=acc),
        x.new_empty((n, h)) if need_dx else x.new_empty((0,)),
        weight.new_empty((v, h)) if need_dw else weight.new_empty((0,)),
        bias.new_empty((v,)) if (need_db and bias is not None) else x.new_empty((0,)),
    )


def _scale_impl(dx: Tensor, dw: Tensor, db: Tensor, grad_out: Tensor) -> None:
    for t in (dx, dw, db):
        if t.numel() == 0:
            continue
        if _backends.triton_runs_on(t.device):
            _triton().scale_(t, grad_out.reshape(1))
        else:
            t.mul_(grad_out.to(t.dtype))


_scale_op = torch.library.custom_op("sgr_ext::linear_ce_scale_", _scale_impl, mutates_args=("dx", "dw", "db"))


@_scale_op.register_fake
def _(dx, dw, db, grad_out):
    return None


@torch.library.custom_op("sgr_ext::linear_ce_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
    cache_dx: Tensor, cache_dw: Tensor, cache_db: Tensor, reduction: str, ignore_index: int, impl: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    need_db = need_db and bias is not None
    cached = (
        (not need_dx or cache_dx.numel() > 0)
        and (not need_dw or cache_dw.numel() > 0)
        and (not need_db or cache_db.numel() > 0)
        and reduction != "none"
    )
    if cached:
        def scaled(t: Tensor) -> Tensor:
            return (t.to(grad_out.dtype) * grad_out).to(t.dtype) if t.numel() else _empty(t)

        return (
            scaled(cache_dx) if need_dx else _empty(x),
            scaled(cache_dw) if need_dw else _empty(weight),
            scaled(cache_db) if need_db else _empty(x),
        )
    with _no_autocast(x):
        c = _row_scale(grad_out, target, reduction, ignore_index, accumulate_dtype(x.dtype))
        if impl == "triton":
            return fused_backward(c, x, weight, bias, target, lse, ignore_index, need_dx, need_dw, need_db)
        if impl == "cpp":
            dx, dw, db = _cpp().linear_ce_backward(x, weight, bias, target, ignore_index, lse, c.contiguous(),
                                                   need_dx, need_dw, need_db)
            return dx, dw, db
    raise ValueError(f"sgr_ext::linear_ce_backward: impl must be 'triton' or 'cpp', got {impl!r}")


@_backward_op.register_fake
def _(grad_out, x, weight, bias, target, lse, cache_dx, cache_dw, cache_db, reduction, ignore_index, impl,
      need_dx, need_dw, need_db):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,)),
        bias.new_empty(bias.shape) if (need_db and bias is not None) else x.new_empty((0,)),
    )


@torch.library.custom_op("sgr_ext::linear_ce_double_backward", mutates_args=())
def _double_backward_op(
    gdx: Optional[Tensor], gdw: Optional[Tensor], gdb: Optional[Tensor], grad_out: Tensor, x: Tensor,
    weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, reduction: str, ignore_index: int,
    impl: str, need_g: bool, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    use_triton = impl == "triton" and _backends.triton_runs_on(x.device)
    with _no_autocast(x):
        return double_backward(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index,
                               use_triton, need_g, need_x, need_w, need_b)


@_double_backward_op.register_fake
def _(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index, impl, need_g, need_x,
      need_w, need_b):
    return (
        grad_out.new_empty(grad_out.shape) if need_g else grad_out.new_empty((0,)),
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_w else weight.new_empty((0,)),
        bias.new_empty(bias.shape) if (need_b and bias is not None) else x.new_empty((0,)),
    )


# ------------------------------------------------------------------------------ autograd


def _opt(t: Tensor, needed: bool) -> Optional[Tensor]:
    return t if needed else None


def _forward_setup(ctx, inputs, output):
    x, weight, bias, target, reduction, ignore_index, impl, need_dx, need_dw, need_db = inputs
    _, lse, cdx, cdw, cdb = output
    ctx.mark_non_differentiable(lse, cdx, cdw, cdb)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, target, lse, cdx, cdw, cdb)
    ctx.args = (reduction, ignore_index, impl)
    ctx.has_cache = need_dx or need_dw or need_db
    ctx.consumed = False


def _forward_backward(ctx, g_loss, *_unused):
    nx, nw, nb = ctx.needs_input_grad[:3]
    if g_loss is None or not (nx or nw or nb):
        return (None,) * 10
    x, weight, bias, target, lse, cdx, cdw, cdb = ctx.saved_tensors
    reduction, ignore_index, impl = ctx.args
    eager = type(cdx) is Tensor and not torch.compiler.is_compiling()  # not traced (fake/functional)
    if ctx.has_cache and not ctx.consumed and not torch.is_grad_enabled() and eager:
        # first-order backward of the precomputed mode: rescale in place and hand the
        # buffers over (no copy; nothing at all when g == 1). A second call (retain_graph)
        # recomputes from the saved lse instead.
        # ``.data``: the saved tensors' version counters stay untouched, so a retained graph
        # can still be unpacked (and then recomputes, see above).
        ctx.consumed = True
        cdx, cdw, cdb = cdx.data, cdw.data, cdb.data
        _scale_op(cdx, cdw, cdb, g_loss)
        return (_opt(cdx, nx), _opt(cdw, nw), _opt(cdb, nb and bias is not None)) + (None,) * 7
    if not ctx.has_cache or ctx.consumed:
        cdx = cdw = cdb = _empty(x)
    dx, dw, db = _backward_op(g_loss, x, weight, bias, target, lse, cdx.detach(), cdw.detach(), cdb.detach(),
                              reduction, ignore_index, impl, nx, nw, nb and bias is not None)
    return (_opt(dx, nx), _opt(dw, nw), _opt(db, nb and bias is not None)) + (None,) * 7


torch.library.register_autograd("sgr_ext::linear_ce_forward", _forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    (grad_out, x, weight, bias, target, lse, _cdx, _cdw, _cdb, reduction, ignore_index, impl,
     need_dx, need_dw, need_db) = inputs
    ctx.save_for_backward(grad_out, x, weight, bias, target, lse)
    ctx.args = (reduction, ignore_index, impl)
    ctx.outs = (need_dx, need_dw, need_db and bias is not None)
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, gdx, gdw, gdb):
    ng, nx, nw, nb = ctx.needs_input_grad[:4]
    grad_out, x, weight, bias, target, lse = ctx.saved_tensors
    reduction, ignore_index, impl = ctx.args
    odx, odw, odb = ctx.outs
    gdx = gdx if (odx and gdx is not None) else None
    gdw = gdw if (odw and gdw is not None) else None
    gdb = gdb if (odb and gdb is not None) else None
    if gdx is None and gdw is None and gdb is None:
        return (None,) * 15
    gg, gx, gw, gb = _double_backward_op(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction,
                                         ignore_index, impl, ng, nx, nw, nb and bias is not None)
    return (_opt(gg, ng), _opt(gx, nx), _opt(gw, nw), _opt(gb, nb and bias is not None)) + (None,) * 11


torch.library.register_autograd("sgr_ext::linear_ce_backward", _backward_backward, setup_context=_backward_setup)
