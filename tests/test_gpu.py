"""The CUDA path: tests that need a GPU skip themselves without one (`make gpu-check` runs them
on a GPU machine). Where the logic runs on the CPU too, the test runs on both."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile import Plan
from pcompile.models import GPT, GPTConfig, gpt_inputs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
CFG = GPTConfig(vocab_size=128, hidden=64, num_layers=2)


def _state(device: str):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def test_dropout_streams_leave_the_process_generator_alone():
    """On the GPU when there is one, else on the CPU (a one-device plan runs where rank_device says)."""
    torch.manual_seed(0)
    cm = pcompile.compile(GPT(dataclasses.replace(CFG, dropout=0.3)), pcompile.Cluster.local(1), gpt_inputs(CFG, 4))
    device = cm.device.type
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    before = _state(device)
    first = cm.manual_seed(11).train_step(*gpt_inputs(CFG, 4)).item()
    assert torch.equal(_state(device), before)  # neither read nor advanced
    assert cm.manual_seed(11).train_step(*gpt_inputs(CFG, 4)).item() == first  # the streams decide
    assert cm.manual_seed(12).train_step(*gpt_inputs(CFG, 4)).item() != first


@CUDA
def test_a_meta_model_is_allocated_on_the_gpu_and_trains_like_the_serial_one():
    with torch.device("meta"):
        model = GPT(CFG)
    cm = pcompile.compile(model, pcompile.Cluster.local(1), gpt_inputs(CFG, 4)).init_weights(2)
    assert all(t.is_cuda for t in cm.parameters())
    serial = pcompile.init_weights(GPT(CFG), 2).cuda()
    x, y = (t.cuda() for t in gpt_inputs(CFG, 4))
    expected = serial(x, y)
    expected.backward()
    assert abs(cm.train_step(x, y).item() - expected.item()) < 1e-5
    for name, grad in cm.full_grads().items():
        assert torch.allclose(grad, dict(serial.named_parameters())[name].grad, atol=1e-5), name


@CUDA
def test_bf16_on_the_gpu_stays_near_fp32():
    torch.manual_seed(0)
    model = GPT(CFG)
    serial = GPT(CFG).cuda()
    serial.load_state_dict(model.state_dict())
    cm = pcompile.compile(model, pcompile.Cluster.local(1), gpt_inputs(CFG, 4), mixed_precision="bf16")
    x, y = (t.cuda() for t in gpt_inputs(CFG, 4))
    loss = cm.train_step(x, y)
    assert loss.dtype == torch.float32 and abs(loss.item() - serial(x, y).item()) < 3e-2 * loss.item()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in cm.parameters())


@CUDA
def test_compile_with_inductor_gives_the_eager_gradients():
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cm = pcompile.compile(GPT(CFG), pcompile.Cluster.local(1), gpt_inputs(CFG, 4))
        if compiled:
            cm.compile()
        cm.train_step(*gpt_inputs(CFG, 4))
        grads.append(cm.full_grads())
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-3, atol=1e-5), name


def _pipeline_with_buffers(_):
    """A pipeline rank on NCCL: a model whose stages hold buffers (GPT + a registered causal
    mask) runs on its GPU; loss equals the serial model's."""
    import torch.distributed as dist

    class Masked(GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.register_buffer("scale", torch.ones(cfg.hidden))

        def forward(self, idx, targets):
            positions = torch.arange(idx.shape[1], device=idx.device)
            x = (self.tok_emb(idx) + self.pos_emb(positions)) * self.scale
            for block in self.blocks:
                x = block(x)
            return torch.nn.functional.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())

    torch.manual_seed(0)
    model = Masked(CFG)
    serial = Masked(CFG).cuda()
    serial.load_state_dict(model.state_dict())
    plan = dataclasses.replace(Plan.uniform(pp=2), num_microbatches=2)
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, 4), plan=plan)
    loss = cm.train_step(*gpt_inputs(CFG, 4)).item()
    expected = serial(*(t.cuda() for t in gpt_inputs(CFG, 4))).item()
    cm.close()
    return abs(loss - expected)


@TWO_GPUS
def test_pipeline_stages_keep_their_buffers_on_their_gpu():
    assert max(pcompile.launch(_pipeline_with_buffers, 2, None, backend="nccl")) < 1e-5


@CUDA
def test_an_export_capture_from_cpu_inputs_runs_on_the_gpu():
    from tests.models import zoo

    torch.manual_seed(0)
    model = zoo.llama()
    serial = zoo.llama().cuda()
    serial.load_state_dict(model.state_dict())
    cm = pcompile.compile(model, pcompile.Cluster.local(1), zoo.token_batch(0))  # CPU example inputs
    batch = tuple(t.cuda() for t in zoo.token_batch(1))
    assert abs(cm.train_step(*batch).item() - serial(*batch).item()) < 1e-4
