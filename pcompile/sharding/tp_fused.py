"""Fused projections under tensor parallelism (pure helpers): a column Linear whose output is
cut into equal blocks along its features (GPT-2's c_attn: [.., 3·H] -> q, k, v by split or
chunk) is split block-wise: rank r keeps the r-th chunk of every block of the weight
(Shard.blocks), so its local output is [q_r, k_r, v_r] and the split, with its sizes
divided by tp, hands each rank its heads of q, k and v.

That is only right if nothing else reads the fused output in between, since its local layout
is no longer one contiguous chunk: the path from the Linear to the split must be ops that keep
the split dim's size (elementwise ops, views and transposes that do not touch it), each with
the next as its only user.
"""
from __future__ import annotations

import torch.fx as fx

from pcompile.ir import IR
from pcompile.sharding.tp_ops import kind_of

_LAYOUT_KEEPING = ("unary", "view", "transpose", "permute", "unsqueeze")


def _value(ir: IR, arg):
    """A size as an int: fx records sizes read from shapes as nodes, with their traced value."""
    return ir.meta(arg).value if isinstance(arg, fx.Node) else arg


def equal_blocks(ir: IR, node: fx.Node, along: int) -> int | None:
    """How many equal blocks split/chunk `node` cuts along dim `along`; None when unequal or
    the sizes are not the plain second argument (split(x, size | [sizes], dim), chunk(x, n, dim))."""
    if len(node.args) < 2:
        return None
    full, arg = ir.meta(node.args[0]).shape[along], _value(ir, node.args[1])
    if kind_of(ir.gm, node) == "chunk":
        return arg if isinstance(arg, int) and full % arg == 0 else None
    if isinstance(arg, int):
        return full // arg if full % arg == 0 else None
    arg = [_value(ir, size) for size in arg] if isinstance(arg, (list, tuple)) else arg
    if isinstance(arg, list) and all(isinstance(s, int) for s in arg) and len(set(arg)) == 1:
        return len(arg)
    return None


def only_layout_from(ir: IR, split_dim: dict[fx.Node, int], source: fx.Node, origin: fx.Node) -> bool:
    """Whether `source` is `origin`'s output through layout-keeping ops only, each read once."""
    node = source
    while True:
        if len(node.users) != 1:
            return False
        if node is origin:
            return True
        previous = node.args[0] if node.args else None
        if (kind_of(ir.gm, node) not in _LAYOUT_KEEPING or previous not in split_dim
                or ir.meta(previous).shape[split_dim[previous]] != ir.meta(node).shape[split_dim[node]]):
            return False
        node = previous
