"""Rank functions: plan with the search (under a memory budget), compile, train next to serial."""
from __future__ import annotations

import torch.distributed as dist

import pcompile
from tests.distributed.ranks import MODELS, train_side_by_side


def searched_vs_serial(model_name: str, memory_bytes: int, search_space: dict | None = None, steps: int = 2) -> dict:
    cluster = pcompile.Cluster.local(dist.get_world_size(), memory_bytes=memory_bytes)

    def search(model, cluster, inputs):
        return pcompile.plan(model, cluster, inputs, search_space=search_space)

    cm, _, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], search, steps, 1e-3, cluster)
    return {"plan": cm.plan.to_dict(), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "peak_memory": cm.plan.estimate.peak_memory}


def many(cases: list[tuple]) -> list[dict]:
    """cases: (model name, memory budget[, search space])."""
    return [searched_vs_serial(*case) for case in cases]
