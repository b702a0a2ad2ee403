"""split(): function-preserving cuts at computed points; bad K."""
import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext.models import DigitsCNN, resnet32, resnet110
from sgr_ext.split import balanced_partition


def chained(blocks, x):
    for b in blocks:
        x = b(x)
    return blocks[-1].head(x)


@pytest.mark.parametrize("make, shape, ks", [(resnet32, (2, 3, 32, 32), (1, 4, 8, 16)), (DigitsCNN, (5, 1, 8, 8), (1, 2, 3, 4))])
@pytest.mark.parametrize("balance", ["activations", "params"])
def test_split_preserves_forward(make, shape, ks, balance):
    model = make().eval()
    x = torch.randn(shape)
    want = model(x)
    for k in ks:
        blocks = sgr_ext.split(model, k, balance=balance)
        assert len(blocks) == k
        torch.testing.assert_close(sgr_ext.LocalNet(blocks, lam=0.1).eval()(x), want)
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        assert last_linear in list(blocks[-1].head.modules())  # the real classifier is the last head


def test_blocks_share_the_model_parameters():
    model = resnet32()
    blocks = sgr_ext.split(model, 4)
    ids = {id(p) for b in blocks for p in b.module.parameters()} | {id(p) for p in blocks[-1].head.parameters()}
    assert ids == {id(p) for p in model.parameters()}


def test_resnet110_splits_into_14_blocks():
    blocks = sgr_ext.split(resnet110(), 14)
    assert len(blocks) == 14
    assert sum(len(list(b.module.children())) if isinstance(b.module, nn.Sequential) else 1 for b in blocks) >= 14


def test_sequential_mlp_with_default_two_layer_heads():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    blocks = sgr_ext.split(model, 3)
    x = torch.randn(4, 10)
    torch.testing.assert_close(chained(blocks, x), model(x))
    head = blocks[0].head
    assert [type(m) for m in head if isinstance(m, nn.Linear)] == [nn.Linear, nn.Linear]
    assert head(torch.randn(4, 20)).shape == (4, 3)


def test_default_conv_head_is_1c2f():
    blocks = sgr_ext.split(resnet32(num_classes=7), 2)
    head = blocks[0].head
    kinds = [type(m).__name__ for m in head]
    assert kinds.count("Conv2d") == 1 and kinds.count("Linear") == 2
    assert blocks[0].predict(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_custom_head_factory_sees_sample_shapes():
    seen = []

    def factory(shape, classes):
        seen.append(shape)
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))

    sgr_ext.split(DigitsCNN(), 4, head=factory)
    assert seen == [(32, 8, 8), (32, 4, 4), (64, 4, 4)]


def test_activation_balance_puts_fewer_large_units_per_block():
    blocks = sgr_ext.split(resnet32(), 8, balance="activations")
    sizes = [len(b.module) if isinstance(b.module, nn.Sequential) else 1 for b in blocks]
    assert sizes[0] <= sizes[-1]  # early units have the largest activations


@pytest.mark.parametrize("costs, k", [([1] * 7, 3), ([5, 1, 1, 1, 5], 3), ([3, 1, 4, 1, 5, 9, 2, 6], 4), ([2], 1)])
def test_balanced_partition_is_optimal(costs, k):
    import itertools

    cuts = balanced_partition(costs, k)
    assert cuts[0] == 0 and cuts[-1] == len(costs) and all(a < b for a, b in zip(cuts, cuts[1:]))
    got = max(sum(costs[a:b]) for a, b in zip(cuts, cuts[1:]))
    best = min(
        max(sum(costs[a:b]) for a, b in zip((0, *inner), (*inner, len(costs))))
        for inner in itertools.combinations(range(1, len(costs)), k - 1)
    )
    assert got == best


@pytest.mark.parametrize(
    "K, exc, match",
    [(0, ValueError, "K: expected an int >= 1"), (17, ValueError, "K: expected at most 16"), (2.0, TypeError, "K: expected an int"), (True, TypeError, "K")],
)
def test_bad_k(K, exc, match):
    with pytest.raises(exc, match=match):
        sgr_ext.split(resnet32(), K)


def test_bad_model_and_options():
    with pytest.raises(TypeError, match="model: expected an nn.Sequential or a module with local_units"):
        sgr_ext.split(nn.Conv2d(3, 3, 3), 1)
    with pytest.raises(ValueError, match="balance: expected one of"):
        sgr_ext.split(resnet32(), 2, balance="flops")
    with pytest.raises(ValueError, match="example_input: required"):
        sgr_ext.split(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 2)), 2)
    with pytest.raises(TypeError, match="head: expected None or a callable"):
        sgr_ext.split(resnet32(), 2, head="1c2f")
