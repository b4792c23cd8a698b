"""The backends' part of batch normalisation over a split batch (pcompile.runtime.batch_norm):
every batch-norm module and call of a rank's graphs whose layer splits the batch over more
than one rank computes with the whole batch's statistics, over that layer's dp group; the
combinations that cannot be exact are refused before anything runs."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir.graph import META_KEY
from pcompile.ir.params import attribute
from pcompile.mesh import Axis
from pcompile.plan import Plan
from pcompile.runtime import batch_norm, sdp

aten = torch.ops.aten
_BN_MODULES = (torch.nn.modules.batchnorm._BatchNorm,)
_FUNCTIONS = {F.batch_norm, torch.batch_norm, aten.batch_norm.default}
_QUALNAMES = {"torch.nn.functional.batch_norm", "torch.batch_norm", "torch.ops.aten.batch_norm.default"}


def _layer(node: fx.Node) -> str | None:
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
                raise PcompileError(f"ZeRO-3 on the batch norm {node.name} of layer {_layer(node)!r} (a function call "
                                    "of an exported graph): its statistics cannot be synchronised",
                                    "capture with capture='fx' (batch norm as a module), or give that layer sdp=False")


def check_micro_batches(modules: list[torch.nn.Module], plan: Plan) -> None:
    """Refuse batch norm in train mode under pipelining with several micro-batches: a stage sees
    one micro-batch at a time, so no schedule gives it the batch's statistics."""
    if plan.pp == 1 or plan.num_microbatches == 1:
        return
    for module in modules:
        for _, node, bn in batch_norms(module):
            if bn is None or bn.training:
                raise PcompileError(
                    f"batch norm {node.target if bn is not None else node.name} (layer {_layer(node)!r}) sees one "
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
            layer = _layer(node)
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
             if node.target is not aten.batch_norm.default else
             ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"))
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    values = dict(defaults, **dict(zip(names, node.args)), **node.kwargs)
    node.target = batch_norm.sync_batch_norm
    node.args = (values["input"], values["running_mean"], values["running_var"], values["weight"], values["bias"],
                 values["training"], values["momentum"], values["eps"], None, key, size)
    node.kwargs = {}
    gm.recompile()
