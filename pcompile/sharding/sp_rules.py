"""Sequence parallelism's rules (pure helpers on the IR, no graph changes): which ops compute
each token alone (`tokenwise`: they can run on a sequence chunk), a layer's sequence length
from what tensor parallelism reduces, and why sp cannot run a layer at a tp degree - asked by
the search before the rewrite (`planned_shapes` from a tp propagation, `sp_refusals`) and by the
sequence_parallel rewrite itself."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompile.ir import IR
from pcompile.sharding.tp_ops import kind_of, linear_parts
from pcompile.sharding.tp_rules import plan_tensor_parallel

aten = torch.ops.aten
SEQ_DIM = 1  # activations are [batch, seq, ...]
NORM_FUNCTIONS = {F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm, aten.layer_norm.default,
                  aten.rms_norm.default}  # (input, normalized_shape, ...)
REDUCTIONS = {torch.mean, torch.sum, aten.mean.dim, aten.sum.dim_IntList}


def shape_of(ir: IR, node) -> tuple | None:
    return ir.meta(node).shape if isinstance(node, fx.Node) and ir.has_meta(node) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _over_trailing_dims(dims, ndim: int) -> bool:
    """A reduction / normalisation over dims >= 2 only: it never mixes tokens."""
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return bool(dims) and all(isinstance(d, int) and d % ndim > SEQ_DIM for d in dims)


def tokenwise(ir: IR, node: fx.Node) -> bool:
    """Whether `node` computes each token from that token alone (so it can run on a chunk)."""
    shape = shape_of(ir, node)
    if shape is None or len(shape) <= SEQ_DIM + 1:
        return False
    if node.op == "call_module":
        module = ir.gm.get_submodule(node.target)
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or kind_of(ir.gm, node) == "unary"
    if kind_of(ir.gm, node) in ("unary", "binary"):
        return True
    if node.op == "call_function" and node.target in NORM_FUNCTIONS:
        return len(_arg(node, 1, "normalized_shape")) <= len(shape) - SEQ_DIM - 1
    if (node.op == "call_function" and node.target in REDUCTIONS) or (node.op == "call_method"
                                                                         and node.target in ("mean", "sum")):
        return _arg(node, 2, "keepdim", False) is True and _over_trailing_dims(_arg(node, 1, "dim"), len(shape))
    return False


def sequence_length(reduce_shapes: list, copy_shapes: list) -> int | None:
    """A layer's sequence length from the shapes tensor parallelism all-reduces (row Linears'
    outputs) and copies (column Linears' inputs): dim 1 of [batch, seq, ...]. None: the layer
    has no tp collective; 0: they have no sequence dim. The reduces decide, as the copies of a
    cross-attention also read the other sequence (the encoder's)."""
    shapes = reduce_shapes or copy_shapes
    if not shapes:
        return None
    lengths = [s[SEQ_DIM] for s in shapes if s is not None and len(s) > SEQ_DIM + 1]
    return lengths[-1] if lengths else 0


def sp_problem(reduce_shapes: list, copy_shapes: list, layer: str, tp: int) -> str | None:
    """Why sequence parallelism cannot run `layer` at tp degree `tp` (None: it can). The search
    can ask before the rewrite, with the shapes its sharding propagation found (row Linears'
    outputs, column Linears' inputs)."""
    length = sequence_length(reduce_shapes, copy_shapes)
    if length == 0:
        shape = (reduce_shapes or copy_shapes)[-1]
        return (f"layer {layer!r} has no sequence dim (tensor parallelism reduces {list(shape)}; sequence "
                "parallelism splits [batch, seq, hidden] activations along seq)")
    if length and length % tp:
        return f"layer {layer!r} has a sequence of {length} tokens, which tp={tp} does not divide"
    return None


def planned_shapes(ir: IR, p, layer: str, order: dict | None = None) -> tuple[list, list]:
    """`collective_shapes` before the rewrite, from a sharding propagation `p`
    (tp_rules.plan_tensor_parallel): row Linears' outputs, column Linears' inputs. For the
    search: sp_problem(*planned_shapes(ir, p, layer), layer, tp). `order`: node -> its index in
    the graph (built here when not given: a caller asking for every layer builds it once)."""
    if order is None:
        order = {n: i for i, n in enumerate(ir.graph.nodes)}
    rows = sorted((n for n in p.row if ir.meta(n).layer == layer), key=order.__getitem__)
    columns = sorted((n for n in p.column if ir.meta(n).layer == layer), key=order.__getitem__)
    return [shape_of(ir, n) for n in rows], [shape_of(ir, linear_parts(ir.gm, n).input) for n in columns]


def sp_refusals(ir: IR, tp: int, p=None) -> dict[str, str]:
    """Per layer, why the sequence_parallel rewrite would refuse sp at this tp (from the shapes
    tp_rules' propagation `p` gives its collectives: [b, h] MLPs, GPT-2's flattened Conv1D
    tokens, a sequence tp does not divide). A layer without tp collectives is refused too: the
    rewrite borrows the other sp layers' sequence length for it, which the per-layer DP cannot
    promise (and sp there only shards a few token-wise ops)."""
    if tp == 1:
        return {}
    if p is None:
        p, _ = plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
    out = {}
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    for layer in ir.layers:
        shapes = planned_shapes(ir, p, layer, order)
        if sequence_length(*shapes) is None:
            out[layer] = f"layer {layer!r} has no tensor-parallel collective for sp to replace"
        elif problem := sp_problem(*shapes, layer, tp):
            out[layer] = problem
    return out
