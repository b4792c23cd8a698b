"""The profiler on GPUs (skipped without CUDA): CUDA-event timing and the Device's GPU figures."""
from __future__ import annotations

import time

import pytest
import torch

import pcompile
from pcompile.cost.profile import CUDA_RESERVE_BYTES, SIZES, _timed, profile_cluster
from pcompile.launch import rank_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _matmul_seconds(n: int) -> tuple[float, float]:
    """(`_timed`, host time around synchronized calls) of an n x n bf16 matmul on this rank's GPU."""
    device = rank_device()
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timed = _timed(lambda: torch.mm(a, a), device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    torch.cuda.synchronize(device)
    return timed, (time.perf_counter() - start) / 10


def test_cuda_timing_waits_for_the_kernels():
    # host time around the asynchronous launches alone would read a few us per call: > 1e17 FLOP/s
    n = 8192
    (timed, host), = pcompile.launch(_matmul_seconds, 1, n, backend="nccl")
    assert 1e12 < 2 * n ** 3 / timed < 1e16 and 0.7 < timed / host < 1.3


def test_quick_profile_on_one_gpu(tmp_path):
    path = tmp_path / "gpu.json"
    cluster = profile_cluster(1, path, quick=True)
    device = cluster.device_of(0)
    total = torch.cuda.get_device_properties(0).total_memory
    assert cluster.backend == "nccl" and device.name == torch.cuda.get_device_name(0)
    assert total / 2 < device.memory_bytes < total - CUDA_RESERVE_BYTES  # the GPU's, not the host's RAM
    bf16 = max(rate for _, rate in device.matmul_curve_bf16)
    assert len(device.matmul_curve_bf16) == len(SIZES["cuda"]["matmul"]["quick"])  # bf16 in quick mode too
    assert device.peak_flops == bf16 > max(rate for _, rate in device.matmul_curve)
    assert pcompile.Cluster.from_profile(path) == cluster


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_quick_profile_on_two_gpus():
    cluster = profile_cluster(2, quick=True)
    assert cluster.backend == "nccl" and cluster.num_nodes == 1
    ops = {(f.op, f.group_size, f.link) for f in cluster.collectives}
    assert {(op, 2, "intra") for op in ("all_reduce", "all_gather", "reduce_scatter", "send")} <= ops
    assert cluster.intra_node_bandwidth > 2e9 and cluster.wakeup == ()  # GPUs: no cores shared
