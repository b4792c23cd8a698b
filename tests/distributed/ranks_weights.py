"""Rank functions for the weights tests: models built on the meta device, compiled, then given
values by init_weights / load_weights on every rank, each rank allocating and reading only its
pieces."""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.distributed.ranks import _max_diff, gap

CFG = GPTConfig(vocab_size=512, hidden=128, num_layers=4)


def meta_gpt(cfg: GPTConfig = CFG) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weights(plan, seed: int, path: str, build=meta_gpt, batch=None) -> dict:
    """init_weights(seed) and load_weights(path) of a meta model under `plan`: the full states, and
    the rank's peak RSS growth while compiling and filling."""
    model = build()
    batch = batch or gpt_inputs(CFG, 8)
    before = peak_rss()
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), batch, plan=plan)
    cm.init_weights(seed)
    initialised = cm.full_state_dict()
    cm.load_weights(path)
    growth = peak_rss() - before
    return {"init": initialised, "loaded": cm.full_state_dict(), "rss_growth": growth,
            "local_numel": sum(p.numel() for p in cm.parameters())}


def train_from_file(plan, path: str, steps: int = 3) -> dict:
    """Loaded weights, then 3 AdamW steps next to the serial model loaded from the same file."""
    from safetensors import safe_open

    from pcompile.runtime.materialise import checkpoint_files

    cm = pcompile.compile(meta_gpt(), pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, 8), plan=plan)
    cm.load_weights(path)
    serial = GPT(CFG)
    state = {}
    for name, file in checkpoint_files(path).items():  # one file or a sharded directory
        with safe_open(file, framework="pt") as f:
            state[name] = f.get_tensor(name)
    serial.load_state_dict(state, strict=False)  # the tied head is the embedding's table
    optimizers = (torch.optim.AdamW(cm.parameters(), lr=1e-3, eps=1e-6),
                  torch.optim.AdamW(serial.parameters(), lr=1e-3, eps=1e-6))
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        x, y = gpt_inputs(CFG, 8, seed=step)
        loss = cm.train_step(x, y)
        expected = serial(x, y)
        expected.backward()
        loss_diff = max(loss_diff, gap(loss.item(), expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return {"loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict())}


def hf_load(kind: str, plan, directory: str) -> dict:
    """A Hugging Face model saved with save_pretrained (its own names, no wrapper prefix), loaded
    into the meta-built wrapper under `plan`: the full state against the saved model's."""
    from tests.models import zoo

    build = {"gpt2": zoo.gpt2, "llama": zoo.llama}[kind]
    with torch.device("meta"):
        model = build()
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), zoo.token_batch(0), plan=plan)
    cm.load_weights(directory)
    return {"loaded": cm.full_state_dict(), "loss": cm.eval_step(*zoo.token_batch(1)).item()}


def run_all(cases) -> list:
    out = []
    for kind, args in cases:
        out.append({"weights": weights, "train": train_from_file, "hf": hf_load}[kind](*args))
    return out

