"""The program builder and interpreter: a module traced once with ``torch.fx`` (last uses,
BN -> ReLU (-> conv) fusions, in-place ReLUs), run node by node on dual values; the dual
loss; and ``frozen_norm_stats`` for recomputed forwards."""
from __future__ import annotations

import operator
import weakref
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sgr_ext.engine.dual.batchnorm import DualBNReLUConv, _batch_stats, _rule_batchnorm
from sgr_ext.engine.dual.conv import _fusable_conv
from sgr_ext.engine.dual.elementwise import _relu
from sgr_ext.engine.dual.fallback import _fallback, _fallback_method
from sgr_ext.engine.dual.functions import FUNCTION_RULES, _method
from sgr_ext.engine.dual.modules import _call_module
from sgr_ext.engine.dual.value import Dual, _has_dual, _is_dual, _with_bias
from sgr_ext._tensor_util import accumulate_dtype


def _bn_relu_conv(bn: nn.Module, conv: nn.Module, x):
    """BN(train) -> ReLU -> conv on a dual value, with the conv input recomputed in backward."""
    if not isinstance(x, Dual) or not _batch_stats(bn):
        return _call_module(conv, (_rule_batchnorm(bn, x, relu=True),), {})
    out = DualBNReLUConv.apply(x.z, bn.weight, bn.bias, bn.eps, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    return Dual(_with_bias(Dual.from_z(out).P, conv.bias, 1))


_RELU_FUNCS = (torch.relu, F.relu)


def _is_relu_node(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


class _Program:
    """A traced module: its fx graph, the last use of every value, and BN->ReLU fusions."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        self.nodes = list(graph.nodes)
        last_use: dict[fx.Node, fx.Node] = {}
        for node in reversed(self.nodes):
            for inp in node.all_input_nodes:
                last_use.setdefault(inp, node)
        self.free_after: dict[fx.Node, list[fx.Node]] = {}
        for value, user in last_use.items():
            self.free_after.setdefault(user, []).append(value)
        self.fuse: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            if not isinstance(root.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
                continue
            (user,) = node.users
            if _is_relu_node(user, root) and user.args and user.args[0] is node and len(user.all_input_nodes) == 1:
                self.fuse[node] = user
        # BN -> ReLU -> conv (the ReLU feeding only the conv): recompute the conv input
        self.fuse_conv: dict[fx.Node, fx.Node] = {}
        for bn, relu in self.fuse.items():
            if len(relu.users) != 1:
                continue
            (user,) = relu.users
            if (
                user.op == "call_module"
                and len(user.args) == 1
                and user.args[0] is relu
                and not user.kwargs
                and _fusable_conv(root.get_submodule(user.target))
            ):
                self.fuse_conv[bn] = user
        # a ReLU whose input is a fresh sum used nowhere else can run in place
        self.inplace_relu: set = set()
        for node in self.nodes:
            if not _is_relu_node(node, root) or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            if len(src.users) == 1 and (
                (src.op == "call_function" and src.target in (operator.add, operator.iadd, torch.add))
                or (src.op == "call_method" and src.target in ("add", "__add__"))
            ):
                self.inplace_relu.add(node)


_PROGRAMS: "weakref.WeakKeyDictionary[nn.Module, Optional[_Program]]" = weakref.WeakKeyDictionary()


def _program(module: nn.Module) -> Optional[_Program]:
    if module in _PROGRAMS:
        return _PROGRAMS[module]
    try:
        prog = _Program(module, fx.Tracer().trace(module))
    except Exception:  # control flow on values, unsupported Python: run it whole under forward AD
        prog = None
    _PROGRAMS[module] = prog
    return prog


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _load(arg, env: dict):
    """``fx.node.map_arg(arg, env.__getitem__)`` for the containers fx puts in node arguments,
    as plain tuples / lists / dicts (map_arg's generic walk is a measurable share of the
    interpreter's time per node)."""
    if isinstance(arg, fx.Node):
        return env[arg]
    if isinstance(arg, tuple):
        return tuple(_load(a, env) for a in arg)
    if isinstance(arg, list):
        return [_load(a, env) for a in arg]
    if isinstance(arg, dict):
        return {k: _load(v, env) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_load(arg.start, env), _load(arg.stop, env), _load(arg.step, env))
    return arg


def run_module(module: nn.Module, x: Dual):
    """The dual forward of ``module`` on ``x``: its primal output and tangent, packed."""
    prog = _program(module)
    if prog is None:
        return _fallback(module, (x,), {})
    env: dict[fx.Node, Any] = {}
    inputs = iter([x])
    skip: set = set()
    result = None
    for node in prog.nodes:
        if node in skip:
            pass
        elif node.op == "placeholder":
            try:
                env[node] = next(inputs)
            except StopIteration:  # optional arguments keep their defaults
                env[node] = node.args[0] if node.args else None
        elif node.op == "get_attr":
            env[node] = _attr(module, node.target)
        elif node.op == "output":
            result = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            args = _load(node.args, env)
            kwargs = _load(node.kwargs, env) if node.kwargs else {}
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                relu_user = prog.fuse.get(node)
                conv_user = prog.fuse_conv.get(node)
                if conv_user is not None and len(args) == 1 and not kwargs:
                    env[conv_user] = _bn_relu_conv(sub, module.get_submodule(conv_user.target), args[0])
                    skip.update((relu_user, conv_user))
                    env[node] = None
                elif relu_user is not None and len(args) == 1 and not kwargs:
                    env[relu_user] = _rule_batchnorm(sub, args[0], relu=True)
                    skip.add(relu_user)
                    env[node] = None
                elif node in prog.inplace_relu and len(args) == 1 and isinstance(args[0], Dual):
                    env[node] = _relu(args[0], inplace=True)
                else:
                    env[node] = _call_module(sub, args, kwargs)
            elif node.op == "call_function":
                if not _has_dual((args, kwargs)):
                    env[node] = node.target(*args, **kwargs)
                elif node in prog.inplace_relu and isinstance(args[0], Dual):
                    env[node] = _relu(args[0], inplace=True)
                else:
                    rule = FUNCTION_RULES.get(node.target)
                    env[node] = rule(*args, **kwargs) if rule is not None else _fallback(node.target, args, kwargs)
            elif node.op == "call_method":
                self_, rest = args[0], args[1:]
                if _is_dual(self_):
                    env[node] = _method(self_, node.target, rest, kwargs)
                elif _has_dual((rest, kwargs)):
                    env[node] = _fallback_method(self_, node.target, rest, kwargs)
                else:
                    env[node] = getattr(self_, node.target)(*rest, **kwargs)
                if node.target.endswith("_") and not node.target.startswith("__") and isinstance(node.args[0], fx.Node):
                    env[node.args[0]] = env[node]  # in-place method: later uses see the new value
        for value in prog.free_after.get(node, ()):
            env.pop(value, None)  # free every activation after its last use
    return result


def dual_loss(logits: Dual, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, l_dot): the loss at the primal logits and its derivative along the tangent.

    Closed form for the default ``F.cross_entropy`` (mean reduction):
    l_dot = mean_i <softmax(z_i) - onehot(y_i), t_i>, accumulated in float32/float64.
    Any other ``loss_fn``: l_dot = <dl/dz, t> with dl/dz from a create_graph backward
    through the loss alone (the logits are small; no graph through the network).
    """
    if not isinstance(logits, Dual):
        raise TypeError(f"head output: expected a tensor depending on the block input, got {type(logits).__name__}")
    p, t = logits.primal, logits.tangent
    if loss_fn is F.cross_entropy and p.dim() == 2:
        loss = F.cross_entropy(p, y)
        acc = accumulate_dtype(p.dtype)
        pf, tf = p.to(acc), t.to(acc)
        prob = torch.softmax(pf, dim=1)
        ldot = ((prob * tf).sum(dim=1) - tf.gather(1, y.view(-1, 1)).squeeze(1)).mean()
        return loss, ldot
    if not p.requires_grad:
        p = p.detach().requires_grad_(True)
    loss = loss_fn(p, y)
    if not loss.requires_grad:
        return loss, torch.zeros((), dtype=loss.dtype, device=loss.device)
    (gz,) = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True)
    if gz is None:
        return loss, torch.zeros((), dtype=loss.dtype, device=loss.device)
    acc = accumulate_dtype(p.dtype)
    return loss, (gz.to(acc) * t.to(acc)).sum()


# --------------------------------------------------------------------------- BN statistics


_NORMS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _norms(module: nn.Module) -> list:
    if module not in _NORMS:
        _NORMS[module] = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return _NORMS[module]


class frozen_norm_stats:
    """Context: train-mode norm layers of ``modules`` use batch statistics without updating
    their running statistics (or ``num_batches_tracked``): a recomputed forward must not
    count twice. BatchNorm: ``track_running_stats`` off. InstanceNorm hands its buffers to
    ``F.instance_norm`` whatever that flag says, so its buffers are hidden as well."""

    def __init__(self, *modules: nn.Module):
        self.norms = [m for mod in modules for m in _norms(mod)]

    def __enter__(self):
        self.saved = [(m, m.track_running_stats, m.running_mean, m.running_var) for m in self.norms if m.training]
        for m, *_ in self.saved:
            m.track_running_stats = False
            if isinstance(m, nn.modules.instancenorm._InstanceNorm):
                m.running_mean = m.running_var = None
        return self

    def __exit__(self, *exc):
        for m, flag, mean, var in self.saved:
            m.track_running_stats = flag
            if isinstance(m, nn.modules.instancenorm._InstanceNorm):
                m.running_mean, m.running_var = mean, var
        return False
