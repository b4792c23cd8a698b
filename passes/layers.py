"""Analysis: group nodes into layers — the repeated blocks (e.g. blocks.0 ... blocks.N-1, or the
calls block, block@1, ... of one module applied N times) plus "pre" (embedding and whatever runs
before the first block) and "post" (head, loss).

A model without repeated blocks gets one layer per top-level child, looking through
single-child wrappers (the search still has units to assign), children holding the two halves
of a Megatron pair joined into one ("up+down": tp splits only whole pairs). How blocks are found in the
module tree and nodes matched to them (module paths, `nn_module_stack`; a parameter read
belongs to the layer of its first user; layers are contiguous in graph order) is
pcompile.ir.blocks, shared with the capture of repeated blocks (pcompile.ir.replicate).
"""
from __future__ import annotations

from pcompile.ir import IR
from pcompile.ir.blocks import (  # noqa: F401
    POST,
    PRE,
    assign_blocks,
    block_names,
    find_block_prefix,
    find_block_prefixes,
    shared_blocks,
)
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.sharding.tp_rules import linear_parts, plan_tensor_parallel


@register_pass("layers", kind="analysis", requires=("annotated",), ensures=("layers",))
def layers(ir: IR, ctx: PassContext) -> IR:
    """Layer of every node: pre, the repeated blocks in order, post."""
    blocks, repeated = block_names(ctx.model)
    nodes = list(ir.graph.nodes)
    if not repeated and (shared := shared_blocks(ctx.model, nodes)):
        blocks, repeated = shared, True
    for node, layer in zip(nodes, assign_blocks(nodes, blocks)):
        ir.meta(node).layer = layer
    ir = _ordered(ir, nodes, repeated)
    if not repeated and len(ir.layers) > 1:
        ir = _join_megatron_pairs(ir, nodes)
    return ir


def _ordered(ir: IR, nodes, repeated: bool) -> IR:
    order: dict[str, int] = {}  # layers are contiguous: in graph order
    for node in nodes:
        order.setdefault(ir.meta(node).layer, len(order))
    ordered = [layer for layer in order if layer not in (PRE, POST)]
    return ir.replace(layers=[PRE] * (PRE in order) + ordered + [POST] * (POST in order),
                      block_layers=ordered if repeated else [])


def _join_megatron_pairs(ir: IR, nodes) -> IR:
    """Without repeated blocks, a unit per top-level child can split a Megatron pair: `up` (the
    column Linear) and `down` (the row Linear its split output reaches) in two layers, neither of
    which tp can split alone. Such layers, and any between them, join one unit named
    "up+down", so the search can offer tp to it (Alpa's two-Linear MLP). The pairs are the
    sharding propagation's at tp=2 with every layer split (pcompile.sharding.tp_rules); "pre" and
    "post" are never joined (the pipeline places them)."""
    units = [layer for layer in ir.layers if layer not in (PRE, POST)]
    p, _ = plan_tensor_parallel(ir, dict.fromkeys(ir.layers, 2))
    index = {layer: i for i, layer in enumerate(units)}
    spans = []
    for row in p.row:
        source = linear_parts(ir.gm, row).input
        for column in p.origins.get(source, ()):
            a, b = ir.meta(column).layer, ir.meta(row).layer
            if a != b and a in index and b in index:
                spans.append((min(index[a], index[b]), max(index[a], index[b])))
    if not spans:
        return ir
    joined = list(range(len(units)))  # unit i joins unit joined[i] (the first of its run)
    for a, b in sorted(spans):
        for i in range(a + 1, b + 1):
            joined[i] = joined[a]
    names = {}
    for i, layer in enumerate(units):
        names.setdefault(joined[i], []).append(layer)
    rename = {layer: "+".join(names[joined[i]]) for i, layer in enumerate(units)}
    for node in nodes:
        meta = ir.meta(node)
        meta.layer = rename.get(meta.layer, meta.layer)
    return _ordered(ir, nodes, repeated=False)
