"""Rank functions for the mixed-precision tests (module-level so they pickle).

The bf16 reference is written out here, independently of pcompile.runtime.precision, so a bug in the
policy cannot cancel out: one process, the model cast to bf16 (as Megatron's module.bfloat16()),
fp32 master copies stepped by AdamW, bf16 grads copied to fp32 master grads, masters copied
back to the bf16 module before each forward.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import pcompile
from pcompile import checkpoint
from tests.distributed.ranks import MODELS, _max_diff

STEPS, LR = 3, 1e-2


def _bf16(inputs: tuple) -> tuple:
    return tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs)


def serial_bf16(model: torch.nn.Module, inputs) -> tuple[list[float], list[dict]]:
    """Losses and fp32 master grads of STEPS AdamW steps under the bf16 policy on one process."""
    low = copy.deepcopy(model)
    names = [name for name, _ in low.named_parameters()]
    masters = [p.detach().float().clone().requires_grad_() for p in low.parameters()]
    low.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(masters, lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        with torch.no_grad():
            for p, m in zip(low.parameters(), masters):
                p.copy_(m)
        loss = low(*_bf16(inputs(step)))
        loss.backward()
        for p, m in zip(low.parameters(), masters):
            m.grad, p.grad = p.grad.float(), None
        losses.append(loss.float().item())
        grads.append({n: m.grad.clone() for n, m in zip(names, masters)})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


def serial_fp32(model: torch.nn.Module, inputs) -> tuple[list[float], dict]:
    """Losses of STEPS fp32 AdamW steps and the first step's grads."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        loss = model(*inputs(step))
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, first_grads


def _norm_diff(got: dict, expected: dict) -> float:
    """||got - expected|| / ||expected|| over all gradients together."""
    diff = sum(((got[n] - e) ** 2).sum().item() for n, e in expected.items())
    return (diff / sum((e ** 2).sum().item() for e in expected.values())) ** 0.5


def _per_tensor(got: dict, bf16: dict, fp32: dict) -> dict:
    """name -> (max|got - bf16 reference|, max|bf16 reference - fp32 reference|)."""
    return {n: (_max_diff({n: got[n]}, {n: e}), _max_diff({n: e}, {n: fp32[n]})) for n, e in bf16.items()}


def _dtypes(cm, optimizer) -> dict:
    """(c): what each part of the compiled model holds."""
    modules = [cm.gm] if cm._pipeline is None else cm._pipeline.modules  # a pipeline rank's stages
    module = {p.dtype for m in modules for p in m.parameters()}
    masters = {p.dtype for p in cm.parameters()}
    states = {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim() > 0}
    full = {t.dtype for t in cm.full_state_dict().values()} | {g.dtype for g in cm.full_grads().values()}
    return {"module": module, "masters": masters, "optimizer": states, "full": full}


def run_bf16(model_name: str, plan: pcompile.Plan, models: dict | None = None) -> dict:
    """The compiled bf16 program vs the serial bf16 and fp32 references (`models`: name ->
    (build, inputs), tests.distributed.ranks.MODELS unless given)."""
    build, inputs = (models or MODELS)[model_name]
    torch.manual_seed(0)
    model = build()
    ref_losses, ref_grads = serial_bf16(model, inputs)
    fp32_losses, fp32_grads = serial_fp32(model, inputs)
    world = dist.get_world_size()
    cm = pcompile.compile(model, pcompile.Cluster.local(world), inputs(0), plan=plan, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=LR)
    losses, loss_dtypes, grad_diffs = [], set(), []
    for step in range(STEPS):
        loss = cm.train_step(*inputs(step))
        loss_dtypes.add(loss.dtype)
        losses.append(loss.item())
        grads = cm.full_grads()
        grad_diffs.append(_norm_diff(grads, ref_grads[step]))
        if step == 0:
            first = _per_tensor(grads, ref_grads[0], fp32_grads)
        optimizer.step()
        if step < STEPS - 1:  # the last step's grads stay, for the dtype check of full_grads()
            optimizer.zero_grad()
    dtypes = _dtypes(cm, optimizer)
    cm.close()
    return {"model": model_name, "plan": plan.default.describe(), "losses": losses, "bf16_ref": ref_losses,
            "fp32_ref": fp32_losses, "grad_diffs": grad_diffs, "first_grads": first, "loss_dtypes": loss_dtypes,
            **dtypes}


def _trained(model_name: str, plan: pcompile.Plan, mixed_precision: str | None):
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    cm = pcompile.compile(build(), pcompile.Cluster.local(dist.get_world_size()), inputs(0), plan=plan,
                          mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=LR)
    for step in range(2):
        cm.train_step(*inputs(step))
        optimizer.step()
        optimizer.zero_grad()
    return cm, optimizer


def cross_load(model_name: str, save_as: tuple, load_as: tuple, directory: str) -> dict:
    """Save under one (plan, precision), load under another: the fp32 masters and AdamW states
    must come back bit for bit, and both models must then take the same next step."""
    build, inputs = MODELS[model_name]
    saved, saved_opt = _trained(model_name, *save_as)
    checkpoint.save(saved, directory, saved_opt, step=2)
    torch.manual_seed(1)  # other initial weights: the load must overwrite them
    loaded = pcompile.compile(build(), pcompile.Cluster.local(dist.get_world_size()), inputs(0),
                              plan=load_as[0], mixed_precision=load_as[1])
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=LR)
    step = checkpoint.load(loaded, directory, loaded_opt)
    params = _max_diff(loaded.full_state_dict(), saved.full_state_dict())
    got = checkpoint.full_optimizer_state(loaded, loaded_opt)  # a pipeline rank: its stages' states only
    expected = checkpoint.full_optimizer_state(saved, saved_opt)
    states = _max_diff(got, {k: expected[k] for k in got}) if got else float("inf")
    dtypes = {t.dtype for t in loaded.full_state_dict().values()}
    next_losses = (saved.train_step(*inputs(2)).item(), loaded.train_step(*inputs(2)).item())
    saved.close()
    loaded.close()
    return {"step": step, "param_diff": params, "state_diff": states, "dtypes": dtypes, "next_losses": next_losses}


def run_all(bf16_cases: list, load_cases: list, directory: str) -> dict:
    return {"bf16": [run_bf16(name, plan) for name, plan in bf16_cases],
            "loads": [cross_load(name, save_as, load_as, f"{directory}/{i}")
                      for i, (name, save_as, load_as) in enumerate(load_cases)]}
