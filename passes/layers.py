"""Analysis: group nodes into layers — the repeated blocks (e.g. blocks.0 ... blocks.N-1) plus
"pre" (embedding and whatever runs before the first block) and "post" (head, loss).

A block is a child of a container whose children are numbered 0..N-1 and share a class
(ModuleList / Sequential). The container with the most such children wins; a model without
any gets one layer per top-level child (the search still has units to assign).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.fx as fx

from pcompile.ir import IR
from pcompile.passmanager import PassContext, register_pass

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def find_block_prefix(model: torch.nn.Module) -> str | None:
    """The module path whose numbered children are the repeated blocks, or None."""
    children: dict[str, list[tuple[int, type]]] = defaultdict(list)
    for name, module in model.named_modules():
        match = _NUMBERED.match(name) if "." in name else (re.match(r"^()(\d+)$", name))
        if match:
            children[match.group(1)].append((int(match.group(2)), type(module)))
    best, best_count = None, 1
    for prefix, items in children.items():
        indices = sorted(i for i, _ in items)
        same_class = len({cls for _, cls in items}) == 1
        if same_class and indices == list(range(len(indices))) and len(indices) > best_count:
            best, best_count = prefix, len(indices)
    return best


def _module_paths(node: fx.Node) -> list[str]:
    if node.op in ("call_module", "get_attr"):
        return [str(node.target)]
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def block_of(node: fx.Node, names: list[str]) -> str | None:
    for path in _module_paths(node):
        for name in names:
            if path == name or path.startswith(name + "."):
                return name
    return None


def _blocks(model: torch.nn.Module) -> tuple[list[str], bool]:
    """(block names in order, whether they are repeated blocks rather than top-level children)."""
    prefix = find_block_prefix(model)
    if prefix is None:
        return [name for name, _ in model.named_children()], False
    names = []
    while True:
        name = f"{prefix}.{len(names)}" if prefix else str(len(names))
        try:
            model.get_submodule(name)
        except AttributeError:
            return names, True
        names.append(name)


@register_pass("layers", kind="analysis", establishes=("layers",))
def layers(ir: IR, ctx: PassContext) -> IR:
    """Layer of every node: pre, the repeated blocks in order, post."""
    blocks, repeated = _blocks(ctx.model)
    nodes = list(ir.graph.nodes)
    explicit = [block_of(node, blocks) for node in nodes]
    marked = [i for i, block in enumerate(explicit) if block is not None]
    first, last = (marked[0], marked[-1]) if marked else (len(nodes), len(nodes))
    current = "pre"
    for i, node in enumerate(nodes):
        # Nodes with no module of their own (shape arithmetic, residual adds) join the block
        # running at that point of the graph, so every layer stays contiguous in graph order.
        if explicit[i] is not None:
            current = explicit[i]
        ir.meta(node).layer = "pre" if i < first else "post" if i > last else current
    used = {ir.meta(n).layer for n in nodes}
    ordered = ["pre"] + blocks + ["post"]
    return ir.replace(layers=[layer for layer in ordered if layer in used],
                      block_layers=[b for b in blocks if b in used] if repeated else [])
