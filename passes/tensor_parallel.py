"""Rewrite: Megatron tensor parallelism made explicit in the graph.

From the sharding propagation (tp_rules): column-parallel Linears get their weight (and
bias) split along the output features and their input passed through `tp_copy` (all-reduce
in backward); row-parallel Linears become `linear(x, W_shard)` -> `tp_reduce` -> `+ bias`;
views get their split dim's size divided, and so do the equal blocks a fused projection's
output is split into (tp_fused: its weight split block-wise); shape queries on split tensors
return the full shape; replicated operands meeting split ones are sliced with `tp_scatter`, or,
broadcast along the split dim and carrying a gradient, passed through `tp_copy`. Vocab
parallelism (Megatron): an embedding whose table is split along the vocabulary becomes
`vocab_embedding` (this rank's rows, others zero) -> `tp_reduce`, and a cross-entropy of
logits split along the vocabulary (the LM head is a column Linear) becomes
`vocab_parallel_cross_entropy`; a tied table keeps one sharding under all its names. After
the rewrite every split node's placement says so, and the pass manager checks on fake tensors
that each node's local shape is its global shape cut by its placement (passes/invariants.py).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir import IR, REPLICATED, NodeMeta, Placement, Shard
from pcompile.ir.params import param_layers, under_every_name
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.passes.invariants import PLACEMENTS
from pcompile.runtime import collectives, vocab_parallel
from pcompile.sharding.tp_ops import embedding_parts, kind_of, loss_parts
from pcompile.sharding.tp_rules import NO_LINEAR, Propagation, linear_parts, plan_tensor_parallel

AXIS = "tp"


def layer_degrees(ir: IR, ctx: PassContext) -> dict[str, int]:
    return {layer: ctx.plan.strategy_for(layer).tp for layer in ir.layers}


def _annotate(ir: IR, node: fx.Node, like: fx.Node, placement: Placement | None, tensor: bool = True) -> NodeMeta:
    """Metadata for an inserted node: `like`'s layer and (for tensors) shape and bytes."""
    meta = ir.meta(node)
    meta.layer, meta.placement = ir.meta(like).layer, placement
    if tensor:
        meta.shape, meta.dtype = ir.meta(like).shape, ir.meta(like).dtype
        meta.output_bytes = ir.meta(like).output_bytes
    return meta


def _annotate_param(ir: IR, node: fx.Node, like: fx.Node, name: str, placement: Placement) -> None:
    param = ir.gm.get_parameter(name)
    meta = _annotate(ir, node, like, placement, tensor=False)
    meta.shape, meta.dtype = tuple(param.shape), str(param.dtype)
    meta.output_bytes = param.numel() * param.element_size()


def _insert_copies(ir: IR, p: Propagation) -> None:
    """One tp_copy per distinct input of column Linears (q, k, v share one)."""
    copies: dict[fx.Node, fx.Node] = {}
    for node in [n for n in ir.graph.nodes if n in p.column]:
        source = linear_parts(ir.gm, node).input
        if source not in copies:
            with ir.graph.inserting_after(source):
                copies[source] = ir.graph.call_function(collectives.tp_copy, (source, AXIS, p.degree[node]))
            _annotate(ir, copies[source], source, REPLICATED)
        node.replace_input_with(source, copies[source])


def _rewrite_row(ir: IR, node: fx.Node, degree: int) -> None:
    """linear(x, W) or addmm(b, x, W) with x and W split along the input features: the local
    product is a partial sum; all-reduce it, then add the (replicated) bias once."""
    parts = linear_parts(ir.gm, node)
    graph = ir.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(parts.weight)
        local = graph.call_function(F.linear if parts.out_dim == 0 else torch.mm, (parts.input, weight))
        reduced = graph.call_function(collectives.tp_reduce, (local, AXIS, degree))
        out = reduced
        if parts.bias is not None:
            bias = graph.get_attr(parts.bias)
            out = graph.call_function(operator.add, (reduced, bias))
            _annotate_param(ir, bias, node, parts.bias, REPLICATED)
    _annotate_param(ir, weight, node, parts.weight, Placement.shard(1 - parts.out_dim, AXIS, degree))
    ir.meta(weight).param_bytes = ir.meta(node).param_bytes
    for attr in ("flops", "bwd_flops", "saved_bytes"):
        setattr(ir.meta(local), attr, getattr(ir.meta(node), attr))
    _annotate(ir, local, node, Placement.partial_sum(AXIS, degree))
    _annotate(ir, reduced, node, REPLICATED)
    if out is not reduced:
        _annotate(ir, out, node, REPLICATED)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _rewrite_embedding(ir: IR, node: fx.Node, degree: int) -> None:
    """embedding(ids, W) with W split along the vocabulary: this rank's rows, then the sum."""
    parts = embedding_parts(ir.gm, node)
    graph = ir.graph
    read = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == parts.weight]
    vocab = ir.gm.get_parameter(parts.weight).shape[0]
    padding = None if parts.padding_idx is None else parts.padding_idx % vocab
    with graph.inserting_before(node):
        weight = read[0] if read else graph.get_attr(parts.weight)  # call_module Embedding reads it itself
        start = graph.call_function(vocab_parallel.vocab_start, (AXIS, degree, vocab // degree))
        local = graph.call_function(vocab_parallel.vocab_embedding, (parts.ids, weight, start, padding))
        reduced = graph.call_function(collectives.tp_reduce, (local, AXIS, degree))
    _annotate(ir, start, node, None, tensor=False)
    _annotate_param(ir, weight, node, parts.weight, Placement.shard(0, AXIS, degree))
    ir.meta(weight).param_bytes = ir.meta(node).param_bytes
    for attr in ("flops", "bwd_flops", "saved_bytes"):
        setattr(ir.meta(local), attr, getattr(ir.meta(node), attr))
    _annotate(ir, local, node, Placement.partial_sum(AXIS, degree))
    _annotate(ir, reduced, node, REPLICATED)
    node.replace_all_uses_with(reduced)
    graph.erase_node(node)


def _rewrite_loss(ir: IR, node: fx.Node, degree: int) -> None:
    """cross_entropy(logits split along the classes, targets) without gathering the logits."""
    parts = loss_parts(ir.gm, node)
    with ir.graph.inserting_before(node):
        loss = ir.graph.call_function(vocab_parallel.vocab_parallel_cross_entropy,
                                      (parts.logits, parts.target, AXIS, degree, parts.ignore_index, parts.reduction))
    meta = _annotate(ir, loss, node, REPLICATED)
    for attr in ("flops", "bwd_flops", "saved_bytes"):
        setattr(meta, attr, getattr(ir.meta(node), attr))
    node.replace_all_uses_with(loss)
    ir.graph.erase_node(node)


def _divide(graph: fx.Graph, node: fx.Node, value, degree: int):
    if isinstance(value, int):
        return value if value == -1 else value // degree
    with graph.inserting_before(node):
        return graph.call_function(operator.floordiv, (value, degree))


def _rewrite_view(ir: IR, node: fx.Node, out_dim: int, degree: int) -> None:
    """view / reshape / expand (x, sizes) or (x, *sizes): divide the size of the split dim."""
    if kind_of(ir.gm, node) == "unflatten":  # unflatten(x, dim, sizes)
        along = node.args[1] % len(ir.meta(node.args[0]).shape)
        sizes = list(node.args[2])
        sizes[out_dim - along] = _divide(ir.graph, node, sizes[out_dim - along], degree)
        node.args = (node.args[0], node.args[1], sizes) + tuple(node.args[3:])
        return
    head = 1
    sizes = node.args[head:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    sizes = list(sizes[0]) if packed else list(sizes)
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node):
        raise PcompileError(f"view {node.name} takes its shape from one value; pcompile cannot divide it for tp",
                            "write view(a, b, c) with separate sizes")
    sizes[out_dim] = _divide(ir.graph, node, sizes[out_dim], degree)
    for new in sizes:
        if isinstance(new, fx.Node) and not ir.has_meta(new):
            _annotate(ir, new, node, None, tensor=False)
    rest = tuple(sizes) if not packed else (tuple(sizes),)
    node.args = tuple(node.args[:head]) + rest


def _rewrite_split(ir: IR, node: fx.Node, degree: int) -> None:
    """split(x, size | [sizes], ..) of a fused projection's blocks: each block's local size
    (chunk(x, n) keeps its count)."""
    if kind_of(ir.gm, node) in ("chunk", "unflatten"):  # a count of blocks / sizes divided as a view's
        return
    sizes = node.args[1]
    local = (type(sizes)(_divide(ir.graph, node, s, degree) for s in sizes) if isinstance(sizes, (list, tuple))
             else _divide(ir.graph, node, sizes, degree))
    for new in local if isinstance(local, (list, tuple)) else (local,):
        if isinstance(new, fx.Node) and not ir.has_meta(new):
            _annotate(ir, new, node, None, tensor=False)
    node.args = (node.args[0], local) + tuple(node.args[2:])


def _rewrite_packed(ir: IR, splits: set[fx.Node], degree: int) -> None:
    """The splits into pieces of a packed weight (and bias) column Linears read: this rank's
    rows of each piece (every size divided), each piece placed as split."""
    for split in splits:
        sizes = split.args[1]
        split.args = (split.args[0], [s // degree for s in sizes] if isinstance(sizes, (list, tuple))
                      else sizes if kind_of(ir.gm, split) == "chunk" else sizes // degree) + tuple(split.args[2:])
        ir.meta(split).placement = Placement.shard(0, AXIS, degree)
        for piece in split.users:
            ir.meta(piece).placement = Placement.shard(0, AXIS, degree)


def _rewrite_size(ir: IR, node: fx.Node, dim: int, degree: int) -> None:
    source = node.args[0]
    index = tuple(node.args[1:]) if node.op == "call_method" or node.target is torch.ops.aten.sym_size.int else ()
    with ir.graph.inserting_before(node):
        full = ir.graph.call_function(collectives.global_size, (source, dim, degree) + index)
    _annotate(ir, full, node, None, tensor=False).value = ir.meta(node).value
    node.replace_all_uses_with(full)
    ir.graph.erase_node(node)


def _rewrite_scatter(ir: IR, p: Propagation, user: fx.Node, source: fx.Node, dim: int, degree: int) -> None:
    with ir.graph.inserting_before(user):
        local = ir.graph.call_function(collectives.tp_scatter, (source, dim, AXIS, degree))
    _annotate(ir, local, source, Placement.shard(dim, AXIS, degree))
    p.split_dim[local], p.degree[local] = dim, degree
    user.replace_input_with(source, local)


def _rewrite_broadcast(ir: IR, user: fx.Node, source: fx.Node, degree: int) -> None:
    """A replicated value broadcast along a split dim: each rank's gradient of it sums over its
    part of that dim only; tp_copy all-reduces it in backward (identity forward)."""
    with ir.graph.inserting_before(user):
        copy = ir.graph.call_function(collectives.tp_copy, (source, AXIS, degree))
    _annotate(ir, copy, source, REPLICATED)
    user.replace_input_with(source, copy)


def _one_degree_per_parameter(ir: IR, degrees: dict[str, int], split: dict) -> None:
    """A parameter tp splits has one sharding, which every layer reading it must use: refuse
    layers at different tp degrees reading one (a module applied N times - ALBERT's shared
    layer - reads its parameters in N layers; a tied table in two) before anything is split."""
    for name, layers in param_layers(ir).items():
        found = {layer: degrees.get(layer, 1) for layer in sorted(layers, key=ir.layers.index)}
        if name in split and len(set(found.values())) > 1:
            raise PcompileError(f"parameter {name} is split by tp and read by layers at different tp degrees "
                                f"({', '.join(f'{layer}: tp={d}' for layer, d in found.items())})",
                                f"give the layers that read it ({', '.join(found)}) one tp degree")


@register_pass("tensor_parallel", kind="rewrite", requires=("plan", "loss_normalised"),
               ensures=("tensor_parallel", PLACEMENTS))
def tensor_parallel(ir: IR, ctx: PassContext) -> IR:
    """Split column/row-parallel Linear pairs over the tp axis with explicit tp_copy/tp_reduce nodes."""
    degrees = layer_degrees(ir, ctx)
    if all(d == 1 for d in degrees.values()):
        return ir
    p, reasons = plan_tensor_parallel(ir, degrees)
    for layer in ir.block_layers or ir.layers:
        # a layer without any Linear (the inputs' "pre", a norm) runs whole on every tp rank
        if degrees.get(layer, 1) > 1 and layer in reasons and reasons[layer] != NO_LINEAR:
            packed = "of the packed" in reasons[layer]  # tp_rules._packed_pieces
            raise PcompileError(
                f"tp={degrees[layer]} cannot split layer {layer!r}: {reasons[layer]}",
                "give this layer tp=1, or read a packed weight's pieces only through Linears (or let pcompile "
                "search the plan)" if packed else
                "choose a tp degree that divides the number of attention heads and the hidden sizes "
                "(or let pcompile search the plan)")
    shardings = dict(ir.param_shardings)
    fused = p.fused
    for node in p.column:
        parts = linear_parts(ir.gm, node)
        # q, k, v side by side: each block chunked (tp_fused); a piece of a packed weight: the
        # packed parameter's blocks (MultiheadAttention's in_proj read as q and kv: 3)
        blocks = parts.packed[1] if parts.packed else fused.get(node, 1)
        shardings[parts.weight] = Shard(AXIS, parts.out_dim, p.degree[node], blocks)
        if parts.bias:
            shardings[parts.bias] = Shard(AXIS, 0, p.degree[node], blocks)
    for node in p.row:
        parts = linear_parts(ir.gm, node)
        shardings[parts.weight] = Shard(AXIS, 1 - parts.out_dim, p.degree[parts.input])
    for node, degree in p.embeddings.items():
        shardings[embedding_parts(ir.gm, node).weight] = Shard(AXIS, 0, degree)
    _one_degree_per_parameter(ir, degrees, under_every_name(ir.gm, shardings))
    ir = ir.replace(param_shardings=under_every_name(ir.gm, shardings))
    for node, dim in p.split_dim.items():
        ir.meta(node).placement = Placement.shard(dim, AXIS, p.degree[node])
    # Record the inputs' degrees before nodes are replaced.
    row_degree = {node: p.degree[linear_parts(ir.gm, node).input] for node in p.row}
    _insert_copies(ir, p)
    # (the pieces are found from the splits' sizes: all before any is divided)
    packed = {split: p.degree[node] for node in p.column for split in linear_parts(ir.gm, node).splits}
    for split, degree in packed.items():
        _rewrite_packed(ir, {split}, degree)
    for node, out_dim in p.view_dims.items():
        _rewrite_view(ir, node, out_dim, p.degree[node])
    for node, dim in p.size_nodes.items():
        _rewrite_size(ir, node, dim, p.degree[node.args[0]])
    for node in p.split_sizes:
        _rewrite_split(ir, node, p.degree[node])
    for user, source, dim in dict.fromkeys(p.scatters):
        _rewrite_scatter(ir, p, user, source, dim, p.degree[user])
    for user, source in dict.fromkeys(p.broadcasts):
        _rewrite_broadcast(ir, user, source, p.degree[user])
    for node, degree in row_degree.items():
        _rewrite_row(ir, node, degree)
    for node, degree in p.embeddings.items():
        _rewrite_embedding(ir, node, degree)
    for node, degree in p.losses.items():
        _rewrite_loss(ir, node, degree)
    ir.graph.lint()
    ir.gm.recompile()
    ctx.report.append(f"tensor parallel: {len(p.column)} column-parallel and {len(row_degree)} row-parallel Linears, "
                      f"{len(p.embeddings)} vocab-parallel embeddings, {len(p.losses)} vocab-parallel cross-entropies")
    ctx.report.extend(f"vocab parallel: {note}" for note in p.notes)
    if p.partly:  # exact either way; what tp does not split runs whole on every tp rank
        layer, why = next(iter(p.partly.items()))
        more = f" (and {len(p.partly) - 1} more layers)" if len(p.partly) > 1 else ""
        ctx.report.append(f"tensor parallel: layer {layer}{more} split in part, the rest kept whole: {why}")
    return ir
