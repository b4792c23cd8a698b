"""A loss's terms as data parallelism sees them (pure helpers on the IR). Data parallelism and
micro-batching run the loss on parts of the batch and average the parts; `loss_terms` says, for
each term of the output loss (walking back from the output through additions, negations, casts
and scalings by constants or by parameter-only values), which kind it is:

  mean    exact under averaging as it is: a mean over all elements (reduction="mean" of a loss
          without ignored targets, .mean(), a sum divided by the local batch size), or a term
          that does not read the data (an L2 penalty on the weights: the same on every rank)
  masked  a mean whose denominator is counted from the data: a cross-entropy / NLL with
          reduction="mean" over class-index targets (the denominator is the number of targets
          that are not ignore_index, weighted by the class weights), or `a.sum() / b` where b is
          a sum over the batch computed from the inputs only (a loss mask's sum, the number of
          valid tokens; possibly clamped or cast). Exact once the denominator is the whole
          step's: the normalise_loss pass rewrites it so
  sum     a sum over the batch (reduction="sum", a full .sum() of a tensor computed from the
          inputs): averaging would divide it by the number of parts
  coupled anything else that reads the data above the batch reductions (a product or ratio of
          batch statistics, a nonlinearity of a mean, a division by a data value that is not a
          batch sum): no averaging of parts gives it

Asked by the search (which offers dp = 1 and one micro-batch only when a sum or coupled term
exists), the loss_check pass (which refuses them under averaging plans) and normalise_loss.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx

from pcompile.ir import IR, reads_inputs
from pcompile.ir.params import attribute
from pcompile.sharding.tp_ops import REDUCTIONS, loss_parts  # at::Reduction's numbering

MEAN, MASKED, SUM, COUPLED = "mean", "masked", "sum", "coupled"
# Ops that carry the loss's terms through unchanged in kind: a sum stays a sum.
TERMS = {"add", "sub", "neg", "float", "to", "_to_copy", "type", "clone", "contiguous", "squeeze", "view",
         "reshape", "alias"}
SCALINGS = {"mul", "truediv", "div"}
SUMS = {"sum", "nansum", "count_nonzero"}
MEANS = {"mean", "nanmean"}
# Between a batch sum and the division: casts and clamps of the count (HF's `num_items_in_batch`
# clamp, a `.float()`), applied to the whole step's sum as well
COUNT_WRAPPERS = {"float", "to", "_to_copy", "type", "clamp", "clamp_min", "clip", "maximum", "double"}
NLL = {"nll_loss", "nll_loss_nd", "nll_loss2d", "NLLLoss"}
CROSS_ENTROPY = {"cross_entropy", "cross_entropy_loss", "CrossEntropyLoss"}


@dataclass(frozen=True)
class LossTerm:
    node: fx.Node  # the term's reduction (masked: the loss op, or the division)
    kind: str  # MEAN, MASKED, SUM or COUPLED
    how: str  # what it is, for messages
    count: fx.Node | None = None  # masked `a.sum() / b`: the batch sum b is made of (None: a loss op's)


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


def _depends_on_params(ir: IR, node: fx.Node) -> bool:
    """Whether `node` is computed from parameters (get_attr of one, or a module holding some)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and isinstance(attribute(ir.gm, current.target), torch.nn.Parameter):
            return True
        if current.op == "call_module" and any(True for _ in ir.gm.get_submodule(current.target).parameters()):
            return True
        frontier.extend(current.all_input_nodes)
    return False


def _full(ir: IR, node: fx.Node) -> bool:
    """A reduction to one number (a 0-dim output)."""
    return ir.has_meta(node) and ir.meta(node).shape == ()


def class_index_targets(ir: IR, node: fx.Node) -> bool:
    """A cross-entropy / NLL loss op whose targets are class indices (not probabilities)."""
    parts = loss_parts(ir.gm, node)
    target = parts.target if parts is not None else (node.args[1] if len(node.args) > 1 else None)
    dtype = ir.meta(target).dtype if isinstance(target, fx.Node) and ir.has_meta(target) else None
    return dtype is not None and "int" in dtype


def batch_count(ir: IR, node: fx.Node) -> fx.Node | None:
    """The full sum `node` is (through casts and clamps), when it is computed from the inputs
    only: a count of the step's valid elements. None otherwise."""
    gm = ir.gm
    while op_name(gm, node) in COUNT_WRAPPERS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if op_name(gm, node) in SUMS and _full(ir, node) and reads_inputs(node) and not _depends_on_params(ir, node):
        return node
    return None


def loss_terms(ir: IR, roots: list[fx.Node] | None = None) -> list[LossTerm]:
    """The terms of the output loss (or of the values `roots`), each with its kind (see the
    module docstring)."""
    gm, found = ir.gm, []
    if roots is None:
        roots = next(n for n in ir.graph.nodes if n.op == "output").all_input_nodes
    frontier, seen = list(roots), set()
    while frontier:
        node = frontier.pop()
        if node in seen or not reads_inputs(node):  # a term without the data is the same on every rank
            continue
        seen.add(node)
        name, reduced = op_name(gm, node), reduction(gm, node)
        if reduced == "sum":
            found.append(LossTerm(node, SUM, f"{name}(reduction='sum')"))
        elif reduced == "mean" and name in CROSS_ENTROPY | NLL and class_index_targets(ir, node):
            found.append(LossTerm(node, MASKED, f"{name}(reduction='mean') over class indices"))
        elif reduced == "mean":
            found.append(LossTerm(node, MEAN, f"{name}(reduction='mean')"))
        elif name in SUMS and _full(ir, node):
            found.append(LossTerm(node, SUM, f"{name}() of a tensor computed from the inputs"))
        elif name in MEANS and _full(ir, node):
            found.append(LossTerm(node, MEAN, f"{name}()"))
        elif name in TERMS:
            frontier.extend(node.all_input_nodes)
        elif name in SCALINGS:
            found += _scaling(ir, node, name, frontier)
        else:
            found.append(LossTerm(node, COUPLED, f"{name} of values computed from the data"))
    return found


def _scaling(ir: IR, node: fx.Node, name: str, frontier: list) -> list[LossTerm]:
    """A product or quotient: a scaling by a constant or parameter-only value keeps the term's
    kind; a division by a batch count is a masked mean; by the local batch size, a mean."""
    data = [a for a in node.args if isinstance(a, fx.Node) and reads_inputs(a)]
    if name == "mul":
        if len(data) > 1:
            return [LossTerm(node, COUPLED, "a product of two values computed from the data")]
        frontier.extend(data)
        return []
    numerator, denominator = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(denominator, fx.Node) and reads_inputs(denominator)):
        frontier.extend(data)  # scaled by a constant or by parameters
        return []
    if ir.has_meta(denominator) and ir.meta(denominator).shape is None:
        return [LossTerm(node, MEAN, "a sum divided by the local batch size")]
    count = batch_count(ir, denominator)
    if count is None:
        return [LossTerm(node, COUPLED, f"a division by {denominator.name}, a value computed from the data that "
                                        "is not a sum over the batch of the inputs")]
    inner = loss_terms(ir, [numerator])
    if not inner or any(t.kind != SUM for t in inner):
        return [LossTerm(node, COUPLED, f"a division by the batch count {count.name} of something that is not a "
                                        "sum over the batch")]
    return [LossTerm(node, MASKED, f"a sum divided by the batch count {count.name}", count)]


def inexact_terms(ir: IR) -> list[LossTerm]:
    """The terms no averaging of parts gives (sums, coupled terms): plans that average (dp > 1,
    micro-batches) are refused for them; masked means are made exact by normalise_loss."""
    return [t for t in loss_terms(ir) if t.kind in (SUM, COUPLED)]


def averaging(ir: IR, plan) -> str | None:
    """What in the plan averages per-rank or per-micro-batch losses, or None."""
    dp = max(plan.strategy_for(layer).dp for layer in ir.layers)
    reasons = [f"dp={dp} averages the ranks' losses and gradients"] if dp > 1 else []
    if plan.pp > 1 and plan.num_microbatches > 1:
        reasons.append(f"pp={plan.pp} averages {plan.num_microbatches} micro-batches' losses and gradients")
    return " and ".join(reasons) or None
