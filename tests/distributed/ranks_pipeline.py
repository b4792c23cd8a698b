"""Rank functions for the pipeline tests (module-level so they pickle)."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.fx as fx

import pcompile
from pcompile.api import PIPELINE
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.passes.pipeline_split import pipeline_of
from pcompile.plan import LayerAssignment

GPT4 = GPTConfig(num_layers=4)  # pp=2 interleaved / pp=4: one block per stage
GPT8 = GPTConfig(num_layers=8)  # pp=4 interleaved: 8 stages
MLP4 = MLPConfig(num_layers=4)
BATCH = 8

MODELS = {
    "gpt4": (lambda: GPT(GPT4), lambda seed: gpt_inputs(GPT4, BATCH, seed)),
    "gpt8": (lambda: GPT(GPT8), lambda seed: gpt_inputs(GPT8, BATCH, seed)),
    "gpt4-untied": (lambda: GPT(dataclasses.replace(GPT4, tie_head=False)), lambda seed: gpt_inputs(GPT4, BATCH, seed)),
    "mlp4": (lambda: MLPModel(MLP4), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
    "mlp6": (lambda: MLPModel(dataclasses.replace(MLP4, num_layers=6)), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
    "mlp8": (lambda: MLPModel(dataclasses.replace(MLP4, num_layers=8)), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
}
PASSES = PIPELINE if "pipeline_split" in PIPELINE else PIPELINE + ["pipeline_split"]


def pipeline_plan(pp: int, schedule: str, microbatches: int, dp: int = 1, tp: int = 1, virtual_stages: int = 0,
                  sdp: bool = False, checkpoint: tuple[str, ...] = ()) -> pcompile.Plan:
    """A uniform plan; virtual_stages 0 = 2 for the interleaved schedule, else 1; the layers of
    `checkpoint` also recompute their activations."""
    v = virtual_stages or (2 if schedule == "Interleaved1F1B" else 1)
    plan = dataclasses.replace(pcompile.Plan.uniform(dp=dp, tp=tp, pp=pp, sdp=sdp), schedule=schedule,
                               num_microbatches=microbatches, virtual_stages=v)
    strategy = dataclasses.replace(plan.default, checkpoint=True)
    return dataclasses.replace(plan, layers=tuple(LayerAssignment(layer, strategy) for layer in checkpoint))


def describe(plan: pcompile.Plan) -> str:
    layers = "".join(f"·{a.layer}:{a.strategy.describe()}" for a in plan.layers)
    return (f"pp{plan.pp}·{plan.default.describe()}·{plan.schedule}·v{plan.virtual_stages}·mb{plan.num_microbatches}"
            + layers)


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name, expected in b.items():
        got = a[name]
        if (got is None) != (expected is None):
            return float("inf")
        if got is not None:
            worst = max(worst, (got.float() - expected.float()).abs().max().item())
    return worst


def compare(model_name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-3) -> dict:
    """`steps` AdamW steps pipelined and serially: worst loss / gradient / parameter differences.

    lr=1e-3: Adam moves an entry whose gradient is ~0 by ~lr whatever the gradient's rounding
    noise, so two exact programs drift apart by O(lr) there and the next step's gradients by
    O(lr) x curvature. At lr=1e-2 that alone is 1.1e-5 on the 4-block MLP for the plain
    (dp2, tp2) plan of backends/distributed.py, before any pipelining (measured)."""
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    world = dist.get_world_size()
    cm = pcompile.compile(model, pcompile.Cluster.local(world), inputs(0), plan=plan, passes=PASSES)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        x, y = inputs(step)
        loss = cm.train_step(x, y)
        expected = serial(x, y)
        expected.backward()
        loss_diff = max(loss_diff, abs(loss.item() - expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad()
        serial_optimizer.step()
        serial_optimizer.zero_grad()
    state = cm.full_state_dict()
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(state, serial.state_dict()), "keys": sorted(state) == sorted(serial.state_dict()),
            "stages": [s.index for s in pipeline_of(cm.ir).stages for _ in s.layers],
            "plan_stages": [a.stage for a in cm.plan.layers], "local_params": sum(p.numel() for p in cm.parameters()),
            "sdp_chunks": len(cm._pipeline.sdp_params),
            "regions": sum(isinstance(m, fx.GraphModule) and m is not module  # checkpointed layers
                           for module in cm._pipeline.modules for m in module.modules()),
            "checkpointed": sorted(a.layer for a in cm.plan.layers if a.strategy.checkpoint)}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]
