"""Rank functions for the training-loop tests: the loop users write (global-norm clipping,
evaluation, gradient accumulation, rank-local batches, an optimizer's checks), next to the
serial model."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Strategy
from tests.distributed.ranks import _max_diff, gap

CFG = GPTConfig(num_layers=4)
BATCH = 8
# below the GPT's gradient norms (2-norm ~0.6-1.0, inf-norm ~0.03-0.08, 1-norm ~160-260): clipping is
# active every step
MAX_NORM = {2.0: 0.1, float("inf"): 0.01, 1.0: 50.0}


def _adamw(params):
    # eps 1e-6: an entry whose gradient is rounding noise (1e-10 here, 0 there) would otherwise move
    # by ~lr in one program and not the other, and parameters would differ by O(lr), not O(1e-7)
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6)


def plans() -> dict[str, pcompile.Plan]:
    mixed = pcompile.Plan(num_devices=4, default=Strategy(dp=2, tp=2), layers=(
        LayerAssignment("pre", Strategy(dp=4)), LayerAssignment("blocks.0", Strategy(dp=2, tp=2)),
        LayerAssignment("blocks.1", Strategy(dp=1, tp=4)), LayerAssignment("blocks.2", Strategy(dp=2, tp=2)),
        LayerAssignment("blocks.3", Strategy(dp=2, tp=2)), LayerAssignment("post", Strategy(dp=4))))
    return {"dp4": pcompile.Plan.uniform(dp=4), "dp2·tp2": pcompile.Plan.uniform(dp=2, tp=2),
            "zero3": pcompile.Plan.uniform(dp=4, sdp=True),
            "pp2·dp2": dataclasses.replace(pcompile.Plan.uniform(dp=2, pp=2), num_microbatches=2),
            "pp2·tp2": dataclasses.replace(pcompile.Plan.uniform(tp=2, pp=2), num_microbatches=2),
            "mixed": mixed}


def _compiled(plan, dropout: float = 0.0):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, dropout=dropout))
    serial = copy.deepcopy(model)
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, BATCH), plan=plan)
    return cm, serial


def clipping(name: str, norm_type: float = 2.0, torch_call: bool = True) -> dict:
    """3 AdamW steps clipped below the norm: the norms and the parameters after, against serial."""
    cm, serial = _compiled(plans()[name])
    optimizers = (_adamw(cm.parameters()), _adamw(serial.parameters()))
    norm_diff, norms = 0.0, []
    for step in range(3):
        x, y = gpt_inputs(CFG, BATCH, seed=step)
        cm.train_step(x, y)
        serial(x, y).backward()
        if torch_call:  # what users write
            norm = torch.nn.utils.clip_grad_norm_(cm.parameters(), MAX_NORM[norm_type], norm_type=norm_type)
        else:
            norm = cm.clip_grad_norm_(MAX_NORM[norm_type], norm_type=norm_type)
        expected = torch.nn.utils.clip_grad_norm_(serial.parameters(), MAX_NORM[norm_type], norm_type=norm_type)
        norms.append((norm.item(), expected.item()))
        norm_diff = max(norm_diff, gap(norm, expected) / expected.item())
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return {"plan": name, "norm_type": norm_type, "max_norm": MAX_NORM[norm_type], "norm_rel_diff": norm_diff,
            "norms": norms,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict())}


def evaluation(name: str) -> dict:
    """eval_step with dropout in the model (it must be off) against the serial model in eval mode,
    after a training step (in train mode: the model's dropout draws its masks)."""
    cm, serial = _compiled(plans()[name], dropout=0.3)
    x, y = gpt_inputs(CFG, BATCH, seed=5)
    serial.eval()
    with torch.no_grad():
        expected = serial(x, y)
    got = cm.eval_step(x, y)
    return {"plan": name, "eval_diff": gap(got, expected), "training_after": cm.training}


def accumulation(name: str) -> dict:
    """4 train_steps before one optimizer step (3 of them under no_sync), and 4 synced ones,
    against the serial model's 4 backward passes; then rank-local batches against the global form."""
    cm, serial = _compiled(plans()[name])
    batches = [gpt_inputs(CFG, BATCH, seed=step) for step in range(4)]
    for x, y in batches:
        serial(x, y).backward()
    expected = {n: p.grad for n, p in serial.named_parameters()}
    for i, (x, y) in enumerate(batches):
        if i < 3:
            with cm.no_sync():
                cm.train_step(x, y)
        else:
            cm.train_step(x, y)
    no_sync_diff = _max_diff(cm.full_grads(), expected)
    for p in cm.parameters():
        p.grad = None
    for x, y in batches:
        cm.train_step(x, y)
    synced_diff = _max_diff(cm.full_grads(), expected)
    for p in cm.parameters():
        p.grad = None
    x, y = batches[0]
    part = [t.chunk(cm.data_world)[cm.data_rank] for t in (x, y)]
    local_loss = cm.train_step(*part, local=True)
    local_grads = cm.full_grads()
    for p in cm.parameters():
        p.grad = None
    global_loss = cm.train_step(x, y)
    return {"plan": name, "no_sync_diff": no_sync_diff, "synced_diff": synced_diff,
            "local_loss_diff": gap(local_loss, global_loss), "local_grad_diff": _max_diff(local_grads, cm.full_grads()),
            "data": (cm.data_rank, cm.data_world)}


def refused_optimizer(name: str) -> str:
    """What stepping Adafactor (a factored, non-elementwise optimizer) says under this plan."""
    cm, _ = _compiled(plans()[name])
    cm.train_step(*gpt_inputs(CFG, BATCH))
    try:
        torch.optim.Adafactor(cm.parameters(), lr=1e-3).step()
    except pcompile.PcompileError as exc:
        return str(exc)
    return ""


def trainer_run(name: str, steps: int = 4) -> dict:
    """pcompile.trainer.train with rank-local data, clipping at 0.5 and an eval every 2 steps,
    against the same loop on the serial model."""
    from pcompile import trainer

    def part(step, rank, world):
        return gpt_inputs(CFG, BATCH, seed=step, part=rank, parts=world)

    def held_out(step, rank, world):
        return gpt_inputs(CFG, BATCH, seed=100 + step, part=rank, parts=world)

    torch.manual_seed(0)
    model = GPT(CFG)
    serial = copy.deepcopy(model)
    logs = trainer.train(model, part, plans()[name], steps, lr=1e-2, clip=0.5, eval_every=2, eval_batch_at=held_out,
                         local=True)
    optimizer = torch.optim.AdamW(serial.parameters(), lr=1e-2)
    diffs = []
    for step, log in enumerate(logs):
        loss = serial(*gpt_inputs(CFG, BATCH, seed=step))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        diffs += [gap(log.loss, loss.item()), gap(log.grad_norm, norm.item())]
        if log.eval_loss is not None:
            serial.eval()
            with torch.no_grad():
                diffs.append(gap(log.eval_loss, serial(*gpt_inputs(CFG, BATCH, seed=100 + step)).item()))
            serial.train()
    return {"plan": name, "diff": max(diffs), "evaluated": sum(log.eval_loss is not None for log in logs),
            "samples": logs[0].samples}


def run_all(clip_cases, eval_cases, accumulation_cases, optimizer_cases, trainer_cases) -> dict:
    return {"clip": [clipping(*case) for case in clip_cases], "eval": [evaluation(c) for c in eval_cases],
            "accumulation": [accumulation(c) for c in accumulation_cases],
            "optimizers": [refused_optimizer(c) for c in optimizer_cases],
            "trainer": [trainer_run(c) for c in trainer_cases]}
