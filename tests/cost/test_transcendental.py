"""GELU is charged at the device's measured GELU rates (elements/s) where those are slower than
the roofline: erf per element is compute-bound on CPUs (issue #3), memory-bound on GPUs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.cluster import Cluster, Device, NodeGroup
from pcompile.cost.layer_work import LayerWork, OpWork, layer_work
from pcompile.cost.pricing import compute_times
from pcompile.cost.profile import build_cluster
from pcompile.plan import Strategy
from tests.cost.conftest import analyse

MS = 1e-3
# 10 GB/s, no overhead; GELU at 1e8 elements/s forward, 5e7 backward
DEVICE = Device("cpu", 2**30, 1e12, 10e9, gelu_rate=1e8, gelu_backward_rate=5e7)


def _work(elements=1e6, transcendental=True):
    op = OpWork(0.0, 8 * elements, 0.0, False, True, sp=True, transcendental=elements if transcendental else 0.0)
    return LayerWork((op,), 0.0, 0.0, 0.0, 0.0, (), 0, 0)


def test_gelu_charged_at_its_measured_rates():
    # 1 M elements: roofline 8 MB / 10 GB/s = 0.8 ms forward, 16 MB = 1.6 ms backward;
    # the rates: 1e6 / 1e8 = 10 ms forward, 1e6 / 5e7 = 20 ms backward
    fwd, bwd = compute_times(_work(), DEVICE, 1.0, Strategy(), 1.0)
    assert fwd == pytest.approx(10 * MS) and bwd == pytest.approx(20 * MS)
    # twice the batch: twice the elements; sequence parallel over tp2 divides them again
    fwd, bwd = compute_times(_work(), DEVICE, 2.0, Strategy(dp=1, tp=2, sp=True), 1.0)
    assert fwd == pytest.approx(10 * MS) and bwd == pytest.approx(20 * MS)


def test_roofline_alone_without_a_rate_or_when_faster():
    unknown = dataclasses.replace(DEVICE, gelu_rate=0.0, gelu_backward_rate=0.0)
    fwd, bwd = compute_times(_work(), unknown, 1.0, Strategy(), 1.0)
    assert fwd == pytest.approx(0.8 * MS) and bwd == pytest.approx(1.6 * MS)
    fast = dataclasses.replace(DEVICE, gelu_rate=1e13, gelu_backward_rate=1e13)  # a GPU: memory-bound
    assert compute_times(_work(), fast, 1.0, Strategy(), 1.0) == pytest.approx((0.8 * MS, 1.6 * MS))
    # another elementwise op is not charged the GELU rate
    plain = compute_times(_work(transcendental=False), DEVICE, 1.0, Strategy(), 1.0)
    assert plain == pytest.approx((0.8 * MS, 1.6 * MS))


class Gelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.act = nn.GELU()

    def forward(self, x, y):
        h = self.act(self.fc(x))  # nn.GELU: call_module
        return F.mse_loss(F.gelu(h) + torch.tanh(h), y)  # F.gelu: call_function; tanh is not counted


@pytest.mark.parametrize("capture", ["fx", "export"])  # call_module / call_function F.gelu; aten.gelu
def test_layer_work_counts_gelu_elements(capture):
    from pcompile.ir.pass_manager import PassContext, PassManager
    from pcompile.options import CompileOptions
    from tests.cost.conftest import ANALYSES

    ctx = PassContext(Gelus(), pcompile.Cluster.local(1), (torch.randn(4, 12), torch.randn(4, 16)),
                      options=CompileOptions(capture=capture))
    ir = PassManager(ANALYSES).run(None, ctx)
    ops = [op for work in layer_work(ir, 1).values() for op in work.ops]
    assert sorted(op.transcendental for op in ops if op.transcendental) == [4 * 16, 4 * 16]


def test_gpt_gelu_split_by_tp():
    from pcompile.models import GPT, GPTConfig, gpt_inputs

    cfg = GPTConfig()
    ir, _ = analyse(GPT(cfg), gpt_inputs(cfg, 8))
    def counts(tp):
        return [op.transcendental for w in layer_work(ir, tp).values() for op in w.ops if op.transcendental]
    gelu = 8 * cfg.seq_len * cfg.mlp_ratio * cfg.hidden
    assert counts(1) == [gelu] * cfg.num_layers
    assert counts(2) == [gelu / 2] * cfg.num_layers  # after the column Linear: split


def test_gelu_rates_round_trip_and_old_profiles_load():
    device = dataclasses.replace(DEVICE, name="d")
    cluster = Cluster((NodeGroup(device, 1, 2),), 1e9, 1e-5, 1e9, 1e-5, "gloo")
    assert Cluster.from_json(cluster.to_json()) == cluster
    old = json.loads(cluster.to_json())
    for key in ("gelu_rate", "gelu_backward_rate"):
        del old["node_groups"][0]["device"][key]
    assert Cluster.from_dict(old).device_of(0).gelu_rate == 0.0  # unknown: the roofline alone


def test_build_cluster_takes_the_median_rank_gelu_rates():
    def rank(fwd, bwd, gelu=True):
        r = dict(matmul_fp32=[(1e6, 1e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5), overlap=0.5,
                 collectives=[])
        return dict(r, gelu=(fwd, bwd)) if gelu else r
    device = build_cluster([rank(1e8, 4e7), rank(3e8, 6e7), rank(2e8, 5e7)], 3, "gloo", 2**30).device_of(0)
    assert (device.gelu_rate, device.gelu_backward_rate) == (2e8, 5e7)
    old = build_cluster([rank(0, 0, gelu=False)] * 2, 2, "gloo", 2**30).device_of(0)
    assert (old.gelu_rate, old.gelu_backward_rate) == (0.0, 0.0)
