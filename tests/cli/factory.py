"""A user model file for `pcompile plan tests/cli/factory.py:mlp` (the factory convention)."""
import torch

from pcompile.models import MLPConfig, MLPModel, mlp_inputs


def mlp(batch: int = 16):
    torch.manual_seed(0)
    cfg = MLPConfig()
    return MLPModel(cfg), mlp_inputs(cfg, batch)
