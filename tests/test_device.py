"""Which device a rank computes on (pcompile.launch.device_for): the process group's backend
string decides, whatever its form, and the GPU is the LOCAL_RANK-th."""
import pytest
import torch

import pcompile
from pcompile.launch import device_for


@pytest.mark.parametrize("backend, expected", [
    ("nccl", torch.device("cuda", 3)),
    ("cpu:gloo,cuda:nccl", torch.device("cuda", 3)),
    ("cuda:nccl,cpu:gloo", torch.device("cuda", 3)),
    ("gloo", torch.device("cpu")),
    ("cpu:gloo", torch.device("cpu")),
    (None, torch.device("cuda", 3)),  # no process group: a one-device plan runs on the GPU
])
def test_the_backend_string_and_local_rank_decide_the_device(backend, expected):
    assert device_for(backend, 3, cuda_available=True) == expected


def test_without_cuda_every_rank_computes_on_the_cpu_and_nccl_is_refused():
    assert device_for(None, 2, cuda_available=False) == torch.device("cpu")
    assert device_for("gloo", 2, cuda_available=False) == torch.device("cpu")
    with pytest.raises(pcompile.PcompileError, match="needs CUDA"):
        device_for("cpu:gloo,cuda:nccl", 0, cuda_available=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_one_device_plan_without_a_process_group_runs_on_the_gpu():
    from pcompile.models import GPT, GPTConfig, gpt_inputs

    cfg = GPTConfig(vocab_size=128, hidden=64, num_layers=2)
    cm = pcompile.compile(GPT(cfg), pcompile.Cluster.local(1), gpt_inputs(cfg, 4))
    assert cm.device.type == "cuda"
    assert all(p.is_cuda for p in cm.parameters())
    assert cm.train_step(*gpt_inputs(cfg, 4)).is_cuda
