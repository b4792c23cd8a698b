"""Analysis: output shape, dtype and bytes of every node, on fake tensors (no real memory)."""
from __future__ import annotations

import torch
import torch.fx as fx

from pcompile.ir import IR
from pcompile.ir.fake import fake_run
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.ir.replicate import annotate


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (possibly nested) node result."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def record(ir: IR, node: fx.Node, value) -> None:
    meta = ir.meta(node)
    tensor = _first_tensor(value)
    if tensor is not None:
        meta.shape = tuple(int(s) for s in tensor.shape)
        meta.dtype = str(tensor.dtype)
    elif isinstance(value, (int, float, bool, torch.Size)) or (
            isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
        meta.value = tuple(value) if isinstance(value, torch.Size) else value
    meta.output_bytes = tensor_bytes(value)


@register_pass("shapes", kind="analysis", requires=("captured",), ensures=("annotated",))
def shapes(ir: IR, ctx: PassContext) -> IR:
    """Shape propagation under FakeTensorMode: shape, dtype and output bytes per node."""
    def run(target: IR) -> None:
        fake_run(target, ctx.example_inputs, lambda node, value: record(target, node, value), grad=False)
    return annotate(ir, run)  # repeated blocks: once
