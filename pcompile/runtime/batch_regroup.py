"""Run-time ops the `reshard` pass inserts between layers whose (dp, tp) groupings differ.

Ranks are numbered tp-innermost: a layer with tp = k runs on a (N/k, k) mesh, so rank r is
in tp group r // k and computes batch part r // k of N/k parts. A coarser split nests inside
a finer one, so moving the batch between a layer at dp = a and one at dp = b is one
collective over the ranks `pcompile.mesh.regroup_groups(N, coarse, fine)` names:
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

import torch

from pcompile.runtime import collectives, ops


@ops.collective(axis_arg=2)
def batch_gather(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Batch split -> `size` times coarser: all-gather along `dim` forward, own slice backward."""
    return collectives.tp_gather(x, dim, axis, size)


@ops.collective(axis_arg=2)
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


@ops.local
def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient times `factor` backward."""
    return _Scale.apply(x, factor)

