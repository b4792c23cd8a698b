"""Sharding propagation for tensor parallelism (pure helpers, no graph changes).

Given the Linear nodes chosen as *column-parallel* (output features split over the tp group),
walk the graph in order and work out, for every tensor, whether it is replicated (None) or
split along one dim. A Linear fed a tensor split along its last dim is *row-parallel*: its
partial sums are all-reduced. Ops in between follow shape rules (elementwise, view/reshape,
transpose, softmax off the split dim, attention and batched matmul over a split head dim).

An op that cannot take a split input means the column Linears that produced it must stay
replicated: `plan_tensor_parallel` drops them and propagates again, until a fixed point. The
result is Megatron's pairing found from the graph rather than written per model.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompile.ir import IR

UNARY_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, F.tanh, F.sigmoid, torch.tanh, torch.sigmoid, torch.exp,
                   torch.relu, operator.neg, torch.neg, F.leaky_relu, F.elu, F.mish}
UNARY_METHODS = {"relu", "gelu", "tanh", "sigmoid", "exp", "contiguous", "float", "half", "bfloat16", "to",
                 "type_as", "clone", "neg", "detach"}
UNARY_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU, nn.Mish)
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div, torch.where, torch.masked_fill}
BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "where"}
VIEW_METHODS = {"view", "reshape"}
SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}


@dataclass
class Propagation:
    degree: dict[fx.Node, int]  # tp degree of every split tensor
    split_dim: dict[fx.Node, int]  # split tensors only; absent = replicated
    origins: dict[fx.Node, frozenset]  # column Linears a split tensor comes from
    column: set[fx.Node] = field(default_factory=set)
    row: set[fx.Node] = field(default_factory=set)
    view_dims: dict[fx.Node, int] = field(default_factory=dict)  # view node -> output dim whose size divides
    size_nodes: dict[fx.Node, int] = field(default_factory=dict)  # shape/size query on a split tensor
    scatters: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)  # (user, replicated input, dim)
    failure: tuple[fx.Node, str, frozenset] | None = None


@dataclass(frozen=True)
class LinearParts:
    input: fx.Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int


def linear_parts(gm: fx.GraphModule, node: fx.Node) -> LinearParts | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear) and node.args:
        m = gm.get_submodule(node.target)
        return LinearParts(node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                           m.in_features, m.out_features)
    if node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and (bias is None or (
                isinstance(bias, fx.Node) and bias.op == "get_attr")):
            out_f, in_f = gm.get_parameter(weight.target).shape
            return LinearParts(node.args[0], weight.target, bias.target if bias is not None else None, in_f, out_f)
    return None


def _ndim(ir: IR, node) -> int:
    return len(ir.meta(node).shape) if isinstance(node, fx.Node) and ir.meta(node).shape is not None else 0


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


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


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return "linear"
        return "unary" if isinstance(module, UNARY_MODULES) else "other"
    if node.op == "call_function":
        t = node.target
        if t in (F.linear, torch._C._nn.linear):
            return "linear"
        if t in UNARY_FUNCTIONS:
            return "unary"
        if t in BINARY_FUNCTIONS:
            return "binary"
        if t in (torch.reshape,):
            return "view"
        if t in (torch.transpose,):
            return "transpose"
        if t in (torch.permute,):
            return "permute"
        if t in (torch.flatten,):
            return "flatten"
        if t in SOFTMAX:
            return "softmax"
        if t is F.scaled_dot_product_attention:
            return "sdpa"
        if t in (torch.matmul, operator.matmul, torch.bmm):
            return "matmul"
        if t is builtins.getattr and node.args[1] == "shape":
            return "size"
        return "other"
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
        return "other"
    return "source"


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def propagate(ir: IR, candidates: dict[fx.Node, int]) -> Propagation:
    """One pass of sharding propagation with `candidates` (Linear -> tp degree) as column-parallel."""
    gm = ir.gm
    p = Propagation(degree={}, split_dim={}, origins={})

    def split(node: fx.Node, dim: int, degree: int, origins: frozenset) -> None:
        p.split_dim[node], p.degree[node], p.origins[node] = dim % max(_ndim(ir, node), 1), degree, origins

    for node in ir.graph.nodes:
        ins = [a for a in _tensor_args(node) if a in p.split_dim]
        kind = _kind(gm, node)
        if kind == "linear":
            parts = linear_parts(gm, node)
            source = parts.input
            if source in p.split_dim:
                if p.split_dim[source] != _ndim(ir, source) - 1:
                    return _fail(p, node, "Linear fed a tensor split along a non-feature dim", source)
                p.row.add(node)  # partial sums: reduced right after, output replicated
                continue
            if node in candidates:
                if parts.out_features % candidates[node]:
                    return _fail(p, node, f"Linear with {parts.out_features} output features is not "
                                          f"divisible by tp={candidates[node]}", origins=frozenset({node}))
                p.column.add(node)
                split(node, -1, candidates[node], frozenset({node}))
            continue
        if not ins:
            continue
        degrees = {p.degree[a] for a in ins}
        origins = frozenset().union(*(p.origins[a] for a in ins))
        if len(degrees) > 1:
            return _fail(p, node, "inputs split over groups of different sizes", origins=origins)
        degree = degrees.pop()
        first = node.args[0] if node.args else None
        dim = p.split_dim.get(first) if isinstance(first, fx.Node) else None
        if kind == "unary":
            split(node, dim, degree, origins)
        elif kind == "binary":
            problem = _binary(ir, p, node, degree, origins)
            if problem:
                return _fail(p, node, problem, origins=origins)
        elif kind == "view" and first in p.split_dim:
            out_dim, why = view_split_dim(ir.meta(first).shape, ir.meta(node).shape, dim, degree)
            if out_dim is None:
                return _fail(p, node, why, origins=origins)
            p.view_dims[node] = out_dim
            split(node, out_dim, degree, origins)
        elif kind == "transpose" and first in p.split_dim:
            n = _ndim(ir, first)
            a, b = (x % n for x in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
            split(node, b if dim == a else a if dim == b else dim, degree, origins)
        elif kind == "permute" and first in p.split_dim:
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            order = [d % _ndim(ir, first) for d in order]
            split(node, order.index(dim), degree, origins)
        elif kind == "flatten" and first in p.split_dim:
            n = _ndim(ir, first)
            start, end = _arg(node, 1, "start_dim", 0) % n, _arg(node, 2, "end_dim", -1) % n
            if dim < start:
                split(node, dim, degree, origins)
            elif dim > end:
                split(node, dim - (end - start), degree, origins)
            elif view_split_dim(ir.meta(first).shape, ir.meta(node).shape, dim, degree)[0] is not None:
                split(node, start, degree, origins)
            else:
                return _fail(p, node, "flatten moves the split dim inside a merged dim", origins=origins)
        elif kind == "softmax":
            soft_dim = _arg(node, 1, "dim")
            if soft_dim is None or soft_dim % _ndim(ir, first) == dim:
                return _fail(p, node, "softmax along the split dim", origins=origins)
            split(node, dim, degree, origins)
        elif kind == "sdpa":
            q, k, v = node.args[:3]
            dims = {p.split_dim.get(t) for t in (q, k, v)}
            mask = _arg(node, 3, "attn_mask")
            if len(dims) != 1 or dim is None or dim >= _ndim(ir, q) - 2:
                return _fail(p, node, "attention with q, k, v not all split along the same head dim", origins)
            if isinstance(mask, fx.Node) and (mask in p.split_dim or _size_at(ir, mask, dim, _ndim(ir, q)) != 1):
                return _fail(p, node, "attention mask varies along the split head dim", origins=origins)
            split(node, dim, degree, origins)
        elif kind == "matmul":
            a, b = node.args[:2]
            out_n = _ndim(ir, node)
            aligned = {p.split_dim[t] + out_n - _ndim(ir, t) for t in (a, b) if t in p.split_dim}
            if len(aligned) != 1 or next(iter(aligned)) >= out_n - 2:
                return _fail(p, node, "matmul over a split contraction dim", origins=origins)
            out_dim = aligned.pop()
            for t in (a, b):
                if t not in p.split_dim and _size_at(ir, t, out_dim, out_n) != 1:
                    return _fail(p, node, "matmul of a split and a replicated batch", origins=origins)
            split(node, out_dim, degree, origins)
        elif kind == "size" and first in p.split_dim:
            p.size_nodes[node] = dim
        else:
            return _fail(p, node, f"{node.op} {getattr(node.target, '__name__', node.target)} cannot take a "
                                  "tensor split across the tp group", origins=origins)
    return p


def _size_at(ir: IR, node: fx.Node, out_dim: int, out_ndim: int) -> int:
    """Size of `node` at output dim `out_dim` after right-aligned broadcasting (1 if absent)."""
    shape = ir.meta(node).shape or ()
    index = out_dim - (out_ndim - len(shape))
    return 1 if index < 0 else shape[index]


def _binary(ir: IR, p: Propagation, node: fx.Node, degree: int, origins: frozenset) -> str | None:
    out_n = _ndim(ir, node)
    tensors = [a for a in node.args if isinstance(a, fx.Node) and ir.meta(a).shape is not None]
    aligned = {p.split_dim[t] + out_n - _ndim(ir, t) for t in tensors if t in p.split_dim}
    if len(aligned) != 1:
        return "elementwise op on tensors split along different dims"
    out_dim = aligned.pop()
    for t in tensors:
        if t not in p.split_dim and _size_at(ir, t, out_dim, out_n) != 1:
            # A replicated operand is sliced locally (its gradient all-gathered back).
            p.scatters.append((node, t, out_dim - (out_n - _ndim(ir, t))))
    p.split_dim[node], p.degree[node], p.origins[node] = out_dim, degree, origins
    return None


def _fail(p: Propagation, node: fx.Node, why: str, source: fx.Node | None = None,
          origins: frozenset | None = None) -> Propagation:
    p.failure = (node, why, origins if origins is not None else p.origins.get(source, frozenset()))
    return p


def plan_tensor_parallel(ir: IR, layer_degree: dict[str, int]) -> tuple[Propagation, dict[str, str]]:
    """Fixed point: start with every Linear of a tp>1 layer as column-parallel, drop the ones
    whose split output reaches an op that cannot take it. Returns the final propagation and,
    per layer left unsplit, the reason."""
    candidates = {n: layer_degree[ir.meta(n).layer] for n in ir.graph.nodes
                  if _kind(ir.gm, n) == "linear" and layer_degree.get(ir.meta(n).layer, 1) > 1}
    reasons: dict[str, str] = {}
    while True:
        p = propagate(ir, candidates)
        if p.failure is None:
            break
        node, why, origins = p.failure
        if not origins:
            raise AssertionError(f"sharding propagation failed at {node.name} with no column Linear to drop: {why}")
        for origin in origins:
            candidates.pop(origin, None)
            reasons.setdefault(ir.meta(origin).layer, f"{node.name}: {why}")
    for layer, degree in layer_degree.items():
        if degree > 1 and not any(ir.meta(n).layer == layer for n in p.column):
            reasons.setdefault(layer, "no Linear in the layer")
        elif layer in reasons and any(ir.meta(n).layer == layer for n in p.column):
            del reasons[layer]  # partly split (e.g. attention but not an odd-sized extra Linear)
    return p, reasons
