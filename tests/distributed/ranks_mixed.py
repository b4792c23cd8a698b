"""Rank functions for test_mixed_plans.py: forced plans whose layers use different (dp, tp)
groupings inside one stage, compared with the serial model by ranks.compare_with_serial."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile import checkpoint
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Plan, Strategy
from tests.distributed import ranks_checkpoint as rc
from tests.distributed.ranks import MODELS, compare_with_serial

GPT4 = GPTConfig(num_layers=4)
# compare_with_serial builds models by name: a 4-block GPT (tied head) for the tp2 -> tp4 -> tp1 plans.
MODELS.setdefault("gpt4", (lambda: GPT(GPT4), lambda seed: gpt_inputs(GPT4, 8, seed)))


class LinearFirst(nn.Module):
    """A block whose first op is a column-parallel Linear reading the previous layer's output;
    with `batch`, it also views its output with a batch size read outside it."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, batch=None):
        y = x + self.down(F.relu(self.up(x)))
        return y if batch is None else y.view(batch, 8)


class LinearFirstModel(nn.Module):
    def __init__(self, pass_batch: bool = False):
        super().__init__()
        self.pass_batch = pass_batch
        self.blocks = nn.ModuleList([LinearFirst() for _ in range(2)])

    def forward(self, x, y):
        batch = x.shape[0] if self.pass_batch else None
        for block in self.blocks:
            x = block(x, batch)
        return F.mse_loss(x, y)


def _linear_first_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)


MODELS.setdefault("linear-first", (LinearFirstModel, _linear_first_inputs))


def mixed(default: Strategy, **layers: Strategy) -> Plan:
    """`default` for unnamed layers; keyword names use "_" for "." (blocks_0 -> blocks.0)."""
    return Plan(num_devices=4, default=default,
                layers=tuple(LayerAssignment(name.replace("_", "."), s) for name, s in layers.items()))


DP2TP2, DP1TP4, DP4TP1 = Strategy(dp=2, tp=2), Strategy(dp=1, tp=4), Strategy(dp=4, tp=1)
CASES = [
    # the example: blocks 0-1 at dp2·tp2, blocks 2-3 at dp1·tp4, the head at dp4·tp1;
    # the tied embedding/head weight is read at dp2 ("pre") and dp4 ("post")
    ("gpt4", mixed(DP2TP2, blocks_2=DP1TP4, blocks_3=DP1TP4, post=DP4TP1)),
    # dp vs sdp across layers with different groupings (ZeRO-3 over dp2, over dp4, plain dp)
    ("gpt4", mixed(DP2TP2, blocks_0=Strategy(dp=2, tp=2, sdp=True), blocks_1=DP1TP4,
                   blocks_2=Strategy(dp=4, sdp=True), blocks_3=DP4TP1)),
    # mixing plus checkpointing (the reshard inside a recomputed layer), input at dp4; the untied
    # head at tp2 (a tied table would be vocab-split at tp2 in "post" and read at tp1 in "pre": refused)
    ("gpt-untied", mixed(DP4TP1, blocks_0=Strategy(dp=1, tp=4, checkpoint=True),
                  blocks_1=Strategy(dp=2, tp=2, checkpoint=True), post=DP2TP2)),
    # a model that is not a GPT: residual MLP, tp2 -> tp4 (checkpointed) -> tp1 with ZeRO-3
    ("mlp", mixed(DP4TP1, blocks_0=DP2TP2, blocks_1=Strategy(dp=1, tp=4, checkpoint=True),
                  post=Strategy(dp=4, sdp=True))),
    # blocks whose first op is a column Linear on the previous layer's output: the batch is
    # regrouped before that Linear's tp_copy (dp4 -> dp2·tp2 -> dp1·tp4 -> dp4)
    ("linear-first", mixed(DP4TP1, blocks_0=DP2TP2, blocks_1=DP1TP4)),
    # the shape the search gives GPT-3: the tied table vocab-split at tp2 and read by a ZeRO-3
    # "pre" and a plain "post" at one dp, blocks at tp4
    ("gpt", mixed(DP1TP4, pre=Strategy(dp=2, tp=2, sdp=True), post=DP2TP2)),
    # ZeRO-3 and tp both off the default grouping (sdp over "dp2", tp over "tp2"): also saved and
    # loaded by test_mixed_plans (a checkpoint places such parameters on their own 2-d mesh)
    ("gpt", mixed(DP4TP1, blocks_0=Strategy(dp=2, tp=2, sdp=True), blocks_1=DP1TP4, post=Strategy(dp=4, sdp=True))),
]


def compare_cases(indices: list[int]) -> list[dict]:
    out = []
    for i in indices:
        name, plan = CASES[i]
        result = compare_with_serial(name, plan)
        result["plan"] = str(plan)
        out.append(result)
    return out


def checkpoint_roundtrip(plan: Plan, directory: str) -> dict:
    """Train 2 steps under `plan`, save; load into a model built from other weights: what each held."""
    saved, optimizer = rc.build(plan)
    rc.train(saved, optimizer, range(2))
    checkpoint.save(saved, directory, optimizer, step=2)
    loaded, fresh = rc.build(plan, seed=123)
    step = checkpoint.load(loaded, directory, fresh)
    return {"step": step, "saved": saved.full_state_dict(),
            "saved_optim": checkpoint.full_optimizer_state(saved, optimizer),
            "loaded": loaded.full_state_dict(), "loaded_optim": checkpoint.full_optimizer_state(loaded, fresh)}


def run_all(indices: list[int], directory: str) -> dict:
    """Every case against serial, then the last case's plan through a checkpoint (one launch)."""
    return {"cases": compare_cases(indices), "checkpoint": checkpoint_roundtrip(CASES[-1][1], directory)}


if __name__ == "__main__":
    for results in pcompile.launch(compare_cases, 4, list(range(len(CASES)))):
        for r in results:
            print(r["model"], r["loss_diff"], r["grad_diff"], r["param_diff"])
