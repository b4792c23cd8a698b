"""Batch normalisation over a batch split across ranks: SyncBatchNorm's semantics, on any device.

A data-parallel rank holds 1/dp of the batch; batch norm in train mode normalises with the
statistics of the batch it sees, so each rank would use its part's mean and variance - not
the serial model's. Here the statistics are the whole batch's: each rank computes its part's
(count, mean, sum of squared deviations) per channel, they are all-gathered over the group
of ranks that split the batch and combined exactly (Chan et al.'s parallel variance: no
E[x^2] - E[x]^2 cancellation); the running statistics are updated with them (the unbiased
variance over the whole batch), the same on every rank. Backward needs two per-channel sums
over the whole batch (of dy and of dy * x_hat), one all-reduce. A rank's loss is its part's
mean, so the gradient it propagates is dp x the serial model's for its samples, which the
dp averaging of parameter gradients divides back (x_hat's weight and bias gradients stay
local sums for the same reason).

Why by hand: torch's SyncBatchNorm runs on CUDA only (torch.batch_norm_stats has no CPU
kernel) and wants a module swap before wrapping in DDP; this is one autograd Function used by
the lowered graphs on CPU and GPU alike.

Checkpoint recomputation (pcompile.runtime.checkpointing) recomputes the same output and must
not count the batch twice: the running statistics are updated on the first forward only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir.graph import META_KEY
from pcompile.ir.params import attribute
from pcompile.runtime import collectives, ops, sdp


def _local_stats(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """[3, C]: this rank's count, mean and sum of squared deviations per channel, in fp32."""
    x = x.float()
    count = x.numel() // x.shape[1]
    mean = x.mean(dims)
    m2 = ((x - mean.view(_shape(x))) ** 2).sum(dims)
    return torch.stack([torch.full_like(mean, count), mean, m2])


def _shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _combined(stats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, biased variance, count) of the whole batch from every rank's local stats."""
    counts = torch.stack([s[0] for s in stats])
    means = torch.stack([s[1] for s in stats])
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = torch.stack([s[2] for s in stats]).sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, float(total[0])


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, key: str, size: int):
        dims = [0] + list(range(2, x.dim()))
        local = _local_stats(x, dims)
        group = collectives._group(key)
        if group is None:
            stats = [local]
        else:
            stats = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(stats, local, group=group)
        mean, var, count = _combined(stats)
        invstd = torch.rsqrt(var + eps)
        unbiased = var * (count / max(count - 1.0, 1.0))  # what the running variance takes
        shape = _shape(x)
        x_hat = (x.float() - mean.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.dims, ctx.count, ctx.key, ctx.dtype, ctx.affine = dims, count, key, x.dtype, weight is not None
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x_hat, weight, invstd = ctx.saved_tensors
        shape, dims = _shape(x_hat), ctx.dims
        dy = dy.float()
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        both = torch.stack([sum_dy, sum_dy_xhat])
        local = both.clone()  # the parameters' gradients: this rank's sums (see the module docstring)
        group = collectives._group(ctx.key)
        if group is not None:
            dist.all_reduce(both, group=group)
        scale = invstd if weight is None else invstd * weight.float()
        dx = scale.view(shape) * (dy - (both[0] / ctx.count).view(shape) - x_hat * (both[1] / ctx.count).view(shape))
        if not ctx.affine:
            return dx.to(ctx.dtype), None, None, None, None, None
        return dx.to(ctx.dtype), local[1].to(weight.dtype), local[0].to(weight.dtype), None, None, None


_RECOMPUTING = [False]  # set by pcompile.runtime.checkpointing while a region recomputes


@ops.collective(axis_arg=9)
def sync_batch_norm(x, running_mean, running_var, weight, bias, training: bool, momentum: float | None,
                    eps: float, num_batches_tracked, axis: str, size: int):
    """F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) with the
    statistics of the batch split over `axis` (`size` ranks); `momentum` None: the cumulative
    average over `num_batches_tracked` (nn.BatchNorm's momentum=None), which it increments."""
    if not training:
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    y, mean, unbiased = _SyncBatchNorm.apply(x, weight, bias, eps, axis, size)
    if running_mean is not None and not _RECOMPUTING[0]:
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            if momentum is not None:
                factor = momentum
            else:  # nn.BatchNorm(momentum=None): the cumulative average
                factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return y


def synced(module: torch.nn.modules.batchnorm._BatchNorm, key: str, size: int) -> None:
    """Make `module` compute with the statistics of the batch split over the group bound under
    `key` (`size` ranks): its class becomes a subclass whose forward is nn.BatchNorm's with
    sync_batch_norm (parameters, buffers and names unchanged, so ZeRO-3's functional calls and
    checkpoints see the same module)."""
    module.__class__ = _synced_class(type(module))
    module._pcompile_batch = (key, size)


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if getattr(cls, "_pcompile_synced", False):
        return cls
    if cls not in _SYNCED:
        def forward(self, x):
            tracked = self.training and self.track_running_stats
            return sync_batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                                   self.running_var if not self.training or self.track_running_stats else None,
                                   self.weight, self.bias, self.training or self.running_mean is None, self.momentum,
                                   self.eps, self.num_batches_tracked if tracked else None, *self._pcompile_batch)
        _SYNCED[cls] = type(f"Synced{cls.__name__}", (cls,), {"forward": forward, "_pcompile_synced": True})
    return _SYNCED[cls]


# -- finding them in graphs (the backends bind them, the search keeps one micro-batch for them) --
aten = torch.ops.aten
_BN_MODULES = (torch.nn.modules.batchnorm._BatchNorm,)
_FUNCTIONS = {F.batch_norm, torch.batch_norm, aten.batch_norm.default}
_QUALNAMES = {"torch.nn.functional.batch_norm", "torch.batch_norm", "torch.ops.aten.batch_norm.default"}


def layer_of(node: fx.Node) -> str | None:
    return getattr(node.meta.get(META_KEY), "layer", None)


def batch_norms(module: torch.nn.Module):
    """(graph module, node, batch-norm module or None) of every batch norm in `module`'s graphs:
    modules called (call_module) or fetched (get_attr: passed into a checkpoint region, or to
    ZeRO-3's sdp_module), and F.batch_norm / aten.batch_norm calls (module None)."""
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                target = attribute(gm, node.target)
                if isinstance(target, _BN_MODULES):
                    yield gm, node, target
            elif node.op == "call_function" and node.target in _FUNCTIONS:
                yield gm, node, None
            elif node.op == "call_function" and node.target is sdp.sdp_function and node.args[0] in _QUALNAMES:
                raise PcompileError(f"ZeRO-3 on the batch norm {node.name} of layer {layer_of(node)!r} (a function "
                                    "call of an exported graph): its statistics cannot be synchronised",
                                    "capture with capture='fx' (batch norm as a module), or give that layer sdp=False")


def trains_batch_norm(module: torch.nn.Module) -> bool:
    """Whether `module`'s graphs hold a batch norm that computes batch statistics (train mode, or
    a function call: its training flag may be on)."""
    return any(bn is None or bn.training for _, _, bn in batch_norms(module))
