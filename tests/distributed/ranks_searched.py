"""Rank functions: plan with the search (under a memory budget), compile, train next to serial."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import pcompile
from tests.distributed.ranks import MODELS, _max_diff


def searched_vs_serial(model_name: str, memory_bytes: int, search_space: dict | None = None, steps: int = 2) -> dict:
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    cluster = pcompile.Cluster.local(dist.get_world_size(), memory_bytes=memory_bytes)
    plan = pcompile.plan(copy.deepcopy(model), cluster, inputs(0), search_space=search_space)
    cm = pcompile.compile(model, cluster, inputs(0), plan=plan)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=1e-3)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        x, y = inputs(step)
        loss = cm.train_step(x, y)
        expected = serial(x, y)
        expected.backward()
        loss_diff = max(loss_diff, abs(loss.item() - expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for opt in (optimizer, serial_optimizer):
            opt.step()
            opt.zero_grad()
    return {"plan": plan.to_dict(), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "peak_memory": plan.estimate.peak_memory}


def many(cases: list[tuple]) -> list[dict]:
    """cases: (model name, memory budget[, search space])."""
    return [searched_vs_serial(*case) for case in cases]
