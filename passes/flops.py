"""Analysis: forward and backward FLOPs per node, counted by FlopCounterMode on fake tensors.

FlopCounterMode has no formula for CPU scaled_dot_product_attention kernels (it counts 0),
so attention is counted by its own formula: two batched matmuls of B*H*L*S*E each.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pcompile.ir import IR
from pcompile.ir.fake import fake_run
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.ir.replicate import annotate

# Backward of a matmul-like op is two matmuls (input grad + weight grad) of the forward's size.
BACKWARD_FACTOR = 2


def sdpa_flops(q_shape, k_shape) -> int:
    *batch, length, dim = q_shape
    source = k_shape[-2]
    count = 1
    for b in batch:
        count *= b
    return 2 * 2 * count * length * source * dim


@register_pass("flops", kind="analysis", requires=("annotated",), ensures=("flops",))
def flops(ir: IR, ctx: PassContext) -> IR:
    """FLOPs per node (forward exact from FlopCounterMode; backward = 2x forward)."""
    return annotate(ir, lambda target: count_flops(target, ctx.example_inputs))  # repeated blocks: once


def count_flops(ir: IR, inputs: tuple) -> None:
    counted: dict[fx.Node, int] = {}

    @contextmanager
    def count(node: fx.Node):
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        counted[node] = counter.get_total_flops()

    fake_run(ir, inputs, lambda node, value: None, hook=count, grad=False)
    for node in ir.graph.nodes:
        meta = ir.meta(node)
        meta.flops = counted.get(node, 0)
        if node.op == "call_function" and node.target in (F.scaled_dot_product_attention,
                                                          torch.ops.aten.scaled_dot_product_attention.default):
            q, k = node.args[0], node.args[1]
            meta.flops = sdpa_flops(ir.meta(q).shape, ir.meta(k).shape)
        meta.bwd_flops = BACKWARD_FACTOR * meta.flops
