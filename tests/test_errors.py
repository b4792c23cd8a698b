"""Errors users can hit are PcompileErrors stating the cause and the fix; these tests pin the
messages."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile import Cluster, PcompileError, Plan
from pcompile.cluster import A100_80GB, NodeGroup
from pcompile.models import GPT, GPTConfig, gpt_inputs


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value
            return self.lin(x)
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), Gate())

    def forward(self, x, y):
        return F.mse_loss(self.body(x), y)


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        out = self.lin(x)
        if out.mean() > 0:
            out = -out
        return F.mse_loss(out, y)


class OnesMask(nn.Module):
    def forward(self, x):
        length = x.shape[1]
        return x + torch.ones(length, length)  # a traced size as a python int


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask = OnesMask()

    def forward(self, x, y):
        return F.mse_loss(self.mask(x), y)


class SliceBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("causal", torch.ones(8, 8))

    def forward(self, x, y):
        length = x.shape[1]
        return F.mse_loss(x + self.causal[:length, :length], y)


def _trace(model, inputs):
    """The fx front end's errors (capture='fx': no fallback to another capture path)."""
    return pcompile.compile(model, Cluster.local(1), inputs, stop_after="trace", capture="fx")


def _pair(*shape):
    return torch.randn(*shape), torch.randn(*shape)


# -- untraceable models --------------------------------------------------------------------
def test_control_flow_on_a_tensor_value():
    with pytest.raises(PcompileError) as info:
        _trace(TopLevelBranch(), _pair(2, 4))
    message = str(info.value)
    assert "cannot trace the top-level module (TopLevelBranch)" in message
    assert "Python control flow (if/for/while) on a tensor value" in message
    assert "fix: make the branch static" in message and "leaf" in message
    assert info.value.__cause__ is not None  # fx's own error kept as the cause, not printed


def test_control_flow_error_names_the_submodule_path():
    with pytest.raises(PcompileError, match=r"cannot trace module 'body.1' \(Gate\)"):
        _trace(GatedNet(), _pair(2, 4))


def test_slice_with_a_traced_size():
    with pytest.raises(PcompileError) as info:
        _trace(SliceBuffer(), _pair(4, 4))
    assert "a tensor size used as a plain Python int" in str(info.value)
    assert "torch.arange" in info.value.fix


def test_ones_from_a_traced_size_names_the_construct_module_and_fix():
    with pytest.raises(PcompileError) as info:
        _trace(MaskedNet(), _pair(4, 4))
    message = str(info.value)
    assert "module 'mask' (OnesMask)" in message
    assert "torch.ones(T, T)" in message and "torch.arange" in info.value.fix


# -- clusters ------------------------------------------------------------------------------
def test_cluster_with_zero_devices():
    with pytest.raises(PcompileError, match=r"Cluster.local\(0\): a cluster needs at least one device"):
        Cluster.local(0)
    with pytest.raises(PcompileError, match=r"the cluster has no node groups \(0 devices\)"):
        Cluster((), 1e9, 1e-6, 1e9, 1e-6)
    with pytest.raises(PcompileError, match=r"1 node\(s\) x 0 device\(s\): a cluster needs at least one device"):
        Cluster((NodeGroup(A100_80GB, 1, 0),), 1e9, 1e-6, 1e9, 1e-6)
    with pytest.raises(PcompileError, match=r"launch\(world_size=0\) needs at least one rank"):
        pcompile.launch(print, 0)


# -- forced plans --------------------------------------------------------------------------
def _gpt(batch=8):
    cfg = GPTConfig(num_layers=2, num_heads=4, hidden=64)
    return GPT(cfg), gpt_inputs(cfg, batch)


def test_forced_tp_that_does_not_divide_the_heads_3():
    model, inputs = _gpt()
    with pytest.raises(PcompileError) as info:
        pcompile.compile(model, Cluster.local(3), inputs, plan=Plan.uniform(tp=3), stop_after="tensor_parallel")
    assert "forced plan dp1·tp3 is invalid: tp=3 cannot split blocks.0" in str(info.value)
    assert "not divisible by tp=3" in str(info.value)
    assert "heads" in info.value.fix


def test_forced_tp_that_does_not_divide_the_heads_8():
    model, inputs = _gpt()
    with pytest.raises(PcompileError, match=r"tp=8.*heads|heads.*tp=8"):
        pcompile.compile(model, Cluster.local(8), inputs, plan=Plan.uniform(tp=8), stop_after="tensor_parallel")


def test_batch_not_divisible_by_dp():
    model, inputs = _gpt(batch=6)
    with pytest.raises(PcompileError) as info:
        pcompile.compile(model, Cluster.local(4), inputs, plan=Plan.uniform(dp=4), stop_after="search")
    assert "forced plan dp4·tp1 is invalid: global batch 6 is not divisible by dp=4" in str(info.value)


def test_no_valid_split_when_searching():
    model, inputs = _gpt(batch=8)
    with pytest.raises(PcompileError) as info:
        pcompile.plan(model, Cluster.local(3), inputs)
    message = str(info.value)
    assert message.startswith("no plan is valid for 3 devices and a global batch of 8")
    assert "searched tp=[1]" in message and "fix: use a global batch divisible" in message


def test_plan_for_another_model():
    model, inputs = _gpt()
    plan = pcompile.plan(model, Cluster.local(2), inputs)
    other_cfg = GPTConfig(num_layers=3)
    with pytest.raises(PcompileError) as info:
        pcompile.compile(GPT(other_cfg), Cluster.local(2), gpt_inputs(other_cfg, 8), plan=plan)
    assert "the plan was made for another model" in str(info.value)
    assert "re-plan" in info.value.fix
    # the same architecture (other weights) is fine
    same, _ = _gpt()
    assert pcompile.compile(same, Cluster.local(2), inputs, plan=plan, stop_after="search") is not None


def test_plan_for_another_cluster_size():
    model, inputs = _gpt()
    with pytest.raises(PcompileError, match="the plan is for 4 devices but the cluster has 2"):
        pcompile.compile(model, Cluster.local(2), inputs, plan=Plan.uniform(dp=2, tp=2), stop_after="search")


def test_model_that_fits_nowhere():
    model, inputs = _gpt()
    tiny = Cluster.local(2, memory_bytes=1024)
    with pytest.raises(PcompileError) as info:
        pcompile.plan(model, tiny, inputs)
    assert "no plan fits the devices' memory (1 KiB)" in str(info.value)
    assert "MiB per device" in str(info.value) and "fix: give every device at least" in str(info.value)


# -- API misuse ----------------------------------------------------------------------------
def test_api_argument_errors():
    model, inputs = _gpt()
    with pytest.raises(PcompileError, match="compile\\(\\) needs an nn.Module, got function"):
        pcompile.compile(lambda x: x, Cluster.local(1), inputs)
    with pytest.raises(PcompileError, match="cluster must be a pcompile.Cluster, got str"):
        pcompile.compile(model, "8xA100-80GB", inputs)
    with pytest.raises(PcompileError, match="example_inputs must be a non-empty tuple"):
        pcompile.compile(model, Cluster.local(1), ())
    with pytest.raises(PcompileError, match="plan must be a pcompile.Plan, got dict"):
        pcompile.compile(model, Cluster.local(1), inputs, plan={"dp": 1})
    with pytest.raises(PcompileError, match="stop_after='nope' is not in the pipeline"):
        pcompile.compile(model, Cluster.local(1), inputs, stop_after="nope")
