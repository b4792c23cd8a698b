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
  statistics
          a function of statistics of the whole batch: every way the term reads the data goes
          through a mean or sum over the batch dim (a mixture-of-experts router's load-balancing
          loss, sum(tokens_per_expert * mean_router_prob)). Exact under data parallelism once
          each statistic is the whole batch's (the batch_statistics pass all-reduces them);
          not under micro-batching (a micro-batch's statistics are all a stage ever sees).
          Told apart from `coupled` only given the values' batch dims (batch_dims)
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
from pcompile.runtime.collectives import batch_statistic
from pcompile.sharding.batch_dims import SCALES, batch_dims
from pcompile.sharding.tp_ops import REDUCTIONS, loss_parts  # at::Reduction's numbering

MEAN, MASKED, SUM, STATS, COUPLED = "mean", "masked", "sum", "statistics", "coupled"
# Ops that carry the loss's terms through unchanged in kind: a sum stays a sum.
TERMS = {"add", "sub", "neg", "float", "to", "_to_copy", "type", "clone", "contiguous", "squeeze", "view",
         "reshape", "alias", "add_", "sub_", "neg_"}  # in place: the same value (export keeps `loss += ...`)
SCALINGS = {"mul", "truediv", "div", "mul_", "div_"}
SUMS = {"sum", "nansum", "count_nonzero"}
MEANS = {"mean", "nanmean"}
COUNTS = {"histc", "bincount"}  # histograms over every element: additive over the batch
ZEROS = {"zeros", "zeros_like", "new_zeros"}  # an accumulator's start (`total = torch.zeros(n)`)
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
    stats: tuple = ()  # statistics: ((reduction node, "mean" | "sum"), ...) the term reads the data through


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


def _whole_batch(node: fx.Node) -> bool:
    """A statistic already made the whole batch's (batch_statistic): the same on every rank."""
    return node.op == "call_function" and node.target is batch_statistic


def reads_data(node: fx.Node) -> bool:
    """Whether `node` differs between the ranks that split the batch: computed from the inputs
    other than through whole-batch statistics."""
    return not _whole_batch(node) and reads_inputs(node, follow=lambda n: not _whole_batch(n))


def loss_terms(ir: IR, roots: list[fx.Node] | None = None, dims: dict | None = None) -> list[LossTerm]:
    """The terms of the output loss (or of the values `roots`), each with its kind (see the
    module docstring). `dims` (node -> batch dim, pcompile.sharding.batch_dims): tells
    statistics terms apart from coupled ones."""
    gm, found = ir.gm, []
    if roots is None:
        roots = next(n for n in ir.graph.nodes if n.op == "output").all_input_nodes
    frontier, seen = list(roots), set()
    while frontier:
        node = frontier.pop()
        if node in seen or not reads_data(node):  # a term without the data is the same on every rank
            continue
        seen.add(node)
        name, reduced = op_name(gm, node), reduction(gm, node)
        if reduced == "sum":
            found.append(LossTerm(node, SUM, f"{name}(reduction='sum')"))
        elif reduced == "mean" and name in CROSS_ENTROPY | NLL and class_index_targets(ir, node):
            found.append(LossTerm(node, MASKED, f"{name}(reduction='mean') over class indices"))
        elif reduced == "mean":
            found.append(LossTerm(node, MEAN, f"{name}(reduction='mean')"))
        elif name in SUMS and _full(ir, node) and not _of_statistics(ir, node, dims):
            found.append(LossTerm(node, SUM, f"{name}() of a tensor computed from the inputs"))
        elif name in MEANS and _full(ir, node) and not _of_statistics(ir, node, dims):
            found.append(LossTerm(node, MEAN, f"{name}()"))
        elif name in TERMS:
            frontier.extend(node.all_input_nodes)
        elif name in SCALINGS:
            found += [_refined(ir, t, dims) for t in _scaling(ir, node, name, frontier)]
        else:
            found.append(_refined(ir, LossTerm(node, COUPLED, f"{name} of values computed from the data"), dims))
    return found


def _refined(ir: IR, term: LossTerm, dims: dict | None) -> LossTerm:
    """A coupled term that reads the data only through whole-batch statistics: kind statistics."""
    stats = _of_statistics(ir, term.node, dims) if term.kind == COUPLED else None
    if not stats:
        return term
    names = ", ".join(f"{kind} {node.name}" for node, kind in stats)
    return LossTerm(term.node, STATS, f"{term.how}, a function of batch statistics ({names})", stats=tuple(stats))


def _of_statistics(ir: IR, node: fx.Node, dims: dict | None) -> list[tuple[fx.Node, str]] | None:
    """_statistics of a value computed from batch statistics (not itself one: a plain mean or
    sum over the batch keeps its own kind)."""
    stats = _statistics(ir, node, dims)
    return stats if stats and all(stat is not node for stat, _ in stats) else None


def _reduced_dims(ir: IR, node: fx.Node) -> tuple[int, ...] | None:
    """The dims a mean / sum node reduces (all for a full reduction), or None for other ops."""
    if op_name(ir.gm, node) not in SUMS | MEANS or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    rank = len(ir.meta(source).shape) if ir.has_meta(source) and ir.meta(source).shape is not None else None
    if rank is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(rank))
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % rank for d in dims)


def _statistics(ir: IR, node: fx.Node, dims: dict | None) -> list[tuple[fx.Node, str]] | None:
    """The batch statistics (see _additive) that every path from the data into `node` passes
    through, with their kind ("mean" / "sum"), or None when some path does not (or dims are
    unknown)."""
    if dims is None:
        return None
    stats, frontier, seen, memo = [], [node], set(), {}
    while frontier:
        current = frontier.pop()
        if current in seen or not reads_data(current):
            continue
        seen.add(current)
        kind = _additive(ir, current, dims, memo) if dims.get(current) is None else None
        if kind is not None:
            stats.append((current, kind))
            continue
        if dims.get(current) is not None or current.op == "placeholder":  # per-sample data past every statistic
            return None
        frontier.extend(current.all_input_nodes)
    return stats or None


def _additive(ir: IR, node: fx.Node, dims: dict, memo: dict) -> str | None:
    """"sum" when `node` is a sum over the batch of per-sample contributions, "mean" when it is
    such a sum divided by the local number of samples (or a mean over the batch dim), else
    None. Sums of sums, scalings by constants or parameters, casts and reshapes keep the kind;
    a division by a number that grows with the batch (a token count from sizes) makes a mean;
    adding a constant keeps a mean, not a sum."""
    if node in memo:
        return memo[node]
    memo[node] = None  # cycles cannot occur in a graph; this only marks the visit
    name, kind = op_name(ir.gm, node), None
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    reduced = _reduced_dims(ir, node)
    if reduced is not None and first is not None and isinstance(dims.get(first), int) and dims[first] in reduced:
        if reduction(ir.gm, node) is None and dims.get(node) is None:
            kind = "mean" if name in MEANS else "sum"
    elif name in COUNTS and isinstance(first, fx.Node) and isinstance(dims.get(first), int):
        kind = "sum"  # a histogram of all elements: the sum of the parts' histograms
    elif name in TERMS and first is not None:
        parts = [a for a in node.all_input_nodes if reads_data(a)]
        kinds = {_additive(ir, a, dims, memo) for a in parts}
        kind = kinds.pop() if len(kinds) == 1 else None
        others = [a for a in (*node.args, *node.kwargs.values()) if not (isinstance(a, fx.Node) and reads_data(a))]
        if kind == "sum" and not all(a == 0 if not isinstance(a, fx.Node) else _zeros(ir, a) for a in others):
            kind = None  # sum + c: the whole batch's would add c once, the parts' dp times
    elif name in SCALINGS and first is not None:
        other = node.args[1] if len(node.args) > 1 else None
        data = [a for a in node.args if isinstance(a, fx.Node) and reads_data(a) and not _size_number(ir, a)]
        if data == [first] and _size_number(ir, other) and dims.get(other) == SCALES and name != "mul":
            kind = "mean" if _additive(ir, first, dims, memo) == "sum" else None  # / a count that grows with the batch
        elif data == [first] and not (isinstance(other, fx.Node) and dims.get(other) is not None):
            kind = _additive(ir, first, dims, memo)
    memo[node] = kind
    return kind


def _zeros(ir: IR, node: fx.Node) -> bool:
    """A tensor of zeros created in the graph (adding it keeps a sum a sum)."""
    return op_name(ir.gm, node) in ZEROS


def _size_number(ir: IR, node) -> bool:
    """A number computed from tensor sizes (a symbolic int or float: no tensor value)."""
    return isinstance(node, fx.Node) and ir.has_meta(node) and ir.meta(node).shape is None


def _scaling(ir: IR, node: fx.Node, name: str, frontier: list) -> list[LossTerm]:
    """A product or quotient: a scaling by a constant or parameter-only value keeps the term's
    kind; a division by a batch count is a masked mean; by the local batch size, a mean."""
    data = [a for a in node.args if isinstance(a, fx.Node) and reads_data(a)]
    if name == "mul":
        if len(data) > 1:
            return [LossTerm(node, COUPLED, "a product of two values computed from the data")]
        frontier.extend(data)
        return []
    numerator, denominator = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(denominator, fx.Node) and reads_data(denominator)):
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


def classified(ir: IR, inputs: tuple | None) -> list[LossTerm]:
    """loss_terms with statistics told apart from sums and coupled terms: the batch dims are
    found (two fake runs, pcompile.sharding.batch_dims) only when such a term exists and
    `inputs` (the example inputs) are given."""
    terms = loss_terms(ir)
    if inputs is None or not any(t.kind in (SUM, COUPLED) for t in terms):
        return terms
    return loss_terms(ir, dims=batch_dims(ir, inputs))


def inexact_terms(ir: IR, plan=None, inputs: tuple | None = None) -> list[LossTerm]:
    """The terms no averaging of parts gives: sums, coupled terms, and statistics terms under a
    plan the batch_statistics pass cannot make exact (statistics_split). Without `inputs`
    statistics terms are not told apart from coupled ones. Masked means are made exact by
    normalise_loss."""
    split = plan is not None and statistics_split(ir, plan) is not None
    return [t for t in classified(ir, inputs) if t.kind in (SUM, COUPLED) or (t.kind == STATS and split)]


def statistics_split(ir: IR, plan) -> str | None:
    """Why a statistics term cannot be made the whole batch's under `plan`, or None: with
    several micro-batches a stage only ever sees one; with layers at different dp degrees the
    statistic's gradient would cross groupings the regrouping does not scale (not verified)."""
    if plan.pp > 1 and plan.num_microbatches > 1:
        return f"pp={plan.pp} runs {plan.num_microbatches} micro-batches: a stage sees one micro-batch at a time"
    dps = sorted({plan.strategy_for(layer).dp for layer in ir.layers})
    if len(dps) > 1:
        return f"its layers run at dp degrees {dps}: the statistics are reduced over one data-parallel group only"
    return None


def averaging(ir: IR, plan) -> str | None:
    """What in the plan averages per-rank or per-micro-batch losses, or None."""
    dp = max(plan.strategy_for(layer).dp for layer in ir.layers)
    reasons = [f"dp={dp} averages the ranks' losses and gradients"] if dp > 1 else []
    if plan.pp > 1 and plan.num_microbatches > 1:
        reasons.append(f"pp={plan.pp} averages {plan.num_microbatches} micro-batches' losses and gradients")
    return " and ".join(reasons) or None
