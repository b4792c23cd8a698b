"""Which optimizers see a split parameter correctly. An elementwise optimizer (each element's
update depends on that element's gradient and state alone: SGD, Adam, AdamW, ...) steps a
tensor-parallel shard or a ZeRO-3 chunk exactly as it would step those elements of the whole
tensor. One whose update reads the whole tensor (per-tensor norms as LAMB / LARS, factored
second moments as Adafactor, matrix updates as Shampoo or Muon, a closure over every parameter
as L-BFGS) would silently see pieces: `install()` registers a global optimizer-step hook that
refuses such a step on a split parameter with an error naming the optimizer."""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pcompile.errors import PcompileError

ELEMENTWISE = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD")
    if hasattr(torch.optim, name))
_SPLIT = "_pcompile_split"  # set on parameters that hold a piece of a model tensor
_INSTALLED = []
_STEPPED = weakref.WeakSet()  # optimizers that stepped since install(): their states may need moving


def stepped() -> list[torch.optim.Optimizer]:
    """The live optimizers that took a step (an expert rebalancing moves their states)."""
    return list(_STEPPED)


def register_split(parameters) -> None:
    """These parameters hold a piece of a model tensor (a tp shard, a ZeRO-3 or ZeRO-2 chunk)."""
    for p in parameters:
        setattr(p, _SPLIT, True)


def _check(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    _STEPPED.add(optimizer)
    if isinstance(optimizer, ELEMENTWISE):
        return
    split = any(getattr(p, _SPLIT, False) for group in optimizer.param_groups for p in group["params"])
    if split:
        raise PcompileError(
            f"{type(optimizer).__name__} updates each parameter from the whole tensor, but this plan splits "
            "parameters over ranks (tensor parallelism, ZeRO-3 or ZeRO-2): it would step every piece as if it "
            "were the whole tensor",
            "use an elementwise optimizer (SGD, Adam, AdamW, Adagrad, RMSprop, ...), or a plan without tp, "
            "ZeRO-3 and ZeRO-2 (pure data / pipeline parallelism keeps every tensor whole)")


def install() -> None:
    """Register the global step hook once."""
    if not _INSTALLED:
        _INSTALLED.append(register_optimizer_step_pre_hook(_check))
