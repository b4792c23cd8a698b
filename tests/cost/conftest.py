"""Shared IRs for the cost tests: analysed once per session (fake tensors, no ranks)."""
from __future__ import annotations

import pytest
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.ir.pass_manager import PassContext, PassManager
from pcompile.models import GPT, GPTConfig, gpt_inputs

ANALYSES = ["trace", "shapes", "flops", "memory", "layers"]


class OneLinear(nn.Module):
    def __init__(self, inputs: int = 12, outputs: int = 5):
        super().__init__()
        self.fc = nn.Linear(inputs, outputs)

    def forward(self, x, y):
        return F.mse_loss(self.fc(x), y)


def analyse(model, inputs, extra=()):
    ctx = PassContext(model, pcompile.Cluster.local(4), inputs)
    ir = PassManager(ANALYSES + list(extra)).run(None, ctx)
    return ir, ctx


@pytest.fixture(scope="session")
def gpt_ir():
    """GPT (2 blocks, hidden 64, seq 32) at batch 8, with the symbolic pass run."""
    cfg = GPTConfig()
    return analyse(GPT(cfg), gpt_inputs(cfg, 8), extra=["symbolic"])
