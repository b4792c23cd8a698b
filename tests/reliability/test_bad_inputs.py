"""The bad-input corpus: each case is a pcompile error naming the cause and the fix, or (where
it can be handled) a correct plan. Complements tests/test_errors.py."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import pcompile
from pcompile import Cluster, Device, NodeGroup, PcompileError, Plan, Strategy
from pcompile.cluster import A100_80GB
from pcompile.models import GPT, GPTConfig, gpt_inputs


def _gpt():
    cfg = GPTConfig(num_layers=2)
    return GPT(cfg), gpt_inputs(cfg, 8)


class DataDependent(nn.Module):
    """The output's shape depends on the values (boolean-mask selection)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, y):
        h = self.fc(x)
        return (h[h > 0] ** 2).mean() + 0 * y.sum()


class WithBuffer(nn.Module):
    """A registered buffer (a fixed scale) used in forward: plans, and runs like serial."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x, y):
        for block in self.blocks:
            x = torch.relu(block(x)) * self.scale
        return ((x - y) ** 2).mean()


def test_data_dependent_shapes_are_refused_with_the_reason():
    with pytest.raises(PcompileError) as info:
        pcompile.plan(DataDependent(), Cluster.local(2), (torch.randn(4, 8), torch.randn(4, 8)))
    assert "data-dependent" in str(info.value)


def test_buffers_are_planned_and_compiled_like_parameters():
    model = WithBuffer()
    inputs = (torch.randn(8, 8), torch.randn(8, 8))
    cm = pcompile.compile(copy.deepcopy(model), Cluster.local(1), inputs)
    assert torch.allclose(cm.train_step(*inputs), model(*inputs))
    assert torch.equal(cm.full_state_dict()["scale"], model.scale)


def test_cluster_with_zero_memory():
    with pytest.raises(PcompileError, match="has 0 bytes of memory") as info:
        Cluster((NodeGroup(Device("x", 0, 1e12, 1e12), 1, 8),), 1e9, 1e-6, 1e9, 1e-6)
    assert "memory size in bytes" in info.value.fix


def test_cluster_with_mismatched_node_sizes():
    with pytest.raises(PcompileError, match=r"mixes node sizes \[4, 8\]"):
        Cluster((NodeGroup(A100_80GB, 1, 8), NodeGroup(A100_80GB, 1, 4)), 1e9, 1e-6, 1e9, 1e-6)


def test_pipeline_with_fewer_microbatches_than_stages():
    model, inputs = _gpt()
    plan = Plan(num_devices=2, default=Strategy(), pp=2, num_microbatches=1)
    with pytest.raises(PcompileError, match="micro-batch"):
        pcompile.compile(model, Cluster.local(2), inputs, plan=plan, stop_after="pipeline_split")


def test_batch_not_divisible_by_dp_times_microbatches():
    model, inputs = _gpt()  # batch 8
    plan = Plan(num_devices=4, default=Strategy(dp=2), pp=2, num_microbatches=3)
    with pytest.raises(PcompileError, match="not divisible by dp=2 x 3 micro-batch"):
        pcompile.compile(model, Cluster.local(4), inputs, plan=plan, stop_after="search")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["default"].update(tp=-2), "tp=-2 must be a positive integer"),
    (lambda d: d["default"].update(sdp="yes"), "sdp='yes' must be true or false"),
    (lambda d: d["default"].update(sp=True), "sequence parallelism (sp) needs tp > 1"),
    (lambda d: d.update(pp=0), "pp=0 must be a positive integer"),
    (lambda d: d.update(schedule="ZeroBubble"), "unknown pipeline schedule 'ZeroBubble'"),
    (lambda d: d.update(layers=[{"layer": "blocks.0", "strategy": {"dp": 2}, "stage": 5}]),
     "assigned to stage 5 but the plan has pp=1"),
    (lambda d: d.update(layers=[{"layer": "blocks.0", "strategy": {"dp": 4}, "stage": 0}]),
     "uses dp4·tp1 = 4 devices per stage"),
    (lambda d: d.pop("default"), "malformed plan"),
])
def test_hand_edited_plan_json(edit, message):
    data = Plan.uniform(dp=2).to_dict()
    edit(data)
    with pytest.raises(PcompileError) as info:
        Plan.from_json(json.dumps(data))
    assert message in str(info.value)


def test_plan_naming_layers_the_model_does_not_have():
    model, inputs = _gpt()
    plan = Plan(num_devices=2, default=Strategy(dp=2),
                layers=(pcompile.LayerAssignment("encoder.0", Strategy(dp=2)),))
    with pytest.raises(PcompileError, match=r"names layer\(s\) \['encoder.0'\] that this model does not have"):
        pcompile.compile(model, Cluster.local(2), inputs, plan=plan, stop_after="search")


def test_tied_weights_are_handled_not_refused():
    model, inputs = _gpt()  # GPT ties its head to the token embedding
    plan = pcompile.plan(model, Cluster.local(4), inputs)
    assert plan.estimate is not None and plan.num_devices == 4
