"""A loss's terms as data parallelism sees them (pure helpers on the IR): which terms of the
output loss sum over the batch, walking back from the output through additions, negations,
casts and scalings by a constant. A loss op whose `reduction` is "sum" (F.*, an nn.*Loss module,
or the aten op of a torch.export capture, whose reduction is an int: 0 none, 1 mean, 2 sum), or
a full `.sum()` of a tensor computed from the inputs, is such a term. A division by a tensor
(`sum / x.shape[0]`, `sum / mask.sum()`) stops the walk: it is a normalisation, not a sum. A
sum over parameters only (an L2 penalty) is the same on every rank, so averaging keeps it.
Asked by the search (which then offers dp = 1 and one micro-batch only) and the loss_check pass."""
from __future__ import annotations

import inspect

import torch.fx as fx

from pcompile.ir import IR, reads_inputs
from pcompile.sharding.tp_ops import REDUCTIONS  # at::Reduction's numbering

# Ops that carry the loss's terms through unchanged in kind: a sum stays a sum.
TERMS = {"add", "sub", "neg", "float", "to", "_to_copy", "type", "clone", "contiguous", "squeeze", "view",
         "reshape"}
SCALINGS = {"mul", "truediv", "div"}  # by a constant: still a sum; by a tensor: a normalisation
SUMS = {"sum", "nansum"}


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """"add", "sum", "cross_entropy", "cross_entropy_loss", "CrossEntropyLoss"... whatever the capture."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
    return ""


def reduction(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The `reduction` a loss node applies ("none", "mean", "sum", ...), or None for other ops."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "reduction", None)  # the module resolved legacy flags
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # aten: the reduction is an int argument
        names = [a.name for a in schema.arguments]
        if "reduction" not in names:
            return None
        i = names.index("reduction")
        value = node.args[i] if len(node.args) > i else node.kwargs.get("reduction", schema.arguments[i].default_value)
        return REDUCTIONS[value] if isinstance(value, int) and 0 <= value < len(REDUCTIONS) else str(value)
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    args = bound.arguments
    if "reduction" not in args:
        return None
    size_average, reduce = args.get("size_average"), args.get("reduce")
    if size_average is not None or reduce is not None:  # the legacy flags win, as in torch (True if None)
        return "none" if reduce is False else "sum" if size_average is False else "mean"
    return args["reduction"]


def summed_terms(ir: IR) -> list[tuple[fx.Node, str]]:
    """(node, how it sums) for each term of the output loss that is a sum over the batch."""
    gm, found = ir.gm, []
    output = next(n for n in ir.graph.nodes if n.op == "output")
    frontier, seen = list(output.all_input_nodes), set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        name = op_name(gm, node)
        if reduction(gm, node) == "sum":
            found.append((node, f"{name}(reduction='sum')"))
        elif name in SUMS and reads_inputs(node):  # computed from the inputs, not only parameters
            found.append((node, f"{name}() of a tensor computed from the inputs"))
        elif name in TERMS:
            frontier.extend(node.all_input_nodes)
        elif name in SCALINGS:
            constants = [a for a in node.args if not isinstance(a, fx.Node)]
            if len(constants) + 1 == len(node.args) and 0 not in constants:  # one tensor, scaled (not zeroed)
                frontier.extend(node.all_input_nodes)
    return found
