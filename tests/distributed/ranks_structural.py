"""Rank side of tests/distributed/test_structural_blocks.py: models whose blocks are found by
structure, trained side by side with the serial model."""
from __future__ import annotations

import torch

from tests.distributed.ranks import _max_diff, train_side_by_side
from tests.models.structural import (
    SharedLayers,
    StockTransformer,
    VisionTransformer,
    hf_albert,
    token_inputs,
    vit_inputs,
)
from tests.models.zoo import token_batch

MODELS = {"vit": (VisionTransformer, vit_inputs), "shared": (SharedLayers, token_inputs),
          "stock": (StockTransformer, token_inputs), "albert": (hf_albert, token_batch)}


def compare_many(cases: list) -> list[dict]:
    """Each (model name, plan) against serial over 3 AdamW steps: worst loss / gradient / parameter
    differences, the layers and which parameters tp split."""
    out = []
    for name, plan in cases:
        torch.manual_seed(0)
        cm, serial, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[name], plan)
        out.append({"loss_diff": loss_diff, "grad_diff": grad_diff,
                    "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()),
                    "layers": list(cm.ir.layers), "split": sorted(cm.ir.param_shardings), "capture": cm.ir.capture})
    return out
