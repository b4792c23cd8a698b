"""Which dim of each value of the IR the batch is split along: found by running the graph
twice on fake tensors (on this rank's parameter shards), at the full batch and at 1/parts of
it - the dim that shrinks by `parts`. One source for the passes that must know (reshard
regroups the batch between layers; batch_statistics finds the reductions over the batch).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pcompile.ir import IR
from pcompile.ir.fake import fake_run
from pcompile.runtime import collectives

UNKNOWN = "unknown"  # depends on the batch in a way a split along one dim cannot express
SCALES = "scales"  # a number (not a tensor) proportional to the batch: a count of its samples or tokens


def values(ir: IR, inputs: tuple) -> dict[fx.Node, object]:
    """Every node's fake value (tensors as their shapes) on this rank's shards."""
    out: dict[fx.Node, object] = {}

    def record(node, value):
        out[node] = torch.Size(value.shape) if isinstance(value, torch.Tensor) else value
    with collectives.simulate():
        fake_run(ir, inputs, record, shard=ir.local_param_shape, grad=False)
    return out


def part_of(inputs: tuple, parts: int, index: int = 0) -> tuple:
    """Part `index` of `parts` of every batched input (the backend's split of the batch)."""
    return tuple(x.chunk(parts)[index] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def compare(full: dict[fx.Node, object], part: dict[fx.Node, object], parts: int) -> dict[fx.Node, object]:
    """node -> the dim its value is split along when the batch is (None: batch-independent,
    SCALES: a number `parts` times larger at the full batch, UNKNOWN: depends on the batch in
    another way), from its values at the full batch and at 1/parts of it."""
    dims: dict[fx.Node, object] = {}
    for node, value in full.items():
        small = part[node]
        if isinstance(value, torch.Size) and isinstance(small, torch.Size) and len(value) == len(small):
            changed = [d for d, (n, m) in enumerate(zip(value, small)) if n != m]
            dims[node] = (None if not changed else changed[0]
                          if len(changed) == 1 and value[changed[0]] == parts * small[changed[0]] else UNKNOWN)
        elif _same(value, small):
            dims[node] = None
        else:
            dims[node] = SCALES if _number(value) and _number(small) and value == parts * small else UNKNOWN
    return dims


def batch_dims(ir: IR, inputs: tuple, parts: int = 2) -> dict[fx.Node, object]:
    """node -> its batch dim (see compare), from two fake runs: `inputs` and 1/parts of them."""
    return compare(values(ir, inputs), values(ir, part_of(inputs, parts)), parts)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tuples of tensors or symbolic values: treat as batch-dependent
        return False
