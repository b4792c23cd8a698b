"""The captured graph on the rank's device. torch.export records the device of the example
inputs as a constant in the ops that create or move tensors (`aten.arange(..., device=cpu)` for
position ids and rotary tables, `aten.to(x, cpu)`): captured from CPU inputs, such a graph would
build those tensors on the CPU when the rank computes on a GPU. `follow_device` rewrites every
CPU device constant of the aten ops of a rank's graphs to the rank's device. (fx captures read
`x.device` at run time and need nothing. A model that deliberately keeps a tensor on the CPU
inside its forward is moved too: the captured graph cannot tell the two apart.)"""
from __future__ import annotations

import torch
import torch.fx as fx


def _moved(value, device: torch.device):
    if isinstance(value, torch.device) and value.type == "cpu":
        return device
    return value


def follow_device(module: torch.nn.Module, device: torch.device) -> int:
    """Rewrite the CPU device constants of the aten ops in every graph of `module` to `device`;
    returns how many nodes changed (none when `device` is the CPU)."""
    if device.type == "cpu":
        return 0
    changed = 0
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        touched = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            args = tuple(_moved(a, device) for a in node.args)
            kwargs = {k: _moved(v, device) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                touched = True
                changed += 1
        if touched:
            gm.recompile()
    return changed
