"""The model's repeated blocks, found by structure, and the block each graph node runs in.

A block is a child of a container whose children repeat: numbered 0..N-1 and of one class
(ModuleList / Sequential, HF's `h.*`, T5's `block.*` whose first block holds one more
parameter), or - whatever their names - the children of an nn.Sequential, all of one class and
of the same parameter and buffer shapes (torchvision's `encoder.layers.encoder_layer_N`). The
container with the most such children wins, together with every other outermost container of
blocks of the same class (an encoder-decoder such as T5 has `encoder.block.*` and
`decoder.block.*`) or of the same attribute of a sibling module (nn.Transformer's
`encoder.layers.*` of TransformerEncoderLayer and `decoder.layers.*` of TransformerDecoderLayer);
blocks are ordered as the graph runs them.

A model without such a container may apply one module N >= 2 times in sequence (ALBERT's shared
layer: one parameter set). Both fx and torch.export number the calls in `nn_module_stack`
(`block`, `block@1`, ...): each call is a block of its own, named so (`shared_blocks`), and
every call reads the same parameters, whose gradient autograd sums over the calls - the
rewrites treat them as a weight read by several layers (a tied weight). A model with neither
gets one unit per top-level child, looking through single-child wrappers. Any unit called more
than once is a unit per call (`proj`, ..., `proj@1`), so that every unit's nodes stay contiguous.

Nodes are matched to blocks by module path: the call_module / get_attr target, or the
`nn_module_stack` both fx and torch.export record on every other node. A parameter read
(get_attr) belongs to the block of its first user; a node with no module of its own (shape
arithmetic, a residual add) to the block running at that point of the graph, so every block's
nodes are contiguous. Used by the layers pass and by pcompile.ir.replicate (which captures the
first blocks only).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.fx as fx

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")
_CALL = re.compile(r"@(\d+)$")  # nn_module_stack's key of a module's second, third, ... call
PRE, POST = "pre", "post"


def _shapes(module: torch.nn.Module) -> tuple:
    """The module tree's classes and parameter / buffer shapes: what makes two blocks alike."""
    return tuple((name, type(m), tuple((k, tuple(p.shape)) for k, p in m._parameters.items() if p is not None),
                  tuple((k, tuple(b.shape)) for k, b in m._buffers.items() if b is not None))
                 for name, m in module.named_modules(remove_duplicate=False))


def _containers(model: torch.nn.Module) -> dict[str, tuple[list[str], type]]:
    """Containers of repeated blocks (module docstring): prefix -> (the blocks' names, class).
    Numbered children: 0..N-1 (N >= 2, or 1 in a ModuleList) of one class; an nn.Sequential's
    children under other names: N >= 2 of one class and the same shapes."""
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
            found[prefix] = ([f"{prefix}.{i}" if prefix else str(i) for i in indices], classes.pop())
    for prefix, module in model.named_modules():
        named = list(module.named_children())
        if prefix in found or not isinstance(module, torch.nn.Sequential) or len(named) < 2:
            continue
        first = _shapes(named[0][1])
        if (any(True for _ in named[0][1].parameters())  # blocks hold weights (not a row of activations)
                and all(type(child) is type(named[0][1]) and _shapes(child) == first for _, child in named[1:])):
            found[prefix] = ([f"{prefix}.{name}" if prefix else name for name, _ in named], type(named[0][1]))
    return found


def find_block_prefixes(model: torch.nn.Module) -> list[str]:
    """The container with the most repeated blocks, plus every other outermost container of
    blocks of the same class (e.g. T5's encoder.block and decoder.block) or the other stack of
    an encoder-decoder (nn.Transformer's decoder.layers beside encoder.layers); [] if none."""
    found = _outermost(_containers(model))
    if not found:
        return []
    best = max(found, key=lambda prefix: len(found[prefix][0]))  # first of the largest (model order)
    block_class = found[best][1]

    def nested(prefix: str) -> bool:
        return any(other != prefix and (other == "" or prefix.startswith(other + ".")) for other in found)

    def other_stack(prefix: str) -> bool:
        """An encoder-decoder's other stack, of another class: the same attribute of a sibling
        module (nn.Transformer's encoder.layers / decoder.layers, BART's), 2 or more blocks."""
        (parent, _, name), (best_parent, _, best_name) = prefix.rpartition("."), best.rpartition(".")
        return (name == best_name and len(found[prefix][0]) >= 2 and parent and best_parent
                and parent.rpartition(".")[0] == best_parent.rpartition(".")[0])

    return [prefix for prefix in found if prefix == best or (
        (found[prefix][1] is block_class or other_stack(prefix)) and not nested(prefix))]


def _outermost(found: dict[str, tuple[list[str], type]]) -> dict[str, tuple[list[str], type]]:
    """The containers not inside another's block: a mixture of experts' ModuleList inside each
    transformer block (4 experts in 2 blocks) is part of the block, not the model's blocks."""
    blocks = [name for names, _ in found.values() for name in names]
    return {prefix: value for prefix, value in found.items()
            if not any(prefix == block or prefix.startswith(block + ".") for block in blocks)}


def find_block_prefix(model: torch.nn.Module) -> str | None:
    """The module path whose numbered children are the repeated blocks, or None."""
    found = _outermost(_containers(model))
    return max(found, key=lambda prefix: len(found[prefix][0])) if found else None


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
    found = _containers(model)
    return [name for prefix in prefixes for name in found[prefix][0]], True


def _explicit_blocks(nodes: list[fx.Node], blocks: list[str]) -> list[str | None]:
    """The block each node's module path names (None for nodes of no block); a get_attr takes
    its first user's block (export reads every parameter at the top of the graph)."""
    lookup = _Lookup(blocks)
    explicit = [None if node.op == "get_attr" else _with_call(node, lookup(node)) for node in nodes]
    index = {node: i for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        if node.op == "get_attr":
            users = sorted(index[u] for u in node.users)
            explicit[i] = explicit[users[0]] if users else lookup(node)
    return explicit


def _call(node: fx.Node, path: str) -> int | None:
    """Which call of the module at `path` `node` runs in (0, 1, ...: its nn_module_stack key,
    `path@k`), or None when its stack does not name that module."""
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        if value[0] == path:
            match = _CALL.search(key)
            return int(match.group(1)) if match else 0
    return None


def _with_call(node: fx.Node, block: str | None) -> str | None:
    """`block`, or `block@k` for a node of the module's call k > 0 (a module applied N times)."""
    call = _call(node, block) if block is not None else None
    return f"{block}@{call}" if call else block


def shared_blocks(model: torch.nn.Module, nodes: list[fx.Node]) -> list[str]:
    """[the module path] of a module with parameters that the graph calls N >= 2 times in
    sequence - between its first call and its last, every node runs in it or in a module around
    it, the calls in order (ALBERT's shared layer) -, the most called, outermost first; [] if
    none. Its calls become blocks `path`, `path@1`, ... (assign_blocks)."""
    calls: dict[str, set[int]] = defaultdict(set)
    for node in nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            match = _CALL.search(key)
            calls[value[0]].add(int(match.group(1)) if match else 0)
    found = [path for path, seen in calls.items()
             if path and len(seen) >= 2 and _has_parameters(model, path) and _in_sequence(nodes, path)]
    return [max(found, key=lambda path: (len(calls[path]), -path.count(".")))] if found else []


def _has_parameters(model: torch.nn.Module, path: str) -> bool:
    try:
        return any(True for _ in model.get_submodule(path).parameters())
    except AttributeError:  # a path the capture made up
        return False


def _in_sequence(nodes: list[fx.Node], path: str) -> bool:
    lookup = _Lookup([path])
    inside = [i for i, node in enumerate(nodes) if node.op != "get_attr" and lookup(node) is not None]
    last_call = 0
    for node in nodes[inside[0]:inside[-1] + 1] if inside else []:
        if node.op == "get_attr":  # fx reads a parameter where it is first used
            continue
        if lookup(node) is None:
            paths = _module_paths(node)
            if paths and paths[-1] and not path.startswith(paths[-1] + "."):
                return False  # another module runs between the calls
            continue
        call = _call(node, path) or 0
        if call < last_call:
            return False
        last_call = call
    return bool(inside)


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
