"""Analysis: group nodes into layers — the repeated blocks (e.g. blocks.0 ... blocks.N-1, or the
calls block, block@1, ... of one module applied N times) plus "pre" (embedding and whatever runs
before the first block) and "post" (head, loss).

A model without repeated blocks gets one layer per top-level child, looking through
single-child wrappers (the search still has units to assign). How blocks are found in the
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


@register_pass("layers", kind="analysis", requires=("annotated",), ensures=("layers",))
def layers(ir: IR, ctx: PassContext) -> IR:
    """Layer of every node: pre, the repeated blocks in order, post."""
    blocks, repeated = block_names(ctx.model)
    nodes = list(ir.graph.nodes)
    if not repeated and (shared := shared_blocks(ctx.model, nodes)):
        blocks, repeated = shared, True
    for node, layer in zip(nodes, assign_blocks(nodes, blocks)):
        ir.meta(node).layer = layer
    order: dict[str, int] = {}  # layers are contiguous: in graph order
    for node in nodes:
        order.setdefault(ir.meta(node).layer, len(order))
    ordered = [layer for layer in order if layer not in (PRE, POST)]
    return ir.replace(layers=[PRE] * (PRE in order) + ordered + [POST] * (POST in order),
                      block_layers=ordered if repeated else [])
