"""Mixture-of-experts layers in a captured graph (analysis only: nothing is rewritten here).

An MoE layer is found from its top-k: the top-k's input is a softmax of a router Linear's
output (through dtype casts), whose weight has one row per expert; the router's input is the
tokens the experts read. The experts are then either

  modules  a ModuleList of 2-Linear MLPs (the built-in MoE GPT under fx): per expert a Linear
           reading the tokens, one elementwise activation, a Linear; each output multiplied by
           the expert's gate column and summed (`output`: the sum of all experts' terms)
  stacked  batched expert weights, one tensor per projection with the experts along dim 0
           (Hugging Face Mixtral / Qwen-MoE under torch.export: gate_up_proj, down_proj). When
           they are read as HF's grouped-mm experts - grouped_mm(x, gate_up^T) -> chunk(2) ->
           act(gate) * up -> grouped_mm(., down^T) -> times the gates -> summed back to the
           tokens' shape - `gated` records it: (gate_up, down, activation, the experts'
           input) and `output` the mixture

`find_moe_layers(ir)` returns one MoELayer per top-k that fits, in graph order; the expert
parallel rewrite (passes/expert_parallel.py) reads it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.ir import IR
from pcompile.sharding.tp_ops import linear_parts

_TOPK = {torch.topk, torch.ops.aten.topk.default, "topk"}
_SOFTMAX = {F.softmax, torch.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, "softmax"}
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, "to", "float", "type_as"}
_ACTIVATIONS = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu", torch.relu: "relu", torch.ops.aten.gelu.default: "gelu",
                torch.ops.aten.relu.default: "relu", torch.ops.aten.silu.default: "silu"}
_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}


@dataclass(frozen=True)
class Expert:
    """One expert MLP of the `modules` form: fc -> activation -> out."""

    index: int
    path: str  # the expert's module path, e.g. blocks.0.moe.experts.2
    fc: fx.Node
    out: fx.Node
    activation: str  # gelu | relu | silu
    params: tuple[str, ...]  # fc.weight, fc.bias, out.weight, out.bias (biases may be missing)
    term: fx.Node | None = None  # gate column x the expert's output


@dataclass(frozen=True)
class MoELayer:
    layer: str | None  # the IR layer (None before the layers pass)
    router: fx.Node  # the router Linear
    router_weight: str
    topk: fx.Node
    tokens: fx.Node  # what the router and the experts read
    num_experts: int
    top_k: int
    gates: fx.Node | None  # the top-k values as the experts are weighted (renormalised if they are)
    indices: fx.Node | None  # the top-k indices
    form: str  # "modules" | "stacked"
    experts: tuple[Expert, ...] = ()
    stacked: tuple[str, ...] = ()  # batched expert weights (experts along dim 0)
    output: fx.Node | None = None  # modules form: the sum of every expert's gated output
    # modules form: the (tokens, experts) gate matrix scatter(zeros, -1, indices, gates) when
    # every expert's term is its column times its output (what makes `output` the top-k mixture)
    combine: fx.Node | None = None
    gated: tuple | None = None  # stacked form: (gate_up name, down name, activation, experts' input node)
    notes: tuple[str, ...] = field(default=())

    @property
    def expert_params(self) -> tuple[str, ...]:
        return tuple(p for e in self.experts for p in e.params) if self.form == "modules" else self.stacked


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _getitem(node: fx.Node, index: int) -> fx.Node | None:
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def _through_casts(node):
    while _is(node, _CASTS):
        node = node.args[0]
    return node


def _linear(gm: fx.GraphModule, node) -> tuple[fx.Node, str] | None:
    """(input, weight name) when `node` is a Linear (call_module, F.linear, aten.linear / addmm)."""
    if not isinstance(node, fx.Node):
        return None
    try:
        parts = linear_parts(gm, node)
    except Exception:  # not a Linear
        return None
    if parts is None or parts.weight is None:
        return None
    return parts.input, parts.weight


def _param_shape(gm: fx.GraphModule, name: str) -> tuple[int, ...] | None:
    try:
        return tuple(gm.get_parameter(name).shape)
    except AttributeError:
        return None


def _gates(values: fx.Node) -> fx.Node:
    """values / values.sum(-1, keepdim=True) when the top-k values are renormalised, else values."""
    for user in values.users:
        if _is(user, {operator.truediv, torch.div, torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor}) \
                and user.args[0] is values and isinstance(user.args[1], fx.Node) \
                and user.args[1].args and user.args[1].args[0] is values:
            return user
    return values


def _experts(ir: IR, tokens: fx.Node, router: fx.Node) -> list[Expert]:
    """The 2-Linear MLPs reading `tokens`, grouped by their module path (one expert each)."""
    gm, found = ir.gm, {}
    for fc in tokens.users:
        if fc is router or fc.op != "call_module" or _linear(gm, fc) is None or len(fc.users) != 1:
            continue
        act = next(iter(fc.users))
        if act.target not in _ACTIVATIONS or len(act.users) != 1:
            continue
        out = next(iter(act.users))
        if out.op != "call_module" or _linear(gm, out) is None:
            continue
        path = str(fc.target).rpartition(".")[0]
        if str(out.target).rpartition(".")[0] != path:
            continue
        prefix, _, number = path.rpartition(".")
        if not number.isdigit():
            continue
        params = tuple(name for module in (fc, out) for name, _ in gm.get_submodule(str(module.target))
                       .named_parameters(prefix=str(module.target)))
        term = next((u for u in out.users if _is(u, _MUL)), None)
        found.setdefault(prefix, []).append(Expert(int(number), path, fc, out, _ACTIVATIONS[act.target], params, term))
    if not found:
        return []
    prefix = max(found, key=lambda p: len(found[p]))
    return sorted(found[prefix], key=lambda e: e.index)


def _sum_of(terms: list[fx.Node]) -> fx.Node | None:
    """The node where every term has been added (a chain of adds), or None."""
    pending, node = set(terms), terms[0]
    pending.discard(node)
    while pending:
        adds = [u for u in node.users if _is(u, _ADD)]
        if len(adds) != 1:
            return None
        node = adds[0]
        pending -= {a for a in node.args if isinstance(a, fx.Node)}
    return node


def _gate_matrix(experts: list[Expert], indices, gates) -> fx.Node | None:
    """The node W = scatter(zeros_like(..), -1, indices, gates) when every expert e's term is
    W[..., e:e+1] * (expert e's output), else None."""
    found = None
    for e in experts:
        term = e.term
        column = [a for a in term.args if a is not e.out] if term is not None and len(term.args) == 2 else []
        if len(column) != 1 or not _is(column[0], {operator.getitem}):
            return None
        matrix, index = column[0].args
        if index != (Ellipsis, slice(e.index, e.index + 1, None)) or (found is not None and matrix is not found):
            return None
        found = matrix
    if not (_is(found, {"scatter", torch.scatter}) and tuple(found.args[1:]) == (-1, indices, gates)
            and _is(found.args[0], {torch.zeros_like, "zero_"})):
        return None
    return found


def _layer(ir: IR, node: fx.Node) -> str | None:
    return ir.meta(node).layer if ir.has_meta(node) else None


def moe_layer_at(ir: IR, topk: fx.Node) -> MoELayer | None:
    """The MoE layer whose top-k is `topk`, or None when it is not a router's."""
    gm = ir.gm
    probs = _through_casts(topk.args[0])
    if not _is(probs, _SOFTMAX):
        return None
    router = _through_casts(probs.args[0])
    linear = _linear(gm, router)
    if linear is None:
        return None
    tokens, weight = linear
    shape = _param_shape(gm, weight)
    if shape is None or len(shape) != 2:
        return None
    num_experts = shape[0]
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    values, indices = _getitem(topk, 0), _getitem(topk, 1)
    if topk.op == "call_function" and topk.target is torch.topk and (values is None and indices is None):
        values = next((u for u in topk.users if u.op == "call_function" and u.target is getattr), None)
    gates = _gates(values) if values is not None else None
    common = dict(layer=_layer(ir, router), router=router, router_weight=weight, topk=topk, tokens=tokens,
                  num_experts=num_experts, top_k=int(k) if isinstance(k, int) else -1, gates=gates, indices=indices)
    experts = _experts(ir, tokens, router)
    if len(experts) == num_experts and [e.index for e in experts] == list(range(num_experts)):
        terms = [e.term for e in experts]
        output = _sum_of(terms) if all(t is not None for t in terms) else None
        return MoELayer(form="modules", experts=tuple(experts), output=output,
                        combine=_gate_matrix(experts, indices, gates), **common)
    # batched expert weights: parameters with the experts along dim 0 under the router's module
    owner = weight.rpartition(".")[0].rpartition(".")[0]  # e.g. model.layers.0.mlp
    stacked = tuple(name for name, p in gm.named_parameters()
                    if name.startswith(owner + ".") and name != weight and p.dim() == 3 and p.shape[0] == num_experts)
    if stacked:
        found = _grouped_mm(ir, stacked, tuple(ir.meta(tokens).shape) if ir.has_meta(tokens) else None, gates)
        gated, output = (found[:4], found[4]) if found else (None, None)
        return MoELayer(form="stacked", stacked=stacked, gated=gated, output=output, **common)
    return None


def _read_through(node: fx.Node) -> fx.Node:
    """A parameter read through transposes and casts."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args and \
            (node.target in _CASTS or node.target in (torch.ops.aten.transpose.int, torch.transpose)):
        node = node.args[0]
    return node


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _grouped_mm(ir: IR, stacked: tuple[str, ...], token_shape, gates) -> tuple | None:
    """(gate_up, down, activation, experts' input, output) of HF's grouped-mm experts, or None."""
    mms = {}
    for node in ir.graph.nodes:
        if node.op == "call_function" and len(node.args) >= 2 and isinstance(node.args[1], fx.Node):
            read = _read_through(node.args[1])
            if read.op == "get_attr" and read.target in stacked:
                mms[read.target] = node
    if len(mms) != 2:
        return None
    first, second = sorted(mms.values(), key=lambda n: list(ir.graph.nodes).index(n))
    chunk = _single_user(first)
    if not _is(chunk, {torch.ops.aten.chunk.default, torch.chunk}) or chunk.args[1:] not in ((2, -1), (2,)):
        return None
    gate, up = _getitem(chunk, 0), _getitem(chunk, 1)
    act = _single_user(gate) if gate is not None else None
    product = _single_user(act) if act is not None and act.target in _ACTIVATIONS else None
    if product is None or not _is(product, _MUL) or set(product.args) != {act, up} or \
            _through_casts(second.args[0]) is not product:
        return None
    node, gated = second, False
    while node is not None and (not ir.has_meta(node) or tuple(ir.meta(node).shape or ()) != token_shape):
        gated = gated or (_is(node, _MUL) and any(gates in _ancestors(a, 12) for a in node.args
                                                  if isinstance(a, fx.Node) and a is not second))
        node = _single_user(node)
    if node is None or not gated:
        return None
    source = _through_casts(first.args[0])
    expert_input = source.args[0] if _is(source, {torch.ops.aten.index.Tensor}) else None
    if expert_input is None:
        return None
    return (str(_read_through(first.args[1]).target), str(_read_through(second.args[1]).target),
            _ACTIVATIONS[act.target], expert_input, node)


def _ancestors(node: fx.Node, depth: int) -> set:
    seen, frontier = {node}, [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def find_moe_layers(ir: IR) -> list[MoELayer]:
    """Every MoE layer of the graph, in graph order."""
    return [layer for node in ir.graph.nodes if _is(node, _TOPK) and (layer := moe_layer_at(ir, node)) is not None]
