"""Analysis: group nodes into layers — the repeated blocks (e.g. blocks.0 ... blocks.N-1) plus
"pre" (embedding and whatever runs before the first block) and "post" (head, loss).

A model without repeated blocks gets one layer per top-level child, looking through
single-child wrappers (the search still has units to assign). How blocks are found in the
module tree and nodes matched to them (module paths, `nn_module_stack`; a parameter read
belongs to the layer of its first user; layers are contiguous in graph order) is
pcompile.ir.blocks, shared with the capture of repeated blocks (pcompile.ir.replicate).
"""
from __future__ import annotations

from pcompile.ir import IR
from pcompile.ir.blocks import assign_blocks, block_names, find_block_prefix, find_block_prefixes  # noqa: F401
from pcompile.ir.pass_manager import PassContext, register_pass


@register_pass("layers", kind="analysis", requires=("annotated",), ensures=("layers",))
def layers(ir: IR, ctx: PassContext) -> IR:
    """Layer of every node: pre, the repeated blocks in order, post."""
    blocks, repeated = block_names(ctx.model)
    nodes = list(ir.graph.nodes)
    for node, layer in zip(nodes, assign_blocks(nodes, blocks)):
        ir.meta(node).layer = layer
    order: dict[str, int] = {}
    for node in nodes:
        order.setdefault(ir.meta(node).layer, len(order))
    ordered = [b for b in sorted(blocks, key=lambda b: order.get(b, len(order))) if b in order]
    return ir.replace(layers=["pre"] * ("pre" in order) + ordered + ["post"] * ("post" in order),
                      block_layers=ordered if repeated else [])
