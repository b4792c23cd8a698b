"""Rank functions for the pipeline tests (module-level so they pickle)."""
from __future__ import annotations

import dataclasses

import torch.fx as fx

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import LayerAssignment
from tests.distributed.ranks import _max_diff, train_side_by_side

GPT4 = GPTConfig(num_layers=4)  # pp=2 interleaved / pp=4: one block per stage
GPT8 = GPTConfig(num_layers=8)  # pp=4 interleaved: 8 stages
MLP4 = MLPConfig(num_layers=4)
# a large vocabulary and short sequences: the embedding / LM head want another tp than the blocks
BIG_VOCAB = GPTConfig(vocab_size=8192, seq_len=8, hidden=64, num_heads=4, num_layers=4)
BATCH = 8

MODELS = {
    "gpt4": (lambda: GPT(GPT4), lambda seed: gpt_inputs(GPT4, BATCH, seed)),
    "gpt8": (lambda: GPT(GPT8), lambda seed: gpt_inputs(GPT8, BATCH, seed)),
    "gpt4-untied": (lambda: GPT(dataclasses.replace(GPT4, tie_head=False)), lambda seed: gpt_inputs(GPT4, BATCH, seed)),
    "gpt4-vocab": (lambda: GPT(BIG_VOCAB), lambda seed: gpt_inputs(BIG_VOCAB, BATCH, seed)),
    "mlp4": (lambda: MLPModel(MLP4), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
    "mlp6": (lambda: MLPModel(dataclasses.replace(MLP4, num_layers=6)), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
    "mlp8": (lambda: MLPModel(dataclasses.replace(MLP4, num_layers=8)), lambda seed: mlp_inputs(MLP4, BATCH, seed)),
}


def pipeline_plan(pp: int, schedule: str, microbatches: int, dp: int = 1, tp: int = 1, virtual_stages: int = 0,
                  sdp: bool = False, checkpoint: tuple[str, ...] = (), sp: bool = False) -> pcompile.Plan:
    """A uniform plan; virtual_stages 0 = 2 for the interleaved schedule, else 1; the layers of
    `checkpoint` also recompute their activations."""
    v = virtual_stages or (2 if schedule == "Interleaved1F1B" else 1)
    plan = dataclasses.replace(pcompile.Plan.uniform(dp=dp, tp=tp, pp=pp, sdp=sdp, sp=sp), schedule=schedule,
                               num_microbatches=microbatches, virtual_stages=v)
    strategy = dataclasses.replace(plan.default, checkpoint=True)
    return dataclasses.replace(plan, layers=tuple(LayerAssignment(layer, strategy) for layer in checkpoint))


def with_layers(plan: pcompile.Plan, **strategies) -> pcompile.Plan:
    """`plan` with these layers' strategies ("blocks_1" names blocks.1)."""
    return dataclasses.replace(plan, layers=tuple(LayerAssignment(name.replace("_", "."), strategy)
                                                  for name, strategy in strategies.items()))


def describe(plan: pcompile.Plan) -> str:
    layers = "".join(f"·{a.layer}:{a.strategy.describe()}" for a in plan.layers)
    return (f"pp{plan.pp}·{plan.default.describe()}·{plan.schedule}·v{plan.virtual_stages}·mb{plan.num_microbatches}"
            + layers)


def compare(model_name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-3) -> dict:
    """`steps` AdamW steps pipelined and serially: worst loss / gradient / parameter differences.

    lr=1e-3: Adam moves an entry whose gradient is ~0 by ~lr whatever the gradient's rounding
    noise, so two exact programs drift apart by O(lr) there and the next step's gradients by
    O(lr) x curvature. At lr=1e-2 that alone is 1.1e-5 on the 4-block MLP for the plain
    (dp2, tp2) plan of backends/distributed.py, before any pipelining (measured)."""
    cm, serial, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], plan, steps, lr)
    state = cm.full_state_dict()
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(state, serial.state_dict()), "keys": sorted(state) == sorted(serial.state_dict()),
            "stages": [s.index for s in cm.ir.pipeline.stages for _ in s.layers],
            "plan_stages": [a.stage for a in cm.plan.layers], "local_params": sum(p.numel() for p in cm.parameters()),
            "sdp_chunks": len(cm._pipeline.sdp_params),
            "regions": sum(isinstance(m, fx.GraphModule) and m is not module  # checkpointed layers
                           for module in cm._pipeline.modules for m in module.modules()),
            "checkpointed": sorted(a.layer for a in cm.plan.layers if a.strategy.checkpoint)}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]
