"""The zoo's torchvision layouts against torchvision itself, and timm's ViT, where they load.

They do not load on the CPU torch this suite is run with here: torchvision 0.28 (torch 2.13's) has
one wheel, a CUDA build whose C ops fail to register at import ("operator torchvision::nms does
not exist"), and timm imports torchvision. Neither is a test extra; these tests skip then. Where
they load (a CUDA torch, or torchvision's CPU wheel), they check that the written-out layouts the
zoo trains (tests/models/zoo.py TorchvisionResNet18, tests/models/structural.py
VisionTransformer) hold the libraries' parameter and buffer names and shapes, and that the
libraries' own models are captured into the same blocks.
"""
import pytest
import torch
import torch.nn.functional as F

import pcompile
from tests.models.structural import VisionTransformer, vit_inputs
from tests.models.zoo import TorchvisionResNet18, image_batch


def _load(name: str):
    try:
        return __import__(name)
    except Exception as exc:  # ImportError, or torchvision's RuntimeError from its C ops on a CPU torch
        pytest.skip(f"{name} does not load here: {type(exc).__name__}: {exc}")


def _shapes(module: torch.nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


class _WithLoss(torch.nn.Module):
    """A library classifier with the cross-entropy, as a user wraps it for pcompile."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return F.cross_entropy(self.model(images), labels)


def _layers(model, inputs) -> list[str]:
    ir = pcompile.compile(model, pcompile.Cluster.local(4), inputs, stop_after="layers")
    return ir.block_layers


def test_torchvision_layouts_match_torchvision():
    _load("torchvision")
    from torchvision.models import VisionTransformer as TorchvisionViT
    from torchvision.models import resnet18

    assert _shapes(TorchvisionResNet18(widths=(64, 128, 256, 512), classes=5)) == _shapes(resnet18(num_classes=5))
    vit = TorchvisionViT(image_size=8, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                         num_classes=10)
    assert _shapes(VisionTransformer()) == _shapes(vit)
    assert _layers(_WithLoss(vit), vit_inputs(0)) == [f"model.encoder.layers.encoder_layer_{i}" for i in range(3)]
    layers = _layers(_WithLoss(resnet18(num_classes=5)), image_batch(0, batch=8, size=32))
    assert layers == [f"model.layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_timm_vit_blocks_are_found():
    _load("torchvision")
    timm = _load("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=16, depth=2,
                            num_heads=2, num_classes=5)
    assert _layers(_WithLoss(vit), image_batch(0)) == ["model.blocks.0", "model.blocks.1"]
