"""Vocab parallelism at run time (Megatron's VocabParallelEmbedding and
vocab_parallel_cross_entropy): the functions `passes/tensor_parallel.py` puts into the graph
when the embedding table [V, H] and the LM head are split along the vocabulary over tp.

  vocab_embedding(ids, W_local, vocab_start("tp", n, V/n))     each rank looks up the ids in
      its vocab range (others -> row 0, then zeroed): a partial sum, all-reduced by the
      tp_reduce after it
  vocab_parallel_cross_entropy(logits_local, target, "tp", n, ignore_index, reduction)
      cross-entropy of logits split along the class dim, without gathering them

Why a hand-written autograd Function for the loss: torch's own (torch.distributed.tensor.
parallel.loss_parallel) works on DTensors only, and the IR runs plain tensors. Every rank of
the tp group computes the same loss, so, as for tp_reduce, the forward all-reduces (max,
sum of exp, target logit) have no backward collective: the gradient of the loss with respect
to this rank's logits is (softmax - one-hot) on the local shard, exactly.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pcompile.runtime import collectives, ops

_SIMULATED = threading.local()


@contextlib.contextmanager
def as_rank(rank: int):
    """Under collectives.simulate(), look up vocabulary rows as rank `rank` of the group would
    (a rank's graph run alone, e.g. to compare with its ONNX export)."""
    previous = getattr(_SIMULATED, "rank", 0)
    _SIMULATED.rank = rank
    try:
        yield
    finally:
        _SIMULATED.rank = previous


def _rank(key: str) -> int:
    group = collectives._group(key)
    return getattr(_SIMULATED, "rank", 0) if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, key: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    group = collectives._group(key)
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


@ops.collective(axis_arg=0)
def vocab_start(axis: str, size: int, rows: int) -> int:
    """The first vocabulary row this rank of the `axis` group holds ([r·rows, (r+1)·rows)).
    A node of its own, so the lookup that uses it reads no group (ZeRO-3 may wrap the lookup)."""
    return _rank(axis) * rows


@ops.local
def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int,
                    padding_idx: int | None = None) -> torch.Tensor:
    """This rank's part of embedding(ids, W) where `weight` holds rows [start, start + rows):
    rows of other ranks' ids are zero, so the tp all-reduce after it gives the full lookup."""
    rows = weight.shape[0]
    outside = (ids < start) | (ids >= start + rows)
    local = (ids - start).masked_fill(outside, 0)
    if padding_idx is not None:  # a global row (>= 0); its gradient stays zero on its owner
        padding_idx = padding_idx - start if start <= padding_idx < start + rows else None
    out = F.embedding(local, weight, padding_idx)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


class _CrossEntropy(torch.autograd.Function):
    """Per-row losses [N] of logits [N, V/n] split along V (0 where the target is ignored)."""

    @staticmethod
    def forward(ctx, logits, target, key, ignore_index):
        rows = logits.shape[-1]
        start = _rank(key) * rows
        ctx.dtype = logits.dtype
        logits = logits.float()  # as Megatron: the softmax in fp32 whatever the logits' dtype
        top = _all_reduce(logits.max(dim=-1).values, key, dist.ReduceOp.MAX)
        shifted = logits - top.unsqueeze(-1)
        exp = shifted.exp()
        total = _all_reduce(exp.sum(dim=-1), key)
        outside = (target < start) | (target >= start + rows)
        local = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        picked = _all_reduce(picked, key)
        kept = target != ignore_index
        loss = (total.log() - picked).masked_fill(~kept, 0.0)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, outside, kept)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside, kept = ctx.saved_tensors
        hit = (~outside & kept).to(softmax.dtype)
        grad_logits = softmax.scatter_add(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad_logits.mul_((grad * kept.to(grad.dtype)).unsqueeze(-1))
        return grad_logits.to(ctx.dtype), None, None, None


@ops.collective(axis_arg=2)
def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, axis: str, size: int,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(logits, target, ignore_index=, reduction=) for class-index targets,
    with logits split along the class dim (1, or 0 for one unbatched row) over the tp group."""
    if logits.dim() == 1:
        logits, flat = logits.unsqueeze(0), target.reshape(1)
    else:
        flat = target.reshape(-1)
        logits = logits.movedim(1, -1).reshape(flat.numel(), logits.shape[1])
    losses = _CrossEntropy.apply(logits, flat, axis, ignore_index).to(logits.dtype)
    if reduction == "none":
        return losses.view(target.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (flat != ignore_index).sum().to(losses.dtype)

