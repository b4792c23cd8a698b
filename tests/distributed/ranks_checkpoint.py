"""Rank functions for the checkpoint tests (module-level so they pickle)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import pcompile
from pcompile import checkpoint
from pcompile.models import GPT, GPTConfig, gpt_inputs

CONFIG = GPTConfig(num_layers=2)
BATCH = 8


def build(plan: pcompile.Plan, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cm = pcompile.compile(model, pcompile.Cluster.local(world), gpt_inputs(CONFIG, BATCH), plan=plan)
    return cm, torch.optim.AdamW(cm.parameters(), lr=1e-2)


def train(cm, optimizer, steps: range, inputs=lambda step: gpt_inputs(CONFIG, BATCH, seed=step)) -> list[float]:
    losses = []
    for step in steps:
        losses.append(cm.train_step(*inputs(step)).item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


def save_after(plan: pcompile.Plan, directory: str, steps: int) -> dict:
    cm, optimizer = build(plan)
    losses = train(cm, optimizer, range(steps))
    checkpoint.save(cm, directory, optimizer, step=steps)
    return {"losses": losses, "state": cm.full_state_dict(),
            "optim": checkpoint.full_optimizer_state(cm, optimizer)}


def load_and_continue(plan: pcompile.Plan, directory: str, steps: range) -> dict:
    cm, optimizer = build(plan, seed=123)  # different initial weights: the load must overwrite them
    step = checkpoint.load(cm, directory, optimizer)
    state = cm.full_state_dict()
    optim = checkpoint.full_optimizer_state(cm, optimizer)
    return {"step": step, "state": state, "optim": optim, "losses": train(cm, optimizer, steps)}



def load_continue_save(plans: list[pcompile.Plan], directory: str, steps: range, out: str) -> list[dict]:
    """For each plan: load `directory`, train `steps`, save to `out`/<index>; what it held then."""
    results = []
    for index, plan in enumerate(plans):
        cm, optimizer = build(plan, seed=123)
        step = checkpoint.load(cm, directory, optimizer)
        loaded = {"step": step, "state": cm.full_state_dict(), "optim": checkpoint.full_optimizer_state(cm, optimizer)}
        losses = train(cm, optimizer, steps)
        checkpoint.save(cm, f"{out}/{index}", optimizer, step=steps.stop)
        results.append({**loaded, "losses": losses, "after": cm.full_state_dict(),
                        "optim_after": checkpoint.full_optimizer_state(cm, optimizer)})
    return results


def node_local_directories(root: str) -> dict:
    """Each rank given its own directory, as node-local disks would: save and load refuse."""
    import os

    cm, optimizer = build(pcompile.Plan.uniform(dp=2))
    mine = os.path.join(root, f"rank{dist.get_rank()}")
    out = {}
    try:
        checkpoint.save(cm, mine, optimizer)
    except pcompile.PcompileError as error:
        out["save"] = (error.cause, error.fix)
    shared = os.path.join(root, "shared")
    checkpoint.save(cm, shared, optimizer)  # a shared directory works
    try:  # rank 1 looks where only its own (empty) disk is
        checkpoint.load(cm, shared if dist.get_rank() == 0 else mine, optimizer)
    except pcompile.PcompileError as error:
        out["load"] = (error.cause, error.fix)
    return out


# -- expert parallelism: each rank saves and loads the experts it holds ----------------------------
MOE_CONFIG = None  # built on first use (pcompile.models.MoEGPTConfig)


def _moe(plan: pcompile.Plan, seed: int = 0):
    from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs

    global MOE_CONFIG
    MOE_CONFIG = MOE_CONFIG or MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, aux_loss_coef=0.01)
    torch.manual_seed(seed)
    cm = pcompile.compile(MoEGPT(MOE_CONFIG), pcompile.Cluster.local(dist.get_world_size()),
                          moe_gpt_inputs(MOE_CONFIG, BATCH), plan=plan)
    return cm, torch.optim.AdamW(cm.parameters(), lr=1e-2)


def _moe_train(cm, optimizer, steps: range) -> list[float]:
    from pcompile.models import moe_gpt_inputs

    return train(cm, optimizer, steps, lambda step: moe_gpt_inputs(MOE_CONFIG, BATCH, seed=step))


def experts_save_and_load(saved_under: pcompile.Plan, loads: list[pcompile.Plan], directory: str) -> dict:
    """Train 2 steps under `saved_under` (ep), save, train 2 more (the uninterrupted run); then for
    each plan of `loads`: a model of other initial weights loads the checkpoint and trains the
    same 2 steps. Full states / Adam states as loaded, and the losses."""
    cm, optimizer = _moe(saved_under)
    _moe_train(cm, optimizer, range(2))
    checkpoint.save(cm, directory, optimizer, step=2)
    saved = {"state": cm.full_state_dict(), "optim": checkpoint.full_optimizer_state(cm, optimizer)}
    saved["losses"] = _moe_train(cm, optimizer, range(2, 4))
    cm.close()
    out = []
    for plan in loads:
        cm, optimizer = _moe(plan, seed=123)
        step = checkpoint.load(cm, directory, optimizer)
        out.append({"step": step, "state": cm.full_state_dict(),
                    "optim": checkpoint.full_optimizer_state(cm, optimizer),
                    "losses": _moe_train(cm, optimizer, range(2, 4))})
        cm.close()
    return {"saved": saved, "loaded": out}
