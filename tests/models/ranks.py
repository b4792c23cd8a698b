"""Rank functions for the model-zoo tests (module-level so pcompile.launch can pickle them)."""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

import pcompile
from pcompile.passes.pipeline_split import pipeline_of
from tests.models.zoo import MODELS


def describe(plan: pcompile.Plan) -> str:
    """The plan's strategy, with the pipeline's degree, schedule and micro-batches when pp > 1."""
    if plan.pp == 1:
        return plan.default.describe()
    return f"pp{plan.pp}·{plan.default.describe()}·{plan.schedule}·mb{plan.num_microbatches}"


def _worst(got: dict, expected: dict) -> float:
    worst = 0.0
    for name, value in expected.items():
        if (got.get(name) is None) != (value is None):
            return float("inf")
        if value is not None:
            worst = max(worst, (got[name].float() - value.float()).abs().max().item())
    return worst


def compare(model_name: str, plan: pcompile.Plan, steps: int = 2, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps in parallel and serially: worst loss and full-gradient differences."""
    build, batch = MODELS[model_name]
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), batch(0), plan=plan)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        inputs = batch(step)
        loss = cm.train_step(*inputs)
        expected = serial(*inputs)
        expected.backward()
        loss_diff = max(loss_diff, abs(loss.item() - expected.item()))
        grad_diff = max(grad_diff, _worst(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for opt in (optimizer, serial_optimizer):
            opt.step()
            opt.zero_grad()
    counts = cm.ir.op_counts()
    split = pipeline_of(cm.ir)
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "capture": cm.ir.capture, "layers": list(cm.ir.block_layers), "report": list(cm.report),
            "split": sorted(cm.ir.param_shardings),
            "stages": [list(s.layers) for s in split.stages] if split else [],
            "collectives": {k.rsplit(".", 1)[-1]: v for k, v in counts.items() if "collectives" in k},
            "seconds": time.perf_counter() - start, "compile_seconds": sum(s for _, s in cm.timings)}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]
