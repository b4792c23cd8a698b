"""The invariant every rewrite keeps (registered with the pass manager, checked after each pass
that changed the graph from `tensor_parallel` on): run on fake tensors as one rank sees them -
parameters split as the IR says (tensor parallelism, then ZeRO-3), inputs as their placements
say, collectives simulated - every node's value has its global shape cut as its placement says.
One check for every rewrite: a tp shard, an sp sequence chunk, a ZeRO-3 gather's rebuilt
weight, a mixed plan's batch split per layer are all placements."""
from __future__ import annotations

import torch

from pcompile.ir import IR
from pcompile.ir.fake import fake_run
from pcompile.ir.pass_manager import PassContext, register_invariant
from pcompile.runtime import collectives

PLACEMENTS = "placements"  # the fact: node placements describe every rank's local values


def local_inputs(ir: IR, inputs: tuple) -> tuple:
    """One rank's inputs: each graph input cut by its placement (meta tensors: shapes only)."""
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    out = []
    for node, x in zip(placeholders, inputs):
        placement = ir.meta(node).placement if ir.has_meta(node) else None
        if isinstance(x, torch.Tensor) and placement is not None and placement.shards:
            x = torch.empty(placement.local_shape(x.shape), dtype=x.dtype, device="meta")
        out.append(x)
    return tuple(out) + tuple(inputs[len(placeholders):])


def check_local_shapes(ir: IR, ctx: PassContext) -> str | None:
    problems: list[str] = []

    def check(node, value) -> None:
        if problems or not isinstance(value, torch.Tensor) or node.op == "get_attr" or not ir.has_meta(node):
            return
        meta = ir.meta(node)
        if meta.shape is None:
            return
        expected = list(meta.shape if meta.placement is None else meta.placement.local_shape(meta.shape))
        if list(value.shape) != expected:
            problems.append(f"node {node.name} ({meta.placement or 'no placement'}) has local shape "
                            f"{list(value.shape)}, expected {expected} (global {list(meta.shape)})")

    with collectives.simulate():
        fake_run(ir, local_inputs(ir, ctx.example_inputs), check, shard=ir.local_param_shape, grad=False)
    return problems[0] if problems else None


register_invariant(PLACEMENTS, check_local_shapes, expensive=True)
