"""``split``: cut a model into K ``LocalBlock``s at computed, balanced points."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from sgr_ext import _checks
from sgr_ext.blocks import LocalBlock
from sgr_ext.heads import default_head

HeadFactory = Callable[[Sequence[int], int], nn.Module]
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
BALANCES = ("activations", "params")


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == nn.ReLU.__module__


def model_units(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The ordered units a split may cut between, and the classifier tail.

    A model may define ``local_units() -> (units, classifier)``. For an ``nn.Sequential``
    the classifier is the last child with parameters plus the parameter-free children
    at the end and just before it that are not activations (pool, flatten, dropout);
    every other weight layer starts a unit, and normalisation or parameter-free
    children join the unit before them.
    """
    if hasattr(model, "local_units"):
        units, classifier = model.local_units()
        return list(units), classifier
    from sgr_ext.adapters import torchvision_units  # torchvision ResNet / VisionTransformer

    found = torchvision_units(model)
    if found is not None:
        return found
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model: expected an nn.Sequential or a module with local_units(), got {type(model).__name__}"
        )
    children = list(model)
    with_params = [i for i, c in enumerate(children) if _has_params(c)]
    if not with_params:
        raise ValueError("model: expected at least one child with parameters to serve as the classifier")
    start = with_params[-1]
    while start > 0 and not _has_params(children[start - 1]) and not _is_activation(children[start - 1]):
        start -= 1
    groups: list[list[nn.Module]] = []
    for child in children[:start]:
        joins = groups and (not _has_params(child) or isinstance(child, _NORMS))
        if joins:
            groups[-1].append(child)
        elif groups and not _has_params(nn.Sequential(*groups[-1])):
            groups[-1].append(child)  # leading parameter-free children join the first weight layer
        else:
            groups.append([child])
    units = [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]
    tail = children[start:]
    return units, tail[0] if len(tail) == 1 else nn.Sequential(*tail)


def balanced_partition(costs: Sequence[float], k: int) -> list[int]:
    """Cut points of ``costs`` into k contiguous non-empty groups minimising the largest group sum.

    Returns k+1 indices 0 = c_0 < c_1 < ... < c_k = len(costs).
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: minimal max-group cost of splitting the first i units into j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    points = [n]
    for j in range(k, 0, -1):
        points.append(cut[j][points[-1]])
    return points[::-1]


def _example_input(model: nn.Module, units: list[nn.Module], example_input) -> torch.Tensor:
    if example_input is not None:
        _checks.tensor("example_input", example_input)
        _checks.batch("example_input", example_input)
        return example_input
    shape = getattr(model, "input_shape", None)
    if shape is None:
        first = next((m for u in units for m in u.modules() if isinstance(m, nn.Linear)), None)
        first_param = next((m for u in units for m in u.modules() if list(m.parameters(recurse=False))), None)
        if first is None or first is not first_param:
            raise ValueError(
                "example_input: required to infer activation shapes; pass a (B, ...) batch "
                "or give the model an input_shape attribute"
            )
        shape = (first.in_features,)
    param = next(model.parameters())
    return torch.zeros(2, *shape, dtype=param.dtype, device=param.device)


@torch.no_grad()
def _probe_shapes(units, classifier, x) -> tuple[list[torch.Size], int]:
    shapes = []
    for u in units:
        x = u(x)
        shapes.append(x.shape[1:])
    out = classifier(x)
    if out.dim() != 2:
        raise ValueError(f"model: expected the classifier to return (B, num_classes) logits, got {tuple(out.shape)}")
    return shapes, out.shape[1]


@torch.no_grad()
def _check_head(head: nn.Module, shape: torch.Size, num_classes: int, k: int, param: torch.Tensor) -> None:
    """The head built for block k must map (B, *shape) activations to (B, num_classes) logits."""
    was_training = head.training
    head.eval()
    try:
        out = head(torch.zeros(2, *shape, dtype=param.dtype, device=param.device))
    except Exception as exc:
        raise ValueError(f"head: the head built for block {k} fails on activations of shape (B, {', '.join(map(str, shape))}): {exc}") from None
    finally:
        head.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"head: the head built for block {k} returns {got} for a batch of 2; expected (2, {num_classes}) "
            f"logits (num_classes = the model's classifier outputs)"
        )


def split(
    model: nn.Module,
    K: int,
    head: Union[None, HeadFactory] = None,
    *,
    example_input: Optional[torch.Tensor] = None,
    balance: str = "activations",
) -> list[LocalBlock]:
    """Cut ``model`` into K ``LocalBlock``s that share its modules (no copies).

    Args:
        model: an ``nn.Sequential`` or a module with ``local_units()`` (the CIFAR ResNets of
            ``sgr_ext.models``, the adapters of ``sgr_ext.adapters``).
        K: number of blocks, 1 <= K <= number of units.
        head: ``head(sample_shape, num_classes) -> nn.Module`` building each auxiliary head
            from one sample's activation shape; default ``sgr_ext.heads.default_head``
            ("1c2f" for (C, H, W), two FC layers for (F,)). The last block's head is the
            model's own classifier.
        example_input: a (B, ...) batch used to probe activation shapes; optional when the
            model has an ``input_shape`` attribute or starts with a Linear layer.
        balance: ``"activations"`` (equalise per-sample activation size per block, which
            bounds a block step's memory) or ``"params"`` (equalise parameter counts).

    Returns:
        K blocks whose chained inference equals ``model(x)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    units, classifier = model_units(model)
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K: expected an int, got {type(K).__name__}")
    _checks.positive_int("K", K, at_most=len(units), what=" (the number of splittable units of this model)")
    balance = _checks.choice("balance", balance, BALANCES)
    if head is not None and not callable(head):
        raise TypeError(f"head: expected None or a callable (sample_shape, num_classes) -> nn.Module, got {type(head).__name__}")
    make_head = head or default_head

    was_training = model.training
    model.eval()
    try:
        probe = _example_input(model, units, example_input)
        try:
            shapes, num_classes = _probe_shapes(units, classifier, probe)
        except (RuntimeError, IndexError) as exc:  # e.g. a shape or dtype the model cannot take
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"example_input: the model fails on a batch of shape {tuple(probe.shape)} and dtype {probe.dtype}: {first}"
            ) from None
    finally:
        model.train(was_training)

    if balance == "params":
        costs = [sum(p.numel() for p in u.parameters()) for u in units]
    else:
        costs = [s.numel() for s in shapes]
    cuts = balanced_partition(costs, K)
    param = next(model.parameters())
    blocks = []
    for k in range(K):
        lo, hi = cuts[k], cuts[k + 1]
        module = units[lo] if hi - lo == 1 else nn.Sequential(*units[lo:hi])
        if k == K - 1:
            block_head = classifier
        else:
            block_head = make_head(tuple(shapes[hi - 1]), num_classes)
            if not isinstance(block_head, nn.Module):
                raise TypeError(f"head: expected head(sample_shape, num_classes) to return an nn.Module, got {type(block_head).__name__}")
            block_head = block_head.to(device=param.device, dtype=param.dtype)
            _check_head(block_head, shapes[hi - 1], num_classes, k, param)
        blocks.append(LocalBlock(module, block_head))
    return blocks
