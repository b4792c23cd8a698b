"""GPU presets from public measurements (#15): precision-dependent compute rates, efficiency by
GEMM size, launch overhead and the memory reserve each device keeps from a plan."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.cluster import A100_80GB, DATASHEET_FLOPS, GB, H100_80GB, Device, gpu_reserve
from pcompile.cost.pricing import op_time
from pcompile.models import GPT, GPTConfig, gpt_inputs


@pytest.fixture
def tf32(request):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("device,cuda_name", [(A100_80GB, "NVIDIA A100-SXM4-80GB"),
                                              (H100_80GB, "NVIDIA H100 80GB HBM3")])
def test_rates_follow_the_plans_precision(device, cuda_name):
    peaks = DATASHEET_FLOPS[cuda_name]
    bf16, fp32 = device.at_precision(True), device.at_precision(False)
    assert 0.75 * peaks["bf16"] < bf16.peak_flops < peaks["bf16"]  # MAMF: 80-87% of the datasheet
    assert fp32.peak_flops < peaks["fp32"] < bf16.peak_flops / 10  # PyTorch's default: no TF32
    assert device.at_precision(False) is fp32  # cached: the cost tables' memo keys on id(device)


@pytest.mark.parametrize("tf32", [True], indirect=True)
def test_tf32_when_the_runtime_allows_it(tf32):
    rate = A100_80GB.at_precision(False).peak_flops
    assert 0.75 * DATASHEET_FLOPS["NVIDIA A100-SXM4-80GB"]["tf32"] < rate < 156e12


def test_cpu_and_profiled_devices():
    cpu = pcompile.Cluster.local(2).device_of(0)
    assert cpu.at_precision(False) is cpu and cpu.at_precision(True) is cpu  # one rate: unchanged
    fp32_curve, bf16_curve = ((1e6, 1e12), (1e12, 50e12)), ((1e6, 2e12), (1e12, 400e12))
    gpu = Device("profiled", 80 * GB, 400e12, 2e12, matmul_curve=fp32_curve, matmul_curve_bf16=bf16_curve)
    assert gpu.at_precision(True).matmul_curve == bf16_curve  # bf16 plans price the bf16 curve
    assert gpu.at_precision(False).matmul_curve == fp32_curve


def test_efficiency_grows_with_gemm_size():
    device = A100_80GB.at_precision(True)
    eff = []
    for n in (512, 1024, 2048, 4096):
        flops, moved = 2.0 * n ** 3, 3 * n * n * 2.0
        eff.append(flops / op_time(device, flops, moved, linear=True) / device.peak_flops)
    assert eff == sorted(eff) and eff[0] < 0.3 and 0.5 < eff[1] < 0.7 and eff[3] > 0.95
    assert A100_80GB.op_overhead == A100_80GB.backward_overhead == 5e-6


def test_memory_reserve_is_charged():
    reserve = gpu_reserve(80 * GB)
    assert A100_80GB.memory_reserve == H100_80GB.memory_reserve == reserve
    assert 6 * GB < reserve < 8 * GB  # context 1.3 GB + NCCL 2 GiB + 5% of the rest
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    assert cluster.min_device().budget == 80 * GB - reserve
    assert cluster.with_memory(16 * GB).device_of(0).budget == 16 * GB  # a stated budget is the budget


def test_fp32_plan_is_priced_at_fp32():
    cfg = GPTConfig(vocab_size=1024, seq_len=512, hidden=1024, num_heads=16, num_layers=2)
    with torch.device("meta"):
        model = GPT(cfg)
    x, y = gpt_inputs(cfg, batch=8)
    inputs = (x.to("meta"), y.to("meta"))
    cluster, plan = pcompile.Cluster.preset("8xA100-80GB"), pcompile.Plan.uniform(dp=8)
    fp32 = pcompile.estimate(model, cluster, inputs, plan)
    bf16 = pcompile.estimate(model, cluster, inputs, plan, mixed_precision="bf16")
    assert fp32.compute_time > 5 * bf16.compute_time  # 16.9 vs 271 TFLOPS on the matmuls
    assert fp32.memory_budget == cluster.device_of(0).budget
    no_reserve = dataclasses.replace(A100_80GB, memory_reserve=0)
    assert no_reserve.budget == 80 * GB


def test_a_local_gpu_prices_fp32_at_fp32(monkeypatch):
    """Cluster.local on a GPU machine (emulated): the datasheet's fp32 rate, the reserve unless
    the caller states the budget."""
    props = type("Props", (), {"name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * GB})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    device = pcompile.Cluster.local(8).device_of(0)
    assert device.at_precision(False).peak_flops < 67e12 < device.at_precision(True).peak_flops
    assert device.budget == 80 * GB - gpu_reserve(80 * GB)
    assert pcompile.Cluster.local(8, memory_bytes=16 * GB).device_of(0).budget == 16 * GB
