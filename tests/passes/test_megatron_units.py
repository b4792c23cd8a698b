"""Models without repeated blocks: the top-level children holding the two halves of a Megatron
pair (a column Linear and the row Linear its split output reaches) join one search unit, so tp
is offered to it; the search then picks tensor parallelism for few tokens and data parallelism
for many, as the communication volumes say (Alpa's closed form for a two-Linear MLP: dp moves
the 2 h x 4h weights' gradients once a step, tp the b x h activations twice)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile import Cluster, Plan


class UpDown(nn.Module):
    """Alpa's MLP: two top-level Linears (no repeated block), a GELU between."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x, y):
        return F.mse_loss(self.down(F.gelu(self.up(x))), y)


class Apart(nn.Module):
    """Two Linears whose halves are not a pair: a norm between them needs the whole features."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.first = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.second = nn.Linear(hidden, hidden)

    def forward(self, x, y):
        return F.mse_loss(self.second(self.norm(self.first(x))), y)


def _layers(model, hidden=16, capture="fx"):
    x = torch.randn(8, hidden)
    ir = pcompile.compile(model, Cluster.local(2), (x, x), plan=Plan.uniform(dp=1), stop_after="layers",
                          capture=capture)
    return ir.layers


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_halves_of_a_pair_join_one_unit(capture):
    assert _layers(UpDown(), capture=capture) == ["pre", "up+down", "post"]


def test_layers_that_hold_no_pair_stay_apart():
    assert _layers(Apart()) == ["pre", "first", "norm", "second", "post"]


def test_the_joined_unit_takes_tp():
    x = torch.randn(8, 16)
    ir = pcompile.compile(UpDown(), Cluster.local(2), (x, x), plan=Plan.uniform(tp=2),
                          stop_after="tensor_parallel")
    assert "tp_copy" in ir.gm.code and "tp_reduce" in ir.gm.code


@pytest.mark.parametrize("tokens, tensor_parallel", [(8, True), (131072, False)])
def test_the_search_follows_the_communication_volumes(tokens, tensor_parallel):
    hidden = 2048
    with torch.device("meta"):
        model = UpDown(hidden)
    x = torch.empty(tokens, hidden, device="meta")
    plan = pcompile.plan(model, Cluster.preset("8xA100-80GB"), (x, x), mixed_precision="bf16")
    unit = plan.strategy_for("up+down")
    assert (unit.tp > 1) == tensor_parallel, str(plan)
