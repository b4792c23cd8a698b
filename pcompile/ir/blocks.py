"""The model's repeated blocks, read from its module tree, and the block each graph node runs in.

A block is a child of a container whose children are numbered 0..N-1 and share a class
(ModuleList / Sequential). The container with the most such children wins, together with
every other outermost container of blocks of the same class (an encoder-decoder such as T5 has
`encoder.block.*` and `decoder.block.*`); blocks are ordered as the graph runs them. A model
without any gets one unit per top-level child, looking through single-child wrappers.

Nodes are matched to blocks by module path: the call_module / get_attr target, or the
`nn_module_stack` both fx and torch.export record on every other node. A parameter read
(get_attr) belongs to the block of its first user; a node with no module of its own (shape
arithmetic, a residual add) to the block running at that point of the graph, so every block's
nodes are contiguous. Used by the layers pass and by pcompile.ir.replicate (which captures the
first blocks only).
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict

import torch
import torch.fx as fx

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")
PRE, POST = "pre", "post"


def _containers(model: torch.nn.Module) -> dict[str, tuple[int, type]]:
    """Containers whose children are numbered 0..N-1 (N >= 2, or 1 in a ModuleList) and share one
    class: prefix -> (N, class)."""
    children: dict[str, list[tuple[int, type]]] = defaultdict(list)
    for name, module in model.named_modules():
        match = _NUMBERED.match(name) if "." in name else (re.match(r"^()(\d+)$", name))
        if match:
            children[match.group(1)].append((int(match.group(2)), type(module)))
    found = {}
    for prefix, items in children.items():
        indices = sorted(i for i, _ in items)
        classes = {cls for _, cls in items}
        # One numbered child is a block list only in a ModuleList (a 1-layer model's blocks);
        # a Sequential of one module is just a wrapper.
        single_ok = isinstance(model.get_submodule(prefix) if prefix else model, torch.nn.ModuleList)
        if len(classes) == 1 and indices == list(range(len(indices))) and (len(indices) > 1 or single_ok):
            found[prefix] = (len(indices), classes.pop())
    return found


def find_block_prefixes(model: torch.nn.Module) -> list[str]:
    """The container with the most repeated blocks, plus every other outermost container of
    blocks of the same class (e.g. T5's encoder.block and decoder.block); [] if none."""
    found = _containers(model)
    if not found:
        return []
    best = max(found, key=lambda prefix: found[prefix][0])  # first of the largest (model order)
    block_class = found[best][1]

    def nested(prefix: str) -> bool:
        return any(other != prefix and (other == "" or prefix.startswith(other + ".")) for other in found)

    return [prefix for prefix in found if prefix == best or (found[prefix][1] is block_class and not nested(prefix))]


def find_block_prefix(model: torch.nn.Module) -> str | None:
    """The module path whose numbered children are the repeated blocks, or None."""
    found = _containers(model)
    return max(found, key=lambda prefix: found[prefix][0]) if found else None


def _module_paths(node: fx.Node) -> list[str]:
    if node.op in ("call_module", "get_attr"):
        return [str(node.target)]
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def block_of(node: fx.Node, names: list[str]) -> str | None:
    """The block `node` runs in by its module paths: the first path (innermost last) that lies
    in a block, the first of `names` it lies in."""
    return _Lookup(names)(node)


class _Lookup:
    """block_of with the block names indexed: each path's dotted prefixes looked up, each
    path's answer kept (a 96-block graph has thousands of nodes, few distinct paths)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.position = {name: i for i, name in enumerate(names)}
        self.paths: dict[str, int | None] = {}

    def _path(self, path: str) -> int | None:
        if path not in self.paths:
            found, prefix = None, path
            while True:
                at = self.position.get(prefix)
                if at is not None and (found is None or at < found):
                    found = at
                cut = prefix.rfind(".")
                if cut < 0:
                    break
                prefix = prefix[:cut]
            self.paths[path] = found
        return self.paths[path]

    def __call__(self, node: fx.Node) -> str | None:
        for path in _module_paths(node):
            at = self._path(path)
            if at is not None:
                return self.names[at]
        return None


def _top_level(model: torch.nn.Module) -> list[str]:
    """Children of the model, looking through wrappers with a single child (e.g. a loss wrapper
    around a HuggingFace model)."""
    prefix, module = "", model
    while len(children := list(module.named_children())) == 1:
        name, module = children[0]
        prefix = f"{prefix}{name}."
    return [prefix + name for name, _ in children]


def block_names(model: torch.nn.Module) -> tuple[list[str], bool]:
    """(block names, whether they are repeated blocks rather than top-level children)."""
    prefixes = find_block_prefixes(model)
    if not prefixes:
        return _top_level(model), False
    names = []
    for prefix in prefixes:
        for index in itertools.count():
            name = f"{prefix}.{index}" if prefix else str(index)
            try:
                model.get_submodule(name)
            except AttributeError:
                break
            names.append(name)
    return names, True


def _explicit_blocks(nodes: list[fx.Node], blocks: list[str]) -> list[str | None]:
    """The block each node's module path names (None for nodes of no block); a get_attr takes
    its first user's block (export reads every parameter at the top of the graph)."""
    lookup = _Lookup(blocks)
    explicit = [None if node.op == "get_attr" else lookup(node) for node in nodes]
    index = {node: i for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        if node.op == "get_attr":
            users = sorted(index[u] for u in node.users)
            explicit[i] = explicit[users[0]] if users else lookup(node)
    return explicit


def assign_blocks(nodes: list[fx.Node], blocks: list[str]) -> list[str]:
    """The unit of every node, in graph order: PRE before the first node of any block, POST
    after the last, else the block named by the node's module path or, for a node without one,
    the block running at that point of the graph."""
    explicit = _explicit_blocks(nodes, blocks)
    marked = [i for i, block in enumerate(explicit) if block is not None]
    first, last = (marked[0], marked[-1]) if marked else (len(nodes), len(nodes))
    current, out = PRE, []
    for i in range(len(nodes)):
        if explicit[i] is not None:
            current = explicit[i]
        out.append(PRE if i < first else POST if i > last else current)
    return out
