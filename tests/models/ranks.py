"""Rank functions for the model-zoo tests (module-level so pcompile.launch can pickle them)."""
from __future__ import annotations

import time

import torch

import pcompile
from tests.distributed.ranks import train_side_by_side
from tests.models.zoo import MODELS


def describe(plan: pcompile.Plan | None) -> str:
    """The plan's strategy, with the pipeline's degree, schedule and micro-batches when pp > 1;
    "searched" for None (pcompile.plan chooses it on the ranks)."""
    if plan is None:
        return "searched"
    if plan.pp == 1:
        return plan.default.describe()
    return f"pp{plan.pp}·{plan.default.describe()}·{plan.schedule}·mb{plan.num_microbatches}"


def _searched(model, cluster, inputs) -> pcompile.Plan:
    return pcompile.plan(model, cluster, inputs)


def compare(model_name: str, plan: pcompile.Plan | None, steps: int = 2, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps in parallel and serially: worst loss and full-gradient differences;
    a plan pcompile refuses gives its message ("refused") instead."""
    start = time.perf_counter()
    try:
        cm, _, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], plan or _searched, steps, lr)
    except pcompile.PcompileError as refusal:
        return {"model": model_name, "plan": describe(plan), "refused": str(refusal),
                "seconds": time.perf_counter() - start}
    counts = cm.ir.op_counts()
    split = cm.ir.pipeline
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "capture": cm.ir.capture, "layers": list(cm.ir.block_layers), "report": list(cm.report),
            "split": sorted(cm.ir.param_shardings), "chosen": str(cm.plan), "refused": None,
            "stages": [list(s.layers) for s in split.stages] if split else [],
            "collectives": {k.rsplit(".", 1)[-1]: v for k, v in counts.items() if "collectives" in k},
            "seconds": time.perf_counter() - start, "compile_seconds": sum(s for _, s in cm.timings)}


def grad_scale(model_name: str) -> float:
    """The largest gradient of the serial model's first step: the gradient tolerance is relative
    to it where it exceeds 1 (the BatchNorm ResNet's conv gradients reach ~5; its serial fp32
    gradients are themselves ~2e-5 off an fp64 twin's)."""
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    model(*inputs(0)).backward()
    return max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)


def compare_bf16(model_name: str, plan: pcompile.Plan) -> dict:
    """mixed_precision="bf16" against the serial bf16 recipe (tests/distributed/ranks_mixed_precision);
    a refusal gives its message."""
    from tests.distributed.ranks_mixed_precision import run_bf16

    try:
        return {**run_bf16(model_name, plan, MODELS), "plan": describe(plan) + "·bf16", "refused": None}
    except pcompile.PcompileError as refusal:
        return {"model": model_name, "plan": describe(plan) + "·bf16", "refused": str(refusal)}


def compare_many(cases: list[tuple]) -> list[dict]:
    """(model, plan) in fp32, or (model, plan, "bf16")."""
    out = []
    for name, plan, *precision in cases:
        if precision:
            out.append(compare_bf16(name, plan))
        else:
            result = compare(name, plan)
            off = (result.get("grad_diff") or 0.0) > 1e-5  # only then is the scale needed
            out.append({**result, "grad_scale": grad_scale(name) if off else None})
    return out
