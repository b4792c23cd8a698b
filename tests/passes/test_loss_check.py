"""A loss that sums over the batch is refused under plans that average it (dp > 1, pipeline
micro-batches), on fx and torch.export captures; the same model compiles at dp=1 and matches
serial; a mean loss, a sum normalised by a tensor and an L2 penalty on the weights pass."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile import Cluster, PcompileError, Plan
from pcompile.sharding.loss_terms import inexact_terms
from tests.cost.conftest import analyse
from tests.models import zoo


class Regressor(nn.Module):
    """Two Linears (two blocks, so pp=2 can cut them) and a loss chosen by `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
        self.ce = nn.CrossEntropyLoss(reduction="sum")

    def forward(self, x, y):
        h = self.blocks[1](torch.relu(self.blocks[0](x)))
        labels = y.argmax(-1)
        if self.kind == "ce-sum":
            return F.cross_entropy(h, labels, reduction="sum")
        if self.kind == "module-sum":
            return self.ce(h, labels) / 100  # a sum scaled by a constant is still a sum
        if self.kind == "mse-legacy":
            return F.mse_loss(h, y, size_average=False)  # the legacy flag means reduction="sum"
        if self.kind == "final-sum":
            return 0.5 * ((h - y) ** 2).sum() + F.l1_loss(h, y)
        if self.kind == "normalised":
            return F.cross_entropy(h, labels, reduction="sum") / x.shape[0]  # a mean, by the local batch
        if self.kind == "mean-l2":
            return F.mse_loss(h, y) + 1e-3 * sum((p ** 2).sum() for p in self.parameters())
        raise ValueError(self.kind)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


SUMMED = {"ce-sum": "cross_entropy", "module-sum": "CrossEntropyLoss", "mse-legacy": "mse_loss",
          "final-sum": "sum"}
EXPORTED = {"ce-sum": "cross_entropy_loss", "module-sum": "cross_entropy_loss", "mse-legacy": "mse_loss",
            "final-sum": "sum"}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind", list(SUMMED))
def test_summed_loss_is_refused_under_dp(kind, capture):
    with pytest.raises(PcompileError) as info:
        pcompile.compile(Regressor(kind), Cluster.local(2), _inputs(), plan=Plan.uniform(dp=2), capture=capture,
                         stop_after="loss_check")
    message = str(info.value)
    expected = (SUMMED if capture == "fx" else EXPORTED)[kind]
    assert f"({expected}(reduction='sum')" in message or f"({expected}() of a tensor" in message, message
    assert "dp=2 averages" in message
    assert "use reduction='mean'" in message and "plan with dp=1" in message


def test_summed_loss_is_refused_under_pipeline_micro_batches():
    plan = dataclasses.replace(Plan.uniform(pp=2), num_microbatches=2)
    with pytest.raises(PcompileError, match="pp=2 averages 2 micro-batches"):
        pcompile.compile(Regressor("ce-sum"), Cluster.local(2), _inputs(), plan=plan, stop_after="loss_check")
    one = dataclasses.replace(Plan.uniform(pp=2), num_microbatches=1)  # one micro-batch: nothing averaged
    pcompile.compile(Regressor("ce-sum"), Cluster.local(2), _inputs(), plan=one, stop_after="loss_check")


@pytest.mark.parametrize("kind", ["normalised", "mean-l2"])
def test_means_and_weight_penalties_pass(kind):
    for capture in ("fx", "export"):
        ir = pcompile.compile(Regressor(kind), Cluster.local(2), _inputs(), plan=Plan.uniform(dp=2), capture=capture,
                              stop_after="loss_check")
        assert ir.capture == capture and inexact_terms(ir) == []


@pytest.mark.parametrize("name", ["gpt2", "t5", "vit"])
def test_zoo_mean_losses_are_not_flagged(name):
    """HuggingFace models (captured with torch.export) computing their own mean cross-entropy."""
    build, batch = zoo.MODELS[name]
    ir, _ = analyse(build(), batch(0))
    assert ir.capture == "export" and inexact_terms(ir) == [], name


def test_summed_loss_at_dp1_compiles_and_matches_serial():
    model, inputs = Regressor("final-sum"), _inputs()
    cm = pcompile.compile(copy.deepcopy(model), Cluster.local(1), inputs, plan=Plan.uniform(dp=1))
    assert torch.allclose(cm.train_step(*inputs), model(*inputs))
