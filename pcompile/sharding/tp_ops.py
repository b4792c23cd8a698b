"""Which op a graph node is, for tensor-parallel sharding propagation (pure lookups), and how
a view moves a split dim (view_groups / view_split_dim).

Both IRs are classified into the same kinds: fx captures (call_module Linear, F.linear, tensor
methods) and torch.export captures (aten.linear, aten.addmm of GPT-2's Conv1D with its
[in, out] weight, aten.view / expand / unsqueeze / slice / cat / split, aten SDPA, ...).
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten
UNARY_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, F.tanh, F.sigmoid, torch.tanh, torch.sigmoid, torch.exp,
                   torch.relu, operator.neg, torch.neg, F.leaky_relu, F.elu, F.mish,
                   aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
                   aten.exp.default, aten.neg.default, aten.dropout.default, aten.contiguous.default,
                   aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout,
                   aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.detach.default}
UNARY_METHODS = {"relu", "gelu", "tanh", "sigmoid", "exp", "contiguous", "float", "half", "bfloat16", "to",
                 "type_as", "clone", "neg", "detach"}
UNARY_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU, nn.Mish)
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div, torch.where, torch.masked_fill, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor,
                    aten.div.Tensor, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor}
BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "where"}
VIEW_METHODS = {"view", "reshape"}
SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, aten.softmax.int, aten._softmax.default,
           aten.log_softmax.int, aten._log_softmax.default}
LINEARS = {F.linear, torch._C._nn.linear, aten.linear.default}  # weight [out, in]
ADDMMS = {torch.addmm, aten.addmm.default}  # addmm(bias, x, weight): weight [in, out] (GPT-2's Conv1D)
EMBEDDINGS = {F.embedding, aten.embedding.default}
CROSS_ENTROPY = {F.cross_entropy, aten.cross_entropy_loss.default}
REDUCTIONS = ("none", "mean", "sum")  # aten.cross_entropy_loss numbers them 0, 1, 2
FUNCTION_KINDS = {
    torch.reshape: "view", aten.view.default: "view", aten.reshape.default: "view", aten._unsafe_view.default: "view",
    aten.expand.default: "expand", torch.transpose: "transpose", aten.transpose.int: "transpose",
    torch.permute: "permute", aten.permute.default: "permute", torch.flatten: "flatten",
    aten.flatten.using_ints: "flatten", F.scaled_dot_product_attention: "sdpa",
    aten.scaled_dot_product_attention.default: "sdpa", torch.matmul: "matmul", operator.matmul: "matmul",
    torch.bmm: "matmul", aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.sym_size.int: "size",
    aten.unsqueeze.default: "unsqueeze", aten.slice.Tensor: "slice", aten.select.int: "select",
    aten.cat.default: "cat", torch.cat: "cat", aten.split.Tensor: "split", aten.split_with_sizes.default: "split",
    torch.split: "split", torch.chunk: "chunk", aten.chunk.default: "chunk",
    operator.getitem: "getitem", aten.unflatten.int: "unflatten", torch.unflatten: "unflatten",
    aten.squeeze.dim: "squeeze", aten.squeeze.dims: "squeeze", aten.squeeze.default: "squeeze",
    torch.squeeze: "squeeze",
}


@dataclass(frozen=True)
class LinearParts:
    input: fx.Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    out_dim: int = 0  # the weight's output-feature dim: 0 for Linear's [out, in], 1 for addmm's [in, out]
    # A piece of a packed weight (nn.MultiheadAttention's in_proj [3E, E] split [E, 2E] for
    # cross-attention's q and kv): `weight` / `bias` name the packed parameters, out_features is
    # the piece's rows, `packed` = (the piece's equal blocks, the packed parameter's), `splits`
    # the graph's split of the weight (and bias). None for a Linear reading a whole parameter.
    packed: tuple[int, int] | None = None
    splits: tuple = ()


def _param_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


PARAM_SPLITS = {aten.split_with_sizes.default: "sizes", aten.split.Tensor: "size", aten.chunk.default: "count"}


def _piece(gm: fx.GraphModule, node) -> tuple[fx.Node, str, list[int], int] | None:
    """(split node, parameter, sizes, index) when `node` is piece `index` of a parameter split
    along dim 0 into `sizes` (getitem of aten split_with_sizes / split / chunk of a get_attr)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    if not (isinstance(split, fx.Node) and split.op == "call_function" and split.target in PARAM_SPLITS
            and _param_attr(split.args[0]) and isinstance(index, int)):
        return None
    if _arg(split, 2, "dim", 0) != 0:
        return None
    rows = gm.get_parameter(split.args[0].target).shape[0]
    arg, how = split.args[1], PARAM_SPLITS[split.target]
    if how == "sizes" and all(isinstance(s, int) for s in arg):
        sizes = list(arg)
    elif how == "size" and isinstance(arg, int) and arg > 0:
        sizes = [min(arg, rows - start) for start in range(0, rows, arg)]
    elif how == "count" and isinstance(arg, int) and rows % arg == 0:
        sizes = [rows // arg] * arg
    else:
        return None
    return (split, split.args[0].target, sizes, index) if sum(sizes) == rows else None


def _packed_parts(gm: fx.GraphModule, node: fx.Node, weight, bias) -> LinearParts | None:
    """linear(x, W.split(sizes)[i], b.split(sizes)[i]): the packed weight's equal blocks are the
    sizes' greatest common divisor (MultiheadAttention's [E, 2E]: 3 blocks, q one, kv two)."""
    w = _piece(gm, weight)
    b = None if bias is None else _piece(gm, bias)
    if w is None or (bias is not None and (b is None or b[2:] != w[2:])):
        return None
    split, name, sizes, index = w
    unit = math.gcd(*sizes)
    in_f = gm.get_parameter(name).shape[1]
    return LinearParts(node.args[0], name, None if b is None else b[1], in_f, sizes[index], 0,
                       (sizes[index] // unit, sum(sizes) // unit), (split,) + (() if b is None else (b[0],)))


def linear_parts(gm: fx.GraphModule, node: fx.Node) -> LinearParts | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear) and node.args:
        m = gm.get_submodule(node.target)
        return LinearParts(node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                           m.in_features, m.out_features)
    if node.op != "call_function":
        return None
    if node.target in LINEARS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if _param_attr(weight) and (bias is None or _param_attr(bias)):
            out_f, in_f = gm.get_parameter(weight.target).shape
            return LinearParts(node.args[0], weight.target, bias.target if bias is not None else None, in_f, out_f)
        return _packed_parts(gm, node, weight, bias)
    if node.target in ADDMMS and len(node.args) == 3 and not node.kwargs:
        bias, source, weight = node.args
        if _param_attr(weight) and _param_attr(bias) and gm.get_parameter(weight.target).dim() == 2:
            in_f, out_f = gm.get_parameter(weight.target).shape
            return LinearParts(source, weight.target, bias.target, in_f, out_f, out_dim=1)
    return None


@dataclass(frozen=True)
class EmbeddingParts:
    ids: fx.Node
    weight: str  # the parameter's name as the graph reads it
    padding_idx: int | None
    unsupported: str = ""  # why it cannot be split along the vocabulary ("" when it can)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def embedding_parts(gm: fx.GraphModule, node: fx.Node) -> EmbeddingParts | None:
    """nn.Embedding, F.embedding(ids, W, padding_idx, max_norm, ...) or aten.embedding(W, ids,
    padding_idx=-1, scale_grad_by_freq, sparse) reading a parameter table."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Embedding) and node.args:
        m = gm.get_submodule(node.target)
        ids, weight, padding, options = node.args[0], f"{node.target}.weight", m.padding_idx, \
            (m.max_norm is not None, m.scale_grad_by_freq, m.sparse)
    elif node.op == "call_function" and node.target is F.embedding:
        ids, weight, padding = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "padding_idx")
        options = (_arg(node, 3, "max_norm") is not None, _arg(node, 5, "scale_grad_by_freq", False),
                   _arg(node, 6, "sparse", False))
    elif node.op == "call_function" and node.target is aten.embedding.default:
        weight, ids, padding = node.args[0], node.args[1], _arg(node, 2, "padding_idx", -1)
        padding = None if padding == -1 else padding
        options = (False, _arg(node, 3, "scale_grad_by_freq", False), _arg(node, 4, "sparse", False))
    else:
        return None
    if isinstance(weight, fx.Node):
        if not _param_attr(weight):
            return None
        weight = weight.target
    why = "" if not any(options) else "max_norm, scale_grad_by_freq or sparse (they need the whole table)"
    return EmbeddingParts(ids, weight, padding, why)


@dataclass(frozen=True)
class LossParts:
    logits: fx.Node
    target: fx.Node
    ignore_index: int
    reduction: str
    unsupported: str = ""  # why the parallel cross-entropy cannot compute it ("" when it can)


def loss_parts(gm: fx.GraphModule, node: fx.Node) -> LossParts | None:
    """F.cross_entropy / nn.CrossEntropyLoss / aten.cross_entropy_loss with its options."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.CrossEntropyLoss):
        m = gm.get_submodule(node.target)
        logits, target = node.args[0], _arg(node, 1, "target")
        weight, ignore, reduction, smoothing = m.weight, m.ignore_index, m.reduction, m.label_smoothing
    elif node.op == "call_function" and node.target is F.cross_entropy:
        logits, target, weight = node.args[0], _arg(node, 1, "target"), _arg(node, 2, "weight")
        ignore, smoothing = _arg(node, 4, "ignore_index", -100), _arg(node, 7, "label_smoothing", 0.0)
        reduction = _arg(node, 6, "reduction", "mean")
        if _arg(node, 3, "size_average") is not None or _arg(node, 5, "reduce") is not None:
            reduction = None
    elif node.op == "call_function" and node.target is aten.cross_entropy_loss.default:
        logits, target, weight = node.args[0], node.args[1], _arg(node, 2, "weight")
        reduction = REDUCTIONS[_arg(node, 3, "reduction", 1)]
        ignore, smoothing = _arg(node, 4, "ignore_index", -100), _arg(node, 5, "label_smoothing", 0.0)
    else:
        return None
    why = ""
    if weight is not None or smoothing or reduction not in REDUCTIONS or not isinstance(ignore, int):
        why = "cross-entropy with class weights, label smoothing or the legacy size_average/reduce"
    return LossParts(logits, target, ignore, reduction, why)


class OpKinds:
    """kind_of and linear_parts of one graph, each node's answer computed once: a tp
    propagation asks them of every node once per degree and once per resumed pass (9 times on
    GPT-3's 5,000 nodes: a third of its search). Valid while the graph is not rewritten."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self._kinds, self._linears = gm, {}, {}

    def kind(self, node: fx.Node) -> str:
        if node not in self._kinds:
            self._kinds[node] = kind_of(self.gm, node)
        return self._kinds[node]

    def linear(self, node: fx.Node) -> LinearParts | None:
        if node not in self._linears:
            self._linears[node] = linear_parts(self.gm, node)
        return self._linears[node]


def kind_of(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if isinstance(module, nn.CrossEntropyLoss):
            return "cross_entropy"
        return "unary" if isinstance(module, UNARY_MODULES) else "other"
    if node.op == "call_function":
        t = node.target
        if t in LINEARS or t in ADDMMS:
            return "linear" if linear_parts(gm, node) is not None else "other"
        if t in UNARY_FUNCTIONS:
            return "unary"
        if t in BINARY_FUNCTIONS:
            return "binary"
        if t in SOFTMAX:
            return "softmax"
        if t in EMBEDDINGS:
            return "embedding" if embedding_parts(gm, node) is not None else "other"
        if t in CROSS_ENTROPY:
            return "cross_entropy"
        if t is builtins.getattr and node.args[1] == "shape":
            return "size"
        return FUNCTION_KINDS.get(t, "other")
    if node.op == "call_method":
        m = node.target
        if m in UNARY_METHODS:
            return "unary"
        if m in BINARY_METHODS:
            return "binary"
        if m in VIEW_METHODS:
            return "view"
        if m in ("transpose", "permute", "flatten", "softmax", "log_softmax", "size"):
            return {"log_softmax": "softmax"}.get(m, m)
        if m in ("matmul", "bmm"):
            return "matmul"
        if m in ("split", "chunk", "unflatten", "squeeze"):
            return m
        return "other"
    return "source"


def view_groups(in_shape, out_shape):
    """Pairs (input dims, output dims) whose sizes multiply to the same value, in order."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [i] if i < len(in_shape) else [], [j] if j < len(out_shape) else []
        pi = in_shape[i] if i < len(in_shape) else 1
        pj = out_shape[j] if j < len(out_shape) else 1
        i, j = i + bool(gi), j + bool(gj)
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif j < len(out_shape):
                pj *= out_shape[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def view_split_dim(in_shape, out_shape, dim: int, degree: int) -> tuple[int | None, str]:
    """Output dim carrying the split of input `dim` through a view, or (None, why not)."""
    groups = view_groups(list(in_shape), list(out_shape))
    if groups is None:
        return None, "view with sizes that do not line up"
    for gi, gj in groups:
        if dim in gi:
            first_in = next((d for d in gi if in_shape[d] != 1), None)
            first_out = next((d for d in gj if out_shape[d] != 1), None)
            if first_in != dim or first_out is None:
                return None, f"view/reshape moves split dim {dim} of {list(in_shape)} inside {list(out_shape)}"
            if out_shape[first_out] % degree:
                return None, (f"view/reshape to {list(out_shape)}: dim {first_out} of size {out_shape[first_out]} "
                              f"(e.g. the number of heads) is not divisible by tp={degree}")
            return first_out, ""
    return None, "view without the split dim"
