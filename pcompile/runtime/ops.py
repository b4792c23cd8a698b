"""The registry of run-time ops: every function that rewritten graphs call as a `call_function`
target declares itself here, with what it is. Passes and backends ask this registry (is this
node a run-time op? does it name a mesh axis the backend must bind? which argument?) instead
of deciding by module names or by lists kept next to each op.

Kinds:
  collective  communicates over a mesh axis: positional argument `axis_arg` names the axis and
              the next one is the group size; the backend binds the name to a process group
  local       runs on this rank alone (shape queries, ZeRO-3 runners, checkpoint regions, ...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx


@dataclass(frozen=True)
class RuntimeOp:
    fn: Callable
    kind: str  # "collective" | "local"
    axis_arg: int | None = None  # collectives: the positional index of the axis name


_OPS: dict[Callable, RuntimeOp] = {}


def collective(axis_arg: int):
    """Register a collective whose positional argument `axis_arg` names its axis (the group size follows)."""
    def register(fn):
        _OPS[fn] = RuntimeOp(fn, "collective", axis_arg)
        return fn
    return register


def local(fn):
    """Register a run-time op that runs on this rank alone."""
    _OPS[fn] = RuntimeOp(fn, "local")
    return fn


def op_of(node: fx.Node) -> RuntimeOp | None:
    """The run-time op a node calls, or None."""
    if node.op != "call_function":
        return None
    try:
        return _OPS.get(node.target)
    except TypeError:  # an unhashable target
        return None


def is_collective(node: fx.Node) -> bool:
    op = op_of(node)
    return op is not None and op.kind == "collective"


def axis_of(node: fx.Node) -> tuple[str, int] | None:
    """(axis name, group size) of a collective node, else None."""
    op = op_of(node)
    if op is None or op.kind != "collective":
        return None
    return node.args[op.axis_arg], node.args[op.axis_arg + 1]


def with_axis(node: fx.Node, axis: str) -> None:
    """Rename the axis a collective node names (the backend binds names to process groups)."""
    op = op_of(node)
    args = list(node.args)
    args[op.axis_arg] = axis
    node.args = tuple(args)


def collectives_of(gm: fx.GraphModule):
    """Every collective node of `gm` and of the GraphModules nested in it (checkpoint regions,
    pipeline stages), with the GraphModule holding it."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if is_collective(node):
                    yield module, node


_OPAQUE: dict[Callable, Callable] = {}  # run-time op -> its torch.compiler.disable wrapper


def opaque_to_compiler(gm: fx.GraphModule) -> None:
    """Make every run-time op of `gm` (and of the GraphModules nested in it) run eagerly under
    torch.compile: a graph break around each. Why: they hold what a traced graph cannot keep -
    process groups looked up at run time, ZeRO-3's saved-tensor hooks that re-gather a
    parameter in backward (traced, AOTAutograd saves the gathered tensor itself, and the
    gradients come out wrong), random-stream swaps, checkpoint regions. The compiled segments
    between them are plain tensor code. The wrappers stay registered as the ops they wrap."""
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            op = op_of(node)
            if op is None or node.target in _OPAQUE.values():
                continue
            if node.target not in _OPAQUE:
                wrapper = torch.compiler.disable(node.target, recursive=True)
                _OPAQUE[node.target] = wrapper
                _OPS[wrapper] = op
            node.target = _OPAQUE[node.target]
            changed = True
        if changed:
            module.recompile()
