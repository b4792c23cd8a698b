"""Run-time ops the `reshard` pass inserts between layers whose (dp, tp) groupings differ.

Ranks are numbered tp-innermost: a layer with tp = k runs on a (N/k, k) mesh, so rank r is
in tp group r // k and computes batch part r // k of N/k parts. A coarser split nests inside
a finer one, so moving the batch between a layer at dp = a and one at dp = b is one
collective over the ranks `reshard_groups(N, coarse, fine)` names:
  batch_gather (finer -> coarser): all-gather the other pieces of the new part along the
      batch dim; backward keeps this rank's slice, since after the next layer's tp_copy
      backward every rank of its tp group holds the same gradient of the whole part.
  batch_slice (coarser -> finer): keep this rank's piece; backward all-gathers the pieces'
      gradients, so every rank of the previous layer's tp group gets the whole part's.
These are exactly the autograd pairs of collectives.tp_gather / tp_scatter (hand-written
Functions, exact for tensors replicated over the group's other axis), applied to the batch
dim over a batch axis; they are separate graph targets so the IR names what they do.

`grad_scale` is identity forward and scales the gradient backward: a parameter read by
layers at different dp degrees (a GPT's tied embedding and LM head) is summed over the ranks
of its finest dp group, which hold each coarser layer's contribution several times.
"""
from __future__ import annotations

import re

import torch

from pcompile.runtime import collectives

_AXIS = re.compile(r"^batch(\d+):(\d+)$")


def reshard_axis(coarse: int, fine: int) -> str:
    """The axis of the groups that move the batch between dp = coarse and dp = fine."""
    return f"batch{coarse}:{fine}"


def parse_axis(axis: str) -> tuple[int, int] | None:
    """(coarse, fine) of a `reshard_axis` name, else None."""
    match = _AXIS.match(axis)
    return (int(match.group(1)), int(match.group(2))) if match else None


def reshard_groups(world: int, coarse: int, fine: int) -> list[list[int]]:
    """The groups of fine // coarse ranks that hold the pieces of one coarse part at the same
    position of their fine-layer tp group: ranks world // fine apart (cost.switch_time's groups)."""
    stride, size = world // fine, fine // coarse
    bases = [r for r in range(world) if (r // stride) % size == 0]
    return [[base + j * stride for j in range(size)] for base in bases]


def batch_gather(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Batch split -> `size` times coarser: all-gather along `dim` forward, own slice backward."""
    return collectives.tp_gather(x, dim, axis, size)


def batch_slice(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Batch split -> `size` times finer: own slice along `dim` forward, all-gather backward."""
    return collectives.tp_scatter(x, dim, axis, size)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient times `factor` backward."""
    return _Scale.apply(x, factor)


COLLECTIVES = (batch_gather, batch_slice)  # nodes whose axis-name arguments the backend binds
