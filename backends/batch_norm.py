"""The backends' part of batch normalisation over a split batch (pcompile.runtime.batch_norm):
every batch-norm module and call of a rank's graphs whose layer splits the batch over more
than one rank computes with the whole batch's statistics, over that layer's dp group; the
combinations that cannot be exact are refused before anything runs."""
from __future__ import annotations

import torch
import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.mesh import Axis
from pcompile.plan import Plan
from pcompile.runtime import batch_norm
from pcompile.runtime.batch_norm import batch_norms, layer_of


def check_micro_batches(modules: list[torch.nn.Module], plan: Plan) -> None:
    """Refuse batch norm in train mode under pipelining with several micro-batches: a stage sees
    one micro-batch at a time, so no schedule gives it the batch's statistics."""
    if plan.pp == 1 or plan.num_microbatches == 1:
        return
    for module in modules:
        for _, node, bn in batch_norms(module):
            if bn is None or bn.training:
                raise PcompileError(
                    f"batch norm {node.target if bn is not None else node.name} (layer {layer_of(node)!r}) sees one "
                    f"micro-batch of {plan.num_microbatches} at a time under pipelining: its statistics would be a "
                    "micro-batch's, not the batch's",
                    "use num_microbatches=1, GroupNorm / LayerNorm, or freeze the batch norm (module.eval())")


def bind(modules: list[torch.nn.Module], plan: Plan, prefix: str, mixed: bool) -> int:
    """Put every batch norm of `modules` whose layer splits the batch on its layer's dp group
    (bound as `{prefix}/{axis}`); returns how many."""
    bound, seen = 0, set()
    for module in modules:
        for gm, node, bn in list(batch_norms(module)):
            if bn is not None and id(bn) in seen:
                continue
            layer = layer_of(node)
            strategy = plan.strategy_for(layer) if layer is not None else plan.default
            if strategy.dp == 1:
                continue
            axis = Axis.of_degree("dp", strategy.dp, plan.default.dp).name if mixed else "dp"
            key = f"{prefix}/{axis}"
            if bn is not None:
                batch_norm.synced(bn, key, strategy.dp)
                seen.add(id(bn))
            else:
                _retarget(gm, node, key, strategy.dp)
            bound += 1
    return bound


def _retarget(gm: fx.GraphModule, node: fx.Node, key: str, size: int) -> None:
    """A batch_norm call -> sync_batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps, None, key, size)."""
    names = (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
             if node.target is not torch.ops.aten.batch_norm.default else
             ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"))
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    values = dict(defaults, **dict(zip(names, node.args)), **node.kwargs)
    node.target = batch_norm.sync_batch_norm
    node.args = (values["input"], values["running_mean"], values["running_var"], values["weight"], values["bias"],
                 values["training"], values["momentum"], values["eps"], None, key, size)
    node.kwargs = {}
    gm.recompile()
