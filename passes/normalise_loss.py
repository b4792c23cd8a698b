"""Rewrite: a masked mean (a loss whose denominator is counted from the data) becomes its sum
divided by the whole step's count, so data parallelism and micro-batching give the serial loss.

Fine-tuning losses divide by the number of tokens that count: a cross-entropy with
ignore_index (prompt and padding labels -100) averages over the valid targets, a loss mask
multiplied in is divided by its sum. Each rank (and each micro-batch) holds a different number
of them, so the mean of the parts' means weighs tokens differently from the serial mean. With
P parts (dp ranks x micro-batches) averaged by the runtime, each part's loss becomes

    loss_part = P * sum_part / count_step

whose average over the parts is sum_step / count_step, the serial loss, and whose gradient is
the serial gradient (the count holds no parameter). `count_step` is a new graph input
(`pcompile_loss_count{i}`, one per masked term, read through a `step_count` node placed just before
its first use): `IR.loss_counts.gm` computes the counts from the model's inputs, and the backend
sums the rank's local counts over the ranks that split the batch, issued before the step and
waited by `step_count` (every micro-batch then reads the same total), passing 1 when no element counts
at all (the loss and its gradient are then 0: an all-ignored batch contributes nothing, without
NaN). Which terms: pcompile.sharding.loss_terms (kind "masked"): cross-entropy / NLL with
reduction="mean" over class indices (-> reduction="sum" / the valid targets, weighted by the
class weights), and `a.sum() / b` with b a batch sum of the inputs (b's casts and clamps then
apply to the step's count). A plan that averages nothing (dp = 1, one micro-batch) is left as is.

Ordering: after loss_check (which refuses what this cannot make exact), before tensor_parallel
(it turns the summed cross-entropy into the vocab-parallel one).
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir import IR, LossCounts
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime.loss_counts import step_count
from pcompile.sharding.loss_terms import CROSS_ENTROPY, MASKED, averaging, loss_terms, op_name
from pcompile.sharding.tp_ops import REDUCTIONS

COUNT = "pcompile_loss_count"


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def loss_options(ir: IR, node: fx.Node) -> tuple[fx.Node, object, int]:
    """(target, class weights or None, ignore_index) of a cross-entropy / NLL loss op. Every
    functional form (F.*, aten.*) takes them at positions 1, 2 and 4."""
    if node.op == "call_module":
        module = ir.gm.get_submodule(node.target)
        return _arg(node, 1, "target"), module.weight, module.ignore_index
    return _arg(node, 1, "target"), _arg(node, 2, "weight"), _arg(node, 4, "ignore_index", -100)


def summed_loss(ir: IR, node: fx.Node) -> fx.Node:
    """The loss op `node` with reduction="sum", inserted before it."""
    graph = ir.graph
    with graph.inserting_before(node):
        if node.op == "call_module":  # nn.CrossEntropyLoss / nn.NLLLoss: its functional form
            module = ir.gm.get_submodule(node.target)
            weight = graph.get_attr(f"{node.target}.weight") if module.weight is not None else None
            if weight is not None:
                ir.meta(weight).layer = ir.meta(node).layer
            kwargs = dict(weight=weight, ignore_index=module.ignore_index, reduction="sum")
            if isinstance(module, nn.CrossEntropyLoss):
                new = graph.call_function(F.cross_entropy, tuple(node.args[:2]),
                                          dict(kwargs, label_smoothing=module.label_smoothing))
            else:
                new = graph.call_function(F.nll_loss, tuple(node.args[:2]), kwargs)
        elif getattr(node.target, "_schema", None) is not None:  # aten: reduction is an int argument
            names = [a.name for a in node.target._schema.arguments]
            args = list(node.args) + [a.default_value for a in node.target._schema.arguments[len(node.args):]]
            args[names.index("reduction")] = REDUCTIONS.index("sum")
            new = graph.call_function(node.target, tuple(args[:max(len(node.args), names.index("reduction") + 1)]),
                                      {k: v for k, v in node.kwargs.items() if k != "reduction"})
        else:  # F.cross_entropy / F.nll_loss: the legacy flags go, reduction="sum"
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size_average", "reduce", "reduction")}
            args = list(node.args[:3])  # input, target, weight; the rest by keyword
            names = ("size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
            for index, name in enumerate(names, start=3):
                if len(node.args) > index and name in ("ignore_index", "label_smoothing"):
                    kwargs[name] = node.args[index]
            new = graph.call_function(node.target, tuple(args), dict(kwargs, reduction="sum"))
    new.meta = dict(node.meta)
    ir.meta(new)  # the copied NodeMeta (shape (), the loss's FLOPs and saved bytes)
    return new


def _copy_inputs(ir: IR, graph: fx.Graph, env: dict, node: fx.Node) -> fx.Node:
    """`node` and what it is computed from, copied into `graph` (its placeholders already in `env`)."""
    if node not in env:
        for source in node.all_input_nodes:
            _copy_inputs(ir, graph, env, source)
        env[node] = graph.node_copy(node, env.__getitem__)
    return env[node]


def _count_of_loss(ir: IR, graph: fx.Graph, env: dict, node: fx.Node) -> fx.Node:
    """The number of targets a cross-entropy / NLL mean divides by: those not ignore_index,
    weighted by their class weight when the loss has class weights."""
    target, weight, ignore = loss_options(ir, node)
    if op_name(ir.gm, node) in CROSS_ENTROPY and weight is not None:
        smoothing = (ir.gm.get_submodule(node.target).label_smoothing if node.op == "call_module"
                     else _arg(node, 7 if node.op == "call_function" and node.target is F.cross_entropy else 5,
                               "label_smoothing", 0.0))
        if smoothing:
            raise PcompileError(f"the loss {node.name} is a cross-entropy with class weights and label smoothing, "
                                "whose mean pcompile does not rewrite for data parallelism",
                                "drop the class weights or the label smoothing, or plan with dp=1 and one "
                                "micro-batch")
    labels = _copy_inputs(ir, graph, env, target)
    valid = graph.call_function(torch.ne, (labels, ignore))
    if weight is None:
        counted = graph.call_function(torch.sum, (valid,))
    else:
        table = (graph.get_attr(f"{node.target}.weight") if node.op == "call_module"
                 else _copy_inputs(ir, graph, env, weight))
        index = graph.call_function(torch.clamp, (labels,), {"min": 0})
        weights = graph.call_function(torch.take, (table, index))
        zero = graph.call_function(torch.zeros_like, (weights,))
        counted = graph.call_function(torch.sum, (graph.call_function(torch.where, (valid, weights, zero)),))
    return graph.call_method("double", (counted,))


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase `roots` and what they were computed from, where nothing else uses it any more."""
    frontier = list(roots)
    while frontier:
        node = frontier.pop()
        if node.graph is graph and not node.users and node.op != "placeholder":
            sources = node.all_input_nodes
            graph.erase_node(node)
            frontier.extend(sources)


@register_pass("normalise_loss", kind="rewrite", requires=("plan", "loss_checked"), ensures=("loss_normalised",))
def normalise_loss(ir: IR, ctx: PassContext) -> IR:
    """Masked means (ignore_index, loss masks) divide by the whole step's count, not each part's."""
    masked = [t for t in loss_terms(ir) if t.kind == MASKED] if averaging(ir, ctx.plan) else []
    if not masked:
        return ir
    graph, counts = ir.graph, fx.Graph()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    env = {p: counts.placeholder(p.target, default_value=p.args[0] if p.args else inspect.Signature.empty)
           for p in placeholders}
    outputs, names, last, dead, count_nodes = [], [], placeholders[-1], [], []
    for i, term in enumerate(masked):
        plan, layer = ctx.plan, ir.meta(term.node).layer
        parts = plan.strategy_for(layer).dp * (plan.num_microbatches if plan.pp > 1 else 1)
        with graph.inserting_after(last):
            last = graph.placeholder(f"{COUNT}{i}", default_value=1.0)
        ir.meta(last).layer = ir.meta(placeholders[0]).layer
        names.append(last.name)
        count_nodes.append(last)
        if term.count is None:  # a loss op's own mean: its sum over the step's valid targets
            outputs.append(_count_of_loss(ir, counts, env, term.node))
            numerator = summed_loss(ir, term.node)
            dead.append(term.node)
            with graph.inserting_after(numerator):
                ratio = graph.call_function(operator.truediv, (numerator, last))
        else:  # sum / b: b's casts and clamps now apply to the step's count
            outputs.append(counts.call_method("double", (_copy_inputs(ir, counts, env, term.count),)))
            term.count.replace_all_uses_with(last)
            dead.append(term.count)
            ratio = term.node
        with graph.inserting_after(ratio):
            scaled = graph.call_function(operator.mul, (ratio, float(parts)))
        term.node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        for new in (ratio, scaled):
            meta = ir.meta(new)
            meta.layer, meta.shape, meta.dtype = layer, (), ir.meta(term.node).dtype
            meta.output_bytes = ir.meta(term.node).output_bytes
    counts.output(tuple(outputs))
    _erase_dead(graph, dead)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for count in count_nodes:  # read where first used: the counts' all-reduce runs while the forward does
        first = min(count.users, key=order.__getitem__)
        with graph.inserting_before(first):
            read = graph.call_function(step_count, (count,))
        count.replace_all_uses_with(read, delete_user_cb=lambda user: user is not read)
        ir.meta(read).layer = ir.meta(first).layer
    graph.lint()
    ir.gm.recompile()
    how = ", ".join(f"{t.node.name} ({t.how})" for t in masked)
    ctx.report.append(f"normalise loss: {how} divided by the step's count over every rank and micro-batch")
    return ir.replace(loss_counts=LossCounts(tuple(names), fx.GraphModule(ir.gm, counts)))

