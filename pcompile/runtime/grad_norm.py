"""Global gradient-norm clipping for split parameters, equal to the serial model's.

A rank holds pieces of the model: tensor-parallel shards, ZeRO-3 chunks, its pipeline stages'
parameters, replicas of what dp and tp copy. The serial norm counts every element of every
parameter once; so each rank weighs its local sum of |g|^p by 1 / (the number of ranks that
hold that same piece: holders / pieces), and one all-reduce over every rank adds the weighted
sums up (the maximum, for the inf-norm). Every rank then scales by the same coefficient.

The call users write, `torch.nn.utils.clip_grad_norm_(cm.parameters(), max_norm)`, goes
through `torch.nn.utils.clip_grad._get_total_norm` (what clip_grad_norm_ calls, and
torch.nn.utils.get_total_norm is): `install()` puts a wrapper there that recognises the
gradients of a compiled model's parameters and returns their global norm, so the torch call
is exact too, whichever way it was imported; any other tensors go to torch's own function.
(torch's DTensor route would need the parameters exposed as DTensors, which the rewritten
graphs do not run on.)
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.utils.clip_grad as clip_grad

from pcompile.errors import PcompileError

_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # compiled models whose parameters are split over ranks
_TORCH_TOTAL_NORM = clip_grad._get_total_norm


def global_norm(grads: list[torch.Tensor], replicas: list[int], norm_type: float = 2.0,
                error_if_nonfinite: bool = False, group=None, reduce_device=None) -> torch.Tensor:
    """The norm of the whole model's gradient from this rank's `grads`, each held by
    `replicas[i]` ranks in the same form (collective over `group`, None: the world; on
    `reduce_device` when given: an offloaded optimizer's gradients live in host memory, and
    NCCL reduces device tensors only)."""
    norm_type = float(norm_type)
    device = grads[0].device if grads else torch.device("cpu")
    if math.isinf(norm_type):
        local = torch.stack([g.detach().abs().max().double() for g in grads]).max() if grads else \
            torch.zeros((), dtype=torch.float64, device=device)
        if dist.is_initialized():
            local = _all_reduce(local, dist.ReduceOp.MAX, group, reduce_device)
        total = local
    else:
        local = torch.zeros((), dtype=torch.float64, device=device)
        for g, n in zip(grads, replicas):
            local += torch.linalg.vector_norm(g.detach().double(), norm_type) ** norm_type / n
        if dist.is_initialized():
            local = _all_reduce(local, dist.ReduceOp.SUM, group, reduce_device)
        total = local ** (1.0 / norm_type)
    total = total.to(grads[0].dtype if grads else torch.float32)
    if error_if_nonfinite and not torch.isfinite(total):
        raise PcompileError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})",
                            "lower the learning rate, check the loss, or pass error_if_nonfinite=False")
    return total


def _all_reduce(value: torch.Tensor, op, group, device) -> torch.Tensor:
    moved = value if device is None else value.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(value.device)


def clip_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale `grads` in place by min(1, max_norm / (total + 1e-6)), as torch's clip_grad_norm_."""
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coefficient.to(g.dtype))


def register(compiled) -> None:
    """A lowered compiled model whose parameters' gradients the torch clipping call must recognise."""
    _LIVE.add(compiled)


def _owner(tensors: list[torch.Tensor]):
    """The compiled model whose parameters these are the gradients of (None: no compiled model's)."""
    ids = {id(t) for t in tensors}
    for compiled in list(_LIVE):
        mine = {id(p.grad) for p in compiled.parameters() if p.grad is not None}
        hit = ids & mine
        if hit and hit != ids:
            raise PcompileError("the gradient norm is asked of a compiled model's gradients mixed with other tensors",
                                "clip the compiled model's parameters alone: torch.nn.utils.clip_grad_norm_("
                                "cm.parameters(), max_norm) or cm.clip_grad_norm_(max_norm)")
        if hit:
            return compiled
    return None


def _total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """torch.nn.utils.get_total_norm, global for a compiled model's gradients (see the module doc)."""
    listed = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    compiled = _owner(listed)
    if compiled is None:
        return _TORCH_TOTAL_NORM(listed, norm_type, error_if_nonfinite, foreach)
    return compiled.grad_norm(listed, norm_type, error_if_nonfinite)


def install() -> None:
    """Route torch's gradient-norm function through `_total_norm` (idempotent)."""
    clip_grad._get_total_norm = _total_norm
    torch.nn.utils.get_total_norm = _total_norm
