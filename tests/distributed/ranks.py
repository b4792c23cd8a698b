"""Rank functions for pcompile.launch (module-level so they pickle), shared by the tests."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs

MODELS = {
    "gpt": (lambda: GPT(GPTConfig()), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "gpt-untied": (lambda: GPT(GPTConfig(tie_head=False)), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "mlp": (lambda: MLPModel(MLPConfig()), lambda seed: mlp_inputs(MLPConfig(), 16, seed)),
}


def gap(got, expected) -> float:
    """The largest absolute difference of two numbers or tensors; inf when either holds a NaN
    (Python's max() would silently drop a NaN difference)."""
    diff = (torch.as_tensor(got, dtype=torch.float64) - torch.as_tensor(expected, dtype=torch.float64)).abs()
    return float("inf") if torch.isnan(diff).any() else (diff.max().item() if diff.numel() else 0.0)


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name, expected in b.items():
        got = a[name]
        if (got is None) != (expected is None):
            return float("inf")
        if got is not None:
            worst = max(worst, gap(got.detach(), expected.detach()))
    return worst


def train_side_by_side(build, inputs, plan, steps: int = 3, lr: float = 1e-2, cluster: pcompile.Cluster | None = None,
                       before=None):
    """Compile `build()` under `plan` (a Plan, or a function (model, cluster, inputs) -> Plan
    that plans it), call `before(compiled)` if given, then `steps` AdamW steps in parallel and on
    a serial copy: the side-by-side loop every equivalence test runs. Returns (compiled model,
    serial model, worst loss diff, worst gradient diff, per-step (parallel, serial) losses)."""
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cluster = cluster or pcompile.Cluster.local(world)
    if callable(plan):
        plan = plan(copy.deepcopy(model), cluster, inputs(0))
    cm = pcompile.compile(model, cluster, inputs(0), plan=plan)
    if before is not None:
        before(cm)
    optimizers = (torch.optim.AdamW(cm.parameters(), lr=lr), torch.optim.AdamW(serial.parameters(), lr=lr))
    loss_diff = grad_diff = 0.0
    losses = []
    for step in range(steps):
        batch = inputs(step)
        loss = cm.train_step(*batch)
        expected = serial(*batch)
        expected.backward()
        losses.append((loss.item(), expected.item()))
        loss_diff = max(loss_diff, gap(loss.item(), expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return cm, serial, loss_diff, grad_diff, losses


def compare_with_serial(model_name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """Train `steps` AdamW steps in parallel and serially; report the worst differences."""
    cm, serial, loss_diff, grad_diff, losses = train_side_by_side(*MODELS[model_name], plan, steps, lr)
    param_diff = _max_diff(cm.full_state_dict(), serial.state_dict())
    return {"model": model_name, "plan": plan.default.describe(), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": param_diff, "losses": losses}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare_with_serial(name, plan) for name, plan in cases]
