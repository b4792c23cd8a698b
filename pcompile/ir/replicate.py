"""Repeated blocks captured and analysed once: capture + analysis grow with the distinct blocks,
not with the layers (a 96-block GPT-3 is captured as 3 blocks and annotated as 3).

When the model's blocks are one container (ModuleList / Sequential, its children numbered or
named otherwise: torchvision's encoder_layer_N) of N >= 4 blocks with the same structure - the
same module classes, parameter and buffer shapes, and the same plain attributes but for an
index counter (HuggingFace's `layer_idx`) - the model is captured with
its first KEEP = 3 blocks only (the container truncated for the capture, restored after) and
the graph of the N blocks is stitched from it:

  pre, block 0, block 1, block 2  as captured
  block k = 3 .. N-1              block 2's nodes, each reading block k-1's where block 2's
                                  read block 1's (and the same pre nodes), targets, module
                                  stacks and names moved from blocks.2 to blocks.k
  post                            as captured, reading block N-1 where it read block 2

This is exact only when block 2 is block 1 moved by one, which is checked node by node on the
capture before anything is stitched: the same ops and arguments (block 1's reading block 0
where block 2's read block 1), targets and module stacks moved by one, and names whose counters
(fx names nodes `add_7`, `view_12` in graph order) advance by the same step for every node of
a kind - the step by which blocks 3.. and post's names advance too. Any difference, a block
read two blocks later, or a post that reads a block other than the last, and the full path
runs: the whole model captured (`capture_repeated` returns None). The stitched graph is the
one the full capture gives, node for node, name for name, and its GraphModule holds the
model's own parameters under the same names (tests/passes/test_replicate.py compares both).

The analyses (shapes, FLOPs, memory) then run on the template, the 3-block capture, and every
node copies the annotations of its source node there (`annotate`); they are exact when block
1's and block 2's annotations are equal node by node, which is checked after each analysis
(else that analysis, and the ones after it, run on the whole graph).

Not seen by the check: forward code that branches on the block index against the config (e.g.
`if self.layer_idx == config.num_layers - 1`) behaves the same in the 3-block capture's blocks
and differently in a block past them; `full_analysis()` turns the fast path off.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import types
from collections import OrderedDict
from typing import Callable

import torch
import torch.fx as fx

from pcompile.ir.blocks import POST, PRE, assign_blocks, find_block_prefixes
from pcompile.ir.graph import IR, META_KEY, NodeMeta, Replicas

_log = logging.getLogger(__name__)
KEEP = 3  # blocks captured: 0 (may differ: it reads the embeddings), 1 and 2 (must repeat)
_ENABLED = [True]
_SUFFIX = re.compile(r"^(.*)_(\d+)$")
_MODULE_KEYS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


@contextlib.contextmanager
def full_analysis():
    """Capture and analyse every block (the full path), e.g. to compare with the fast one."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


# -- which blocks repeat ---------------------------------------------------------------------------
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value))


def _structure(block: torch.nn.Module) -> tuple[tuple, dict]:
    """(module classes, parameter and buffer shapes of the block's subtree; its plain attributes
    by (module, name))."""
    shape, attrs = [], {}
    for name, module in block.named_modules(remove_duplicate=False):
        shape.append((name, type(module),
                      tuple((k, tuple(p.shape), p.dtype, p.requires_grad) for k, p in module._parameters.items()
                            if p is not None),
                      tuple((k, tuple(b.shape), b.dtype, k in module._non_persistent_buffers_set)
                            for k, b in module._buffers.items() if b is not None)))
        for key, value in vars(module).items():
            if not key.startswith("_") and _plain(value):
                attrs[(name, key)] = tuple(value) if isinstance(value, list) else value
    return tuple(shape), attrs


def _counter(values: list) -> bool:
    """An attribute that counts the blocks (value = index + constant), such as `layer_idx`."""
    return (all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and len({v - i for i, v in enumerate(values)}) == 1)


def repeated_blocks(model: torch.nn.Module) -> tuple[str, int] | None:
    """(container path, number of blocks) when the model's blocks are one ModuleList /
    Sequential of more than KEEP blocks that repeat (see the module docstring); else None."""
    prefixes = find_block_prefixes(model)
    if len(prefixes) != 1 or not prefixes[0]:
        return None
    container = model.get_submodule(prefixes[0])
    if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)) or len(container) <= KEEP:
        return None
    blocks = list(container)
    found = [_structure(b) for b in blocks]
    if any(shape != found[0][0] or attrs.keys() != found[0][1].keys() for shape, attrs in found):
        return None
    for key in found[0][1]:
        values = [attrs[key] for _, attrs in found]
        if any(v != values[0] for v in values) and not _counter(values):
            return None
    owner: dict[int, int] = {}  # a tensor shared by two blocks: their copies would not share it
    for index, block in enumerate(blocks):
        for tensor in list(block.parameters()) + list(block.buffers()):
            if owner.setdefault(id(tensor), index) != index:
                return None
    return prefixes[0], len(blocks)


@contextlib.contextmanager
def truncated(model: torch.nn.Module, prefix: str, keep: int):
    """The model with only the first `keep` blocks of its container `prefix` (restored after)."""
    container = model.get_submodule(prefix)
    modules = container._modules
    container._modules = OrderedDict(list(modules.items())[:keep])
    try:
        yield model
    finally:
        container._modules = modules


# -- moving names from block i to block j ----------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _pattern(text: str, follow: str) -> re.Pattern:
    # at the start or after "_" (export's module stack keys: "L__self__model.h.2"), and not a
    # prefix of a longer index (h.2 is not h.21)
    return re.compile(rf"(?:^|(?<=_)){re.escape(text)}(?={follow}|$)")


class _Mover:
    """Rewrites module paths (`model.h.2.attn`) and node names (`model_h_2_attn_weight`) of
    block i to block j of the container `prefix`, whose children are named `children` (0, 1, ...
    or torchvision's encoder_layer_0, ...: fx and export name nodes after them alike)."""

    def __init__(self, prefix: str, children: list[str]):
        self.dotted, self.mangled, self.children = prefix, prefix.replace(".", "_"), children
        self._paths: dict[tuple, str] = {}  # a block's paths recur on many nodes: moved once each

    def path(self, text: str, i: int, j: int) -> str:
        got = self._paths.get((text, i, j))
        if got is None:
            child = self.children
            got = self._paths[(text, i, j)] = _pattern(f"{self.dotted}.{child[i]}", r"\.").sub(
                f"{self.dotted}.{child[j]}", text)
        return got

    def stack(self, stack, i: int, j: int):
        if not stack:
            return stack
        return type(stack)((self.path(k, i, j), (self.path(v[0], i, j),) + tuple(v[1:])) for k, v in stack.items())

    def key(self, name: str, i: int | None = None) -> tuple[str, int, bool]:
        """(kind, counter, whether the name carries it): `view_12` -> ("view", 12, True); block
        i's own path is blanked out of the kind (`model_h_2_ln_weight` names the same kind in
        every block)."""
        if i is not None:
            name = _pattern(f"{self.mangled}_{self.children[i]}", "_").sub("\0", name)
        match = _SUFFIX.match(name)
        return (match.group(1), int(match.group(2)), True) if match else (name, 0, False)

    def name(self, kind: str, counter: int, suffixed: bool, j: int | None = None) -> str:
        base = kind if j is None else kind.replace("\0", f"{self.mangled}_{self.children[j]}")
        return f"{base}_{counter}" if suffixed or counter else base


# -- the stitch ------------------------------------------------------------------------------------
class _NoRepeat(Exception):
    """The capture's blocks do not repeat as the stitch needs: take the full path."""


def _regions(nodes: list[fx.Node], prefix: str, children: list[str]) -> tuple[list, list[list], list]:
    """(pre, [block 0, 1, 2], post) node lists of the template capture, in graph order."""
    names = [f"{prefix}.{child}" for child in children[:KEEP]]
    order = [PRE] + names + [POST]
    groups: dict[str, list] = {name: [] for name in order}
    last = 0
    for node, unit in zip(nodes, assign_blocks(nodes, names)):
        if order.index(unit) < last:
            raise _NoRepeat(f"{node.name} runs in {unit} after a later block")
        last = order.index(unit)
        groups[unit].append(node)
    blocks = [groups[name] for name in names]
    if any(not b for b in blocks) or len(blocks[-1]) != len(blocks[-2]):
        raise _NoRepeat("the last two captured blocks differ in size")
    earlier = {n for block in blocks[:-1] for n in block}
    if any(i in earlier for node in groups[POST] for i in node.all_input_nodes):
        raise _NoRepeat("post reads a block before the last")
    return groups[PRE], blocks, groups[POST]


def _steps(blocks: list[list], where: dict, move: _Mover) -> dict[str, int]:
    """Check that block 2 is block 1 moved by one (module docstring); the counter step per kind
    of name."""
    previous, last = blocks[-2], blocks[-1]
    i = KEEP - 2
    steps: dict[str, int] = {}

    def moved(node):  # where block 1's node read `node`, block 2's must read moved(node)
        region, position = where[node]
        if region == PRE:
            return node
        if region in (i - 1, i):
            return blocks[region + 1][position]
        raise _NoRepeat(f"a block reads {node.name}, two blocks before it")

    for a, b in zip(previous, last):
        if a.op != b.op or a.type != b.type:
            raise _NoRepeat(f"{a.name} and {b.name} are different ops")
        target = move.path(a.target, i, i + 1) if a.op in ("call_module", "get_attr") else a.target
        try:
            same = target == b.target and fx.map_arg((a.args, a.kwargs), moved) == (b.args, b.kwargs)
        except RuntimeError:  # a tensor argument (== is elementwise): compare no further
            same = False
        if not same or move.stack(a.meta.get("nn_module_stack"), i, i + 1) != b.meta.get("nn_module_stack"):
            raise _NoRepeat(f"{b.name} is not {a.name} moved by one block")
        (kind, n, _), (kind_b, m, _) = move.key(a.name, i), move.key(b.name, i + 1)
        if kind != kind_b or steps.setdefault(kind, m - n) != m - n:
            raise _NoRepeat(f"the names {a.name} and {b.name} do not advance by one block's count")
    return steps


def stitch(template: fx.GraphModule, prefix: str, children: list[str]) -> tuple[fx.Graph, dict[str, fx.Node], tuple]:
    """The graph of all blocks (the container's `children`) from the capture of the first KEEP
    (module docstring): (graph, IR node name -> template node, (block 1, block 2) node pairs).
    Raises _NoRepeat."""
    nodes, count = list(template.graph.nodes), len(children)
    pre, blocks, post = _regions(nodes, prefix, children)
    where = {n: (PRE, k) for k, n in enumerate(pre)}
    where.update({n: (POST, k) for k, n in enumerate(post)})
    for b, block in enumerate(blocks):
        where.update({n: (b, k) for k, n in enumerate(block)})
    move = _Mover(prefix, children)
    steps = _steps(blocks, where, move)
    last = KEEP - 1
    graph = fx.Graph(tracer_cls=template.graph._tracer_cls, tracer_extras=template.graph._tracer_extras)
    graph.set_codegen(template.graph._codegen)
    copies: dict[fx.Node, fx.Node] = {}  # template node -> its copy (pre, the captured blocks, post)
    source: dict[str, fx.Node] = {}

    def emit(node: fx.Node, name: str, target, args, kwargs, meta: dict) -> fx.Node:
        new = graph.create_node(node.op, target, args, kwargs, name, node.type)
        if new.name != name:
            raise _NoRepeat(f"the name {name} is taken")
        new.meta = meta
        source[name] = node
        return new

    def as_captured(node: fx.Node, name: str | None = None) -> None:
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: current[n] if n in current else copies[n])
        copies[node] = emit(node, name or node.name, node.target, args, kwargs, dict(node.meta))

    current: dict[fx.Node, fx.Node] = {}  # block 2's nodes -> the last block's copies, for post
    for node in pre + [n for block in blocks for n in block]:
        as_captured(node)
    built = [copies[n] for n in blocks[last]]  # block k-1's nodes, position by position
    for k in range(KEEP, count):
        block: list[fx.Node] = []
        here = {n: p for p, n in enumerate(blocks[last])}
        before = {n: p for p, n in enumerate(blocks[last - 1])}

        def reads(n, block=block, here=here, before=before, built=built):
            if n in here:
                return block[here[n]]
            return built[before[n]] if n in before else copies[n]

        for node in blocks[last]:
            kind, counter, suffixed = move.key(node.name, last)
            name = move.name(kind, counter + (k - last) * steps.get(kind, 0), suffixed, k)
            target = move.path(node.target, last, k) if node.op in ("call_module", "get_attr") else node.target
            meta = dict(node.meta)
            if "nn_module_stack" in meta:
                meta["nn_module_stack"] = move.stack(meta["nn_module_stack"], last, k)
            block.append(emit(node, name, target, *fx.map_arg((node.args, node.kwargs), reads), meta))
        built = block
    current.update(zip(blocks[last], built))
    for node in post:
        kind, counter, suffixed = move.key(node.name)
        as_captured(node, move.name(kind, counter + (count - KEEP) * steps.get(kind, 0), suffixed))
    graph.lint()
    return graph, source, tuple(zip(blocks[-2], blocks[-1]))


# -- the GraphModule ---------------------------------------------------------------------------------
_OWN = {"_graph", "_code", "_lineno_map", "_prologue_start"} | set(_MODULE_KEYS)  # built for the new module


def _module_of(model: torch.nn.Module, graph: fx.Graph, template: fx.GraphModule, how: str, move: _Mover,
               count: int) -> fx.GraphModule:
    """The stitched graph's GraphModule, built as the full capture builds its own: an fx capture
    from the model (its modules and parameters, in graph order); an export capture as
    torch.export's stateful module (its class, hooks and attributes, a plain module tree in the
    order export registered it) holding the model's own tensors, blocks KEEP.. each a copy of
    block KEEP-1's tree."""
    if how == "fx":
        return fx.GraphModule(model, graph, type(template).__name__)
    cls = next(t for t in type(template).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
    gm = (cls._create(torch.nn.Module(), fx.Graph(), template.range_constraints) if hasattr(cls, "_create")
          else cls(torch.nn.Module(), fx.Graph()))
    for key, value in vars(template).items():
        if key in _OWN:
            continue
        if isinstance(value, types.MethodType) and value.__self__ is template:  # export's train() / eval() guards
            value = types.MethodType(value.__func__, gm)
        gm.__dict__[key] = copy.copy(value) if isinstance(value, (dict, list, set)) else value
    last = KEEP - 1

    def tree(src: torch.nn.Module, dst: torch.nn.Module, path: str, block: int | None) -> None:
        def value(name: str, tensor):
            if block is None or tensor is None:
                return tensor
            moved = move.path(f"{path}{name}", last, block)
            return model.get_parameter(moved) if isinstance(tensor, torch.nn.Parameter) else model.get_buffer(moved)

        for name, tensor in src._parameters.items():
            dst._parameters[name] = value(name, tensor)
        for name, tensor in src._buffers.items():
            dst._buffers[name] = value(name, tensor)
        dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
        for key, item in vars(src).items():  # constants (lifted tensors) are plain attributes
            if key not in vars(dst):
                dst.__dict__[key] = item
        for name, child in src._modules.items():
            dst._modules[name] = torch.nn.Module()
            tree(child, dst._modules[name], f"{path}{name}.", block)
            if f"{path}{name}" == f"{move.dotted}.{move.children[last]}":
                for k in range(KEEP, count):
                    dst._modules[move.children[k]] = torch.nn.Module()
                    tree(child, dst._modules[move.children[k]], f"{path}{name}.", k)

    tree(template, gm, "", None)
    gm.graph = graph
    return gm


def capture_repeated(model: torch.nn.Module, capture: Callable[[torch.nn.Module], tuple]):
    """(graph module, capture path, report notes, Replicas) of the whole model from a capture of
    its first KEEP blocks, `capture(model)` -> (graph module, path, notes) run on the truncated
    model; None when the blocks do not repeat (module docstring): capture the whole model."""
    found = repeated_blocks(model) if _ENABLED[-1] else None
    if found is None:
        return None
    prefix, count = found
    children = list(model.get_submodule(prefix)._modules)
    try:
        with truncated(model, prefix, KEEP):
            template, how, notes = capture(model)
        graph, source, repeats = stitch(template, prefix, children)
        gm = _module_of(model, graph, template, how, _Mover(prefix, children), count)
    except Exception as exc:  # _NoRepeat, or a capture error: the full path captures it or says why not
        _log.debug("repeated blocks not stitched (%s: %s): capturing the whole model", type(exc).__name__, exc)
        return None
    note = (f"captured and analysed {KEEP} of the {count} blocks of {prefix}: blocks {KEEP}..{count - 1} repeat "
            f"block {KEEP - 1} (same modules, shapes and attributes but the index)")
    return gm, how, notes + [note], Replicas(template, source, repeats, prefix, count, KEEP)


# -- analyses on the template ----------------------------------------------------------------------
def annotate(ir: IR, analysis: Callable[[IR], None]) -> IR:
    """Run `analysis` (writes NodeMeta fields of every node of the IR it is given) on the
    template and copy every template node's NodeMeta to its copies; on the whole IR when it has
    no template, or when the template's last two blocks came out different (the IR returned
    then has none: later analyses run on the whole IR too)."""
    replicas = ir.replicas
    if replicas is None:
        analysis(ir)
        return ir
    template = IR(gm=replicas.gm, capture=ir.capture)
    analysis(template)
    if any(template.meta(a) != template.meta(b) for a, b in replicas.repeats):
        analysis(ir)
        return ir.replace(replicas=None)
    source = replicas.source
    for node in ir.graph.nodes:  # a shallow copy each (copy.copy's protocol costs 10x this on 5k nodes)
        meta = object.__new__(NodeMeta)
        meta.__dict__.update(template.meta(source[node.name]).__dict__)
        node.meta[META_KEY] = meta
    return ir
