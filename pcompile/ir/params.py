"""Parameter names, one source: a parameter is one tensor whatever its names (a GPT's embedding
tied to its LM head has two), and its canonical name is the first, the one
`named_parameters()` keeps. Every pass, backend and checkpoint that maps names to tensors asks
here rather than walking `named_parameters(remove_duplicate=False)` itself."""
from __future__ import annotations

import torch

from pcompile.ir.graph import IR


def aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> every name of the same tensor, the canonical one first."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def by_tensor(module: torch.nn.Module) -> dict[int, str]:
    """id of each parameter tensor -> its canonical name."""
    return {id(p): name for name, p in module.named_parameters()}


def canonical(module: torch.nn.Module) -> dict[str, str]:
    """Every parameter name -> the canonical name of its tensor."""
    return {name: names[0] for name, names in aliases(module).items()}


def tied(module: torch.nn.Module) -> set[str]:
    """Canonical names of the parameters that have several names."""
    return {names[0] for names in aliases(module).values() if len(names) > 1}


def under_every_name(module: torch.nn.Module, by_name: dict) -> dict:
    """`by_name` (values keyed by some name of each parameter) keyed by every name of it."""
    names = aliases(module)
    out = dict(by_name)
    for name, value in by_name.items():
        out.update(dict.fromkeys(names.get(name, [name]), value))
    return out


def attribute(root: torch.nn.Module, target: str):
    """What a get_attr `target` ("blocks.0.fc.weight") reads from `root`."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def param_layers(ir: IR) -> dict[str, set[str]]:
    """Canonical parameter name -> the layers that read it (get_attr users, called modules, and
    modules the ZeRO-3 runners call with some of their parameters)."""
    names = by_tensor(ir.gm)
    out: dict[str, set[str]] = {}
    for node in ir.graph.nodes:
        if node.op == "get_attr":
            obj = attribute(ir.gm, node.target)
            if isinstance(obj, torch.nn.Parameter):
                readers = {ir.meta(u).layer for u in node.users} or {ir.meta(node).layer}
                out.setdefault(names[id(obj)], set()).update(readers)
                continue
            params = obj.parameters() if isinstance(obj, torch.nn.Module) else ()
        elif node.op == "call_module":
            params = ir.gm.get_submodule(node.target).parameters()
        else:
            continue
        for p in params:
            out.setdefault(names[id(p)], set()).add(ir.meta(node).layer)
    return out
