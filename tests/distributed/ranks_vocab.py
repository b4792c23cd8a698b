"""Rank functions for the vocab-parallel tests (module-level so pcompile.launch can pickle them)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.distributed.ranks import _max_diff
from tests.models import zoo

ODD = GPTConfig(vocab_size=250)  # 250 rows: tp=4 cannot split the vocabulary


class ClassDimGPT(GPT):
    """Loss through nn.CrossEntropyLoss on [b, V, s] logits (the class dim is 1), summed, with
    token 0 ignored: the parallel cross-entropy's module form, N-d input and other options.
    (A summed loss is not a mean over the batch, so it is compared without data parallelism.)"""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.loss = nn.CrossEntropyLoss(ignore_index=0, reduction="sum")

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.loss(self.head(self.ln_f(x)).transpose(1, 2), targets) / 100


def _ignored(cfg: GPTConfig):
    """Batches whose targets are token 0 in about a tenth of the positions."""
    def batch(seed: int):
        idx, targets = gpt_inputs(cfg, 8, seed)
        return idx, targets.masked_fill(targets % 10 == 0, 0)
    return batch


MODELS = {
    "gpt": (lambda: GPT(GPTConfig()), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "gpt-untied": (lambda: GPT(GPTConfig(tie_head=False)), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "gpt-v250": (lambda: GPT(ODD), lambda seed: gpt_inputs(ODD, 8, seed)),
    "gpt-classdim": (lambda: ClassDimGPT(GPTConfig()), _ignored(GPTConfig())),
    "hf-gpt2": (zoo.gpt2, zoo.token_batch),
}


def compare(name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps in parallel and serially: worst differences, and what was split."""
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), inputs(0), plan=plan)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        batch = inputs(step)
        loss = cm.train_step(*batch)
        expected = serial(*batch)
        expected.backward()
        loss_diff = max(loss_diff, abs(loss.item() - expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for opt in (optimizer, serial_optimizer):
            opt.step()
            opt.zero_grad()
    counts = {k.rsplit(".", 1)[-1]: v for k, v in cm.ir.op_counts().items() if "vocab_parallel" in k}
    module = cm.gm if cm.plan.pp == 1 else nn.Module()  # a pipeline holds one module per stage
    local = dict(module.named_parameters(remove_duplicate=False))
    return {"model": name, "plan": plan.default.describe(), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()), "vocab_ops": counts,
            "shardings": {n: s for n, s in cm.ir.param_shardings.items() if "emb" in n or "head" in n or "wte" in n},
            "local_shapes": {n: tuple(p.shape) for n, p in local.items() if "emb" in n or "head" in n or "wte" in n},
            "parameters": len(list(cm.parameters())), "serial_parameters": len(list(serial.parameters())),
            "report": [line for line in cm.report if "vocab" in line]}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]
