"""Splits of torchvision ResNet / ViT and of the CIFAR ViT-Tiny preserve the forward."""
import pytest
import torch
import torchvision
from torch import nn

from sgr_ext import LocalNet, split
from sgr_ext.adapters import PlainEncoderLayer, adapt, torchvision_units
from sgr_ext.engine import ENGINES
from sgr_ext.heads import TokenPool, default_head, token_head
from sgr_ext.models.vit import vit_tiny


def chain(blocks, x):
    for b in blocks:
        x = b(x)
    return blocks[-1].head(x)


def test_split_torchvision_resnet18_preserves_forward():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model_ids = {id(p) for p in model.parameters()}
    for K in (1, 4, 9):
        blocks = split(model, K, example_input=x)  # raw torchvision model: found by sgr_ext.adapters
        assert len(blocks) == K
        torch.testing.assert_close(chain(blocks, x), ref, rtol=0, atol=0)
        # the blocks share the model's parameters (no copies)
        assert all(id(p) in model_ids for b in blocks for p in b.module.parameters())


def test_resnet50_units_and_adapter():
    model = torchvision.models.resnet50(weights=None, num_classes=7).eval()
    units, classifier = torchvision_units(model)
    assert len(units) == 1 + 3 + 4 + 6 + 3  # stem + every Bottleneck
    wrapped = adapt(model, input_shape=(3, 32, 32))
    blocks = split(wrapped, 5)  # input_shape from the adapter, no example_input needed
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(chain(blocks, x), model(x), rtol=0, atol=0)
    assert chain(blocks, x).shape == (1, 7)


@pytest.fixture(scope="module")
def vit_b_16():
    torch.manual_seed(0)
    return torchvision.models.vit_b_16(weights=None, image_size=32).eval()  # 4 patches + class token


def test_split_vit_b_16_preserves_forward(vit_b_16):
    x = torch.randn(2, 3, 32, 32)
    ref = vit_b_16(x)
    for K in (1, 4, 13):
        blocks = split(adapt(vit_b_16), K)
        assert len(blocks) == K
        torch.testing.assert_close(chain(blocks, x), ref, rtol=1e-4, atol=1e-5)  # written-out attention
        for b in blocks[:-1]:  # aux heads on (B, T, D) tokens
            assert isinstance(b.head[0], nn.LayerNorm) and isinstance(b.head[1], TokenPool)
    fused = split(adapt(vit_b_16, plain_attention=False), 3)
    torch.testing.assert_close(chain(fused, x), ref, rtol=0, atol=0)


def _small_tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


@pytest.mark.parametrize("mode", sorted(ENGINES))
def test_torchvision_vit_sgr_step_every_engine(mode):
    """SGR engines differentiate attention twice or in forward mode: the adapter writes it out."""
    torch.manual_seed(0)
    model = _small_tv_vit()
    units, _ = torchvision_units(model)
    assert all(isinstance(u, PlainEncoderLayer) for u in units[1:])
    net = LocalNet(split(adapt(model), 3), lam=0.5, mode=mode)
    net.train()
    stats = net.train_step(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)))
    assert stats.penalties[1] > 0 and stats.cosines[1] is not None
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vit_tiny_split_preserves_forward():
    model = vit_tiny().eval()  # 64 patches of 4x4 + class token
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.36e6, rel=0.01)
    units, _ = model.local_units()
    assert len(units) == 13
    x = torch.randn(1, 3, 32, 32)
    blocks = split(model, 4)
    torch.testing.assert_close(chain(blocks, x), model(x), rtol=0, atol=0)
    assert blocks[0](x).shape == (1, 65, 192)


@pytest.mark.parametrize("mode", sorted(ENGINES))
def test_vit_tiny_sgr_step_every_engine(mode):
    torch.manual_seed(0)
    net = LocalNet(split(vit_tiny(image_size=8, depth=3, dim=48), 3), lam=0.1, mode=mode)
    net.train()
    stats = net.train_step(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert len(stats.losses) == 3 and stats.cosines[2] is not None and stats.penalties[2] > 0


def test_token_head_and_default_head():
    x = torch.randn(3, 5, 8)
    head = default_head((5, 8), 4)
    assert head(x).shape == (3, 4)
    cls = token_head(8, 4, pool="cls")
    assert cls(x).shape == (3, 4)
    torch.testing.assert_close(TokenPool("cls")(x), x[:, 0])
    torch.testing.assert_close(TokenPool("mean")(x), x.mean(1))
    with pytest.raises(ValueError, match="pool"):
        TokenPool("max")


def test_adapt_rejects_unknown_models():
    with pytest.raises(TypeError, match="torchvision ResNet or VisionTransformer"):
        adapt(nn.Linear(3, 3))
    assert torchvision_units(nn.Linear(3, 3)) is None
