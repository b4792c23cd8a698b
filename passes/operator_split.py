"""Rewrite: operator splitting (OSDP) of a layer's Linears into k input-feature chunks.

For a layer whose strategy has `split = k > 1`, every Linear of the layer (all of them: in a
transformer or MLP block the Linears hold all the weights, which is what splitting is for)

    y = x @ W^T + b,            W: [out, in]

becomes a partial-sum reduction over k chunks of the input features

    xs = chunk(x, k, dim=-1);  Ws = chunk(W, k, dim=1)
    y  = linear(xs[0], Ws[0], b) + linear(xs[1], Ws[1]) + ... + linear(xs[k-1], Ws[k-1])

with W read by `get_attr` from the original parameter (names unchanged). Exact in real
arithmetic; in fp32 only the summation order changes (differences ~1e-7).

Both Linear forms are rewritten: `call_module` nn.Linear, and `linear(x, get_attr W[, b])`
(the tensor-parallel rewrite's row-parallel form, whose input and weight are already split
over tp along the input features: the chunks are then of the *local* features). `chunk` is
used rather than fixed slices so the same graph runs on the full and the tp-local shapes.

What it buys: with sharded data parallelism each W chunk is its own gathered unit, so only
1/k of a weight (and of its gradient) is materialised at a time. Without sdp the weights are
resident anyway: splitting only adds k-1 partial outputs of y's size as temporaries.

Ordering: after tensor_parallel (it must see the row-parallel form), before checkpoint.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir import IR, NodeMeta, Placement
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.sharding.tp_ops import LinearParts, linear_parts


def local_in_features(ir: IR, parts: LinearParts) -> int:
    """Input features of this rank's weight (divided when the weight is split along dim 1)."""
    sharding = ir.param_shardings.get(parts.weight)
    return parts.in_features // sharding.size if sharding is not None and sharding.dim == 1 else parts.in_features


def _meta(ir: IR, node: fx.Node, like: fx.Node, divide_last: int = 1) -> NodeMeta:
    """Metadata of an inserted node: `like`'s layer, dtype, sharding; shape with the last dim / divide_last."""
    src, meta = ir.meta(like), ir.meta(node)
    meta.layer, meta.dtype, meta.placement = src.layer, src.dtype, src.placement
    shape = src.shape
    if shape is not None and divide_last > 1:
        shape = tuple(shape[:-1]) + (shape[-1] // divide_last,)
    meta.shape = shape
    meta.output_bytes = src.output_bytes // divide_last
    return meta


def _chunks(ir: IR, source: fx.Node, k: int, dim: int, before: fx.Node) -> list[fx.Node]:
    """k getitem nodes over one `chunk(source, k, dim)` node, inserted before `before`.
    `dim` is the last dim of `source` (x: -1, W [out, in]: 1), so shapes divide their last dim."""
    graph = ir.graph
    with graph.inserting_before(before):
        whole = graph.call_function(torch.chunk, (source, k, dim))
        parts = [graph.call_function(operator.getitem, (whole, i)) for i in range(k)]
    ir.meta(whole).layer = ir.meta(before).layer
    for part in parts:
        _meta(ir, part, source, divide_last=k).layer = ir.meta(before).layer
    return parts


def _param_node(ir: IR, name: str, before: fx.Node) -> fx.Node:
    """A get_attr of parameter `name` annotated like the parameter (and its sharding)."""
    with ir.graph.inserting_before(before):
        node = ir.graph.get_attr(name)
    param, sharding = ir.gm.get_parameter(name), ir.param_shardings.get(name)
    meta = ir.meta(node)
    meta.layer, meta.shape, meta.dtype = ir.meta(before).layer, tuple(param.shape), str(param.dtype)
    meta.output_bytes = param.numel() * param.element_size()
    meta.placement = Placement.of(sharding)
    return node


def _weight_and_bias(ir: IR, node: fx.Node, parts: LinearParts) -> tuple[fx.Node, fx.Node | None]:
    """The Linear's weight and bias as graph values (new get_attr nodes for an nn.Linear call)."""
    if node.op == "call_function":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[1], bias
    weight = _param_node(ir, parts.weight, node)
    ir.meta(weight).param_bytes = ir.meta(node).param_bytes  # the module call's charge moves here
    return weight, None if parts.bias is None else _param_node(ir, parts.bias, node)


def split_linear(ir: IR, node: fx.Node, k: int) -> fx.Node:
    """Replace Linear `node` by k partial linears over input-feature chunks and their sum."""
    parts = linear_parts(ir.gm, node)
    features = local_in_features(ir, parts)
    if features % k:
        raise PcompileError(
            f"split={k} cannot split Linear {node.name} of layer {ir.meta(node).layer!r}: its "
            f"{features} (local) input features are not divisible by {k}",
            f"choose a split that divides {features} (e.g. 2 or 4) for this layer, or split=1")
    graph = ir.graph
    weight, bias = _weight_and_bias(ir, node, parts)
    xs, ws = _chunks(ir, parts.input, k, -1, node), _chunks(ir, weight, k, 1, node)
    total, original = None, ir.meta(node)
    for i in range(k):
        with graph.inserting_before(node):
            partial = graph.call_function(F.linear, (xs[i], ws[i], bias if i == 0 else None))
        meta = _meta(ir, partial, node)
        meta.flops, meta.bwd_flops = original.flops // k, original.bwd_flops // k
        meta.saved_bytes = original.saved_bytes if i == 0 else 0  # chunks are views of the saved x
        if total is None:
            total = partial
            continue
        with graph.inserting_before(node):
            total = graph.call_function(operator.add, (total, partial))
        _meta(ir, total, node)
    node.replace_all_uses_with(total)
    graph.erase_node(node)
    return total


def split_linears(ir: IR, layer: str, k: int) -> int:
    """Split every Linear of `layer` into k chunks; returns how many were split."""
    linears = [n for n in ir.nodes_of(layer) if linear_parts(ir.gm, n) is not None]
    for node in linears:
        split_linear(ir, node, k)
    return len(linears)


@register_pass("operator_split", kind="rewrite", requires=("tensor_parallel", "sequence_parallel"),
               ensures=("operator_split",))
def operator_split(ir: IR, ctx: PassContext) -> IR:
    """Split the Linears of layers with strategy.split = k > 1 into k input-feature chunks (OSDP)."""
    counts = {}
    for layer in ir.layers:
        k = ctx.plan.strategy_for(layer).split
        if k > 1:
            counts[layer] = (k, split_linears(ir, layer, k))
    if not counts:
        return ir
    ir.graph.lint()
    ir.gm.recompile()
    ctx.report.append("operator split: " + ", ".join(f"{layer} {n} Linear(s) into {k}"
                                                     for layer, (k, n) in counts.items()))
    return ir
