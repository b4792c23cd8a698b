"""Rank functions for the model-zoo tests (module-level so pcompile.launch can pickle them)."""
from __future__ import annotations

import time

import pcompile
from tests.distributed.ranks import train_side_by_side
from tests.models.zoo import MODELS


def describe(plan: pcompile.Plan) -> str:
    """The plan's strategy, with the pipeline's degree, schedule and micro-batches when pp > 1."""
    if plan.pp == 1:
        return plan.default.describe()
    return f"pp{plan.pp}·{plan.default.describe()}·{plan.schedule}·mb{plan.num_microbatches}"


def compare(model_name: str, plan: pcompile.Plan, steps: int = 2, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps in parallel and serially: worst loss and full-gradient differences."""
    start = time.perf_counter()
    cm, _, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], plan, steps, lr)
    counts = cm.ir.op_counts()
    split = cm.ir.pipeline
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "capture": cm.ir.capture, "layers": list(cm.ir.block_layers), "report": list(cm.report),
            "split": sorted(cm.ir.param_shardings),
            "stages": [list(s.layers) for s in split.stages] if split else [],
            "collectives": {k.rsplit(".", 1)[-1]: v for k, v in counts.items() if "collectives" in k},
            "seconds": time.perf_counter() - start, "compile_seconds": sum(s for _, s in cm.timings)}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]
