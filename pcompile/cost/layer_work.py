"""What a layer does, for one tp degree, at the example batch: its ops' FLOPs and bytes, saved
activations, parameters and tp collectives (`layer_work`), and the activation bytes between
layers (`boundary_bytes`). Read from the annotated IR only (no cluster, no strategy): the cost
model (pcompile.cost.pricing) prices this work on a cluster for a strategy.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from pcompile.ir import IR
from pcompile.sharding.tp_ops import embedding_parts, linear_parts, loss_parts
from pcompile.sharding.tp_rules import plan_tensor_parallel

ZERO_COPY_METHODS = {"view", "transpose", "permute", "reshape", "flatten", "unsqueeze", "squeeze", "expand",
                     "size", "t", "split", "chunk", "narrow", "select", "as_strided", "view_as"}


@dataclass(frozen=True)
class OpWork:
    flops: float  # forward FLOPs on this rank (after tp division), example batch
    moved: float  # activation bytes read + written in forward (scales with the batch)
    param_moved: float  # parameter bytes read in forward (does not)
    linear: bool  # a Linear: operator split runs it as k chunks
    grad: bool  # autograd runs a backward op for it
    sp: bool  # outside the tp-split region of a tp layer: sequence parallel divides it by tp
    # output elements on this rank (example batch) of a transcendental elementwise op (GELU: erf
    # or tanh per element), charged at the device's measured GELU rates where it has them
    # (compute-bound on CPUs, memory-bound on GPUs: `Device.gelu_rate`); 0 for every other op
    transcendental: float = 0.0


@dataclass(frozen=True)
class ParamRead:
    """An op reading parameters: what ZeRO-3 gathers for it when its layer is split (one unit per op)."""

    numel: int  # elements read on this rank (a tied weight at each of its readers)
    linear: bool  # operator split reads the weight as k pieces, each its own unit
    saves: bool  # backward needs the value (the op has a floating-point activation input whose
    # gradient multiplies by it: Linear, norms; not an Embedding's indices), so ZeRO-3 re-gathers it


@dataclass(frozen=True)
class LayerWork:
    ops: tuple[OpWork, ...]
    saved: float  # activation bytes saved for backward on this rank (tp-split ones divided), example batch
    saved_sp: float  # the same with sequence parallelism (every activation of a tp layer divided)
    input_bytes: float  # activations entering the layer: what checkpointing keeps
    largest_output: float  # the largest op output on this rank
    param_numels: tuple[int, ...]  # parameter tensors charged to this layer, elements on this rank
    largest_linear: int  # elements of the largest Linear weight on this rank
    largest_param: int  # elements of the largest parameter tensor on this rank
    reduce_fwd: tuple[float, ...] = ()  # tp all-reduce per row Linear (full activation bytes)
    reduce_bwd: tuple[float, ...] = ()  # tp all-reduce per column Linear input, in backward
    gather_bwd: tuple[float, ...] = ()  # tp all-gather of a scattered replicated operand's gradient
    loss_fwd: tuple[float, ...] = ()  # the vocab-parallel cross-entropy's fp32 all-reduces (every dtype)
    reads: tuple[ParamRead, ...] = ()  # the ops reading parameters, in graph order
    last: bool = False  # holds the graph's last parameter read: ZeRO-3's last unit, kept for backward
    # under sequence parallelism, the [hidden] parameters broadcast over the sequence outside the tp
    # region (norm weights and biases, row Linears' biases): bytes of each, whose gradient is partial
    # per rank's tokens and all-reduced over tp in backward, one call each (the sp rewrite's tp_copy)
    sp_param_reduces: tuple[float, ...] = ()


def example_batch(ir: IR) -> int:
    """The example batch the IR's figures are for: dim 0 of the first tensor input."""
    for node in ir.graph.nodes:
        if node.op == "placeholder" and ir.has_meta(node) and ir.meta(node).shape:
            return int(ir.meta(node).shape[0])
    return 1


def _is_tensor_op(ir: IR, node: fx.Node) -> bool:
    return (node.op in ("call_module", "call_function", "call_method") and ir.has_meta(node)
            and ir.meta(node).shape is not None)


def _is_gelu(ir: IR, node: fx.Node) -> bool:
    """A GELU: nn.GELU (call_module), F.gelu (fx's call_function) or aten.gelu (torch.export)."""
    if node.op == "call_module":
        return isinstance(ir.gm.get_submodule(node.target), torch.nn.GELU)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name.split(".")[0] == "gelu"
    return False


@dataclass(frozen=True)
class _Op:
    """One node as layer_work reads it, for every tp degree alike."""

    node: fx.Node
    layer: str
    params: tuple  # (name, tensor) of the parameters it holds (call_module / get_attr)
    tensor_op: bool  # a call producing a tensor: an op of its layer
    reads: tuple  # parameters it reads (its own and its get_attr inputs'), for ParamRead
    float_input: bool  # a floating-point activation input (its gradient multiplies by the weight)
    sources: tuple  # inputs computed in other layers (not graph inputs, not parameters)
    shaped_inputs: tuple  # inputs with a shape (their bytes move)
    linear: object  # tp_ops.LinearParts, or None
    zero_copy: bool
    grad: bool
    gelu_elements: int  # output elements of a GELU, else 0


class NodeFacts:
    """What layer_work reads of each node that does not depend on the tp degree - the
    parameters it reads, its Linear parts, its inputs - found once per IR (a search asks
    layer_work for every tp degree; module-path lookups are most of its time on a 96-block
    model)."""

    def __init__(self, ir: IR):
        self.ir = ir
        self.params = dict(ir.gm.named_parameters(remove_duplicate=False))
        self._linear: dict[fx.Node, object] = {}
        self._runs: list[tuple[str, list[fx.Node]]] | None = None
        self._ops: dict[int, list[_Op]] = {}

    def param_tensors(self, node: fx.Node) -> list[tuple[str, torch.Tensor]]:
        if node.op == "call_module":
            return [(f"{node.target}.{n}", p) for n, p in self.ir.gm.get_submodule(node.target).named_parameters()]
        if node.op == "get_attr" and node.target in self.params:
            return [(node.target, self.params[node.target])]
        return []

    def linear(self, node: fx.Node):
        if node not in self._linear:
            self._linear[node] = linear_parts(self.ir.gm, node)
        return self._linear[node]

    def runs(self) -> list[tuple[str, list[fx.Node]]]:
        """The annotated nodes in graph order, as runs of consecutive nodes of one layer (a layer
        is one run in an analysed IR)."""
        if self._runs is None:
            self._runs = []
            for node in self.ir.graph.nodes:
                if self.ir.has_meta(node):
                    layer = self.ir.meta(node).layer
                    if not self._runs or self._runs[-1][0] != layer:
                        self._runs.append((layer, []))
                    self._runs[-1][1].append(node)
        return self._runs

    def ops(self, run: int) -> list[_Op]:
        """Run `run`'s nodes as layer_work reads them (found when first asked: layer_work skips
        the blocks that repeat another's work)."""
        if run not in self._ops:
            ir, out = self.ir, []
            for node in self.runs()[run][1]:
                meta = ir.meta(node)
                inputs = node.all_input_nodes
                tensor_op = _is_tensor_op(ir, node)
                reads = tuple(t for t in self.param_tensors(node)) + tuple(
                    t for i in inputs if i.op == "get_attr" for t in self.param_tensors(i)) if tensor_op else ()
                out.append(_Op(
                    node, meta.layer, tuple(self.param_tensors(node)), tensor_op, reads,
                    any(ir.has_meta(i) and i.op != "get_attr" and "float" in str(ir.meta(i).dtype) for i in inputs),
                    tuple(i for i in inputs if ir.has_meta(i) and ir.meta(i).layer != meta.layer
                          and i.op not in ("placeholder", "get_attr")),
                    tuple(i for i in inputs if ir.has_meta(i) and ir.meta(i).shape is not None),
                    self.linear(node) if tensor_op else None,
                    node.op == "call_method" and node.target in ZERO_COPY_METHODS,
                    meta.dtype is not None and ("float" in meta.dtype or "bfloat" in meta.dtype),
                    math.prod(meta.shape) if tensor_op and _is_gelu(ir, node) else 0))
            self._ops[run] = out
        return self._ops[run]


def layer_work(ir: IR, tp: int, planned: tuple | None = None, facts: NodeFacts | None = None,
               skip: frozenset = frozenset()) -> dict[str, LayerWork]:
    """Per layer, the ops, activations, parameters and tp collectives of one rank of a tp group
    (tp_rules decides which Linears split, as the tensor_parallel rewrite will; `planned`: its
    plan_tensor_parallel for every layer at `tp`, when the caller has it; `facts`: the IR's
    NodeFacts, shared across tp degrees). `skip`: nodes left out with their parameters and tp
    collectives - the dense expert mixtures expert parallelism replaces, priced apart
    (pcompile.cost.moe)."""
    facts = facts or NodeFacts(ir)
    split_out, row, column, scatters, embeddings, losses = set(), set(), set(), [], {}, {}
    if tp > 1:
        p, _ = planned or plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
        split_out, row, column, scatters = set(p.split_dim), p.row, p.column, p.scatters
        embeddings, losses = p.embeddings, p.losses
    split_names = {embedding_parts(ir.gm, n).weight for n in embeddings}
    for node in column | row:
        parts = facts.linear(node)
        split_names |= {parts.weight} | ({parts.bias} if parts.bias and node in column else set())
    # By tensor, not by name: a tied table is read as tok_emb.weight and as head.weight, and the
    # layer that first reads it (the embedding's) is charged for it.
    split_params = {id(facts.params[name]) for name in split_names}
    tp_layers = {ir.meta(n).layer for n in column}

    def local(node) -> float:
        return ir.meta(node).output_bytes / (tp if node in split_out else 1)

    def divisor(param) -> int:
        return tp if id(param) in split_params else 1

    copies = _repeats(ir, facts, (split_out, row, column, losses, embeddings))
    acc = {layer: dict(ops=[], saved=0.0, saved_sp=0.0, inputs=set(), largest=0.0, params=[], linear=0,
                       fwd=[], bwd=[], gather=[], loss=[], reads=[], sp={}) for layer in ir.layers}
    last_reader = None
    seen_params: set[int] = set()
    for run, (layer, nodes) in enumerate(facts.runs()):
        if layer not in acc:
            continue
        if layer in copies:  # a repeat of its twin's work: only its parameters are seen (charged to it)
            seen_params.update(id(param) for node in nodes for _, param in facts.param_tensors(node))
            continue
        for op in facts.ops(run):
            if op.node in skip:
                continue
            node, meta, a = op.node, ir.meta(op.node), acc[op.layer]
            for name, param in op.params:
                if id(param) not in seen_params:
                    seen_params.add(id(param))
                    a["params"].append(param.numel() // divisor(param))
            if not op.tensor_op:
                continue
            if op.reads:
                a["reads"].append(ParamRead(sum(p.numel() // divisor(p) for _, p in op.reads), op.linear is not None,
                                            op.float_input))
                last_reader = meta.layer
            a["inputs"].update(op.sources)
            is_linear = op.linear is not None
            # the parallel cross-entropy runs its softmax on this rank's V/tp classes and saves it
            divided = node in split_out or node in row or node in losses
            saved_split = (node in row) if is_linear else node in split_out or node in losses
            a["saved"] += meta.saved_bytes / (tp if saved_split else 1)
            a["saved_sp"] += meta.saved_bytes / (tp if saved_split or meta.layer in tp_layers else 1)
            moved = 0.0 if op.zero_copy else local(node) + sum(local(i) for i in op.shaped_inputs)
            params = sum(param.numel() * param.element_size() / divisor(param) for _, param in op.params)
            elements = op.gelu_elements / (tp if divided else 1) if op.gelu_elements else 0.0
            a["ops"].append(OpWork(meta.flops / (tp if divided else 1), moved, params, is_linear, op.grad,
                                   sp=meta.layer in tp_layers and not divided and not is_linear,
                                   transcendental=elements))
            a["largest"] = max(a["largest"], local(node))
            if is_linear:
                weight = facts.params[op.linear.weight]
                a["linear"] = max(a["linear"], weight.numel() // (tp if node in column | row else 1))
            if meta.layer in tp_layers:  # the sp rewrite's broadcast operands (tp_copy, per layer)
                broadcast = [p for _, p in op.params if p.dim() == 1 and p.is_floating_point()] if not is_linear \
                    else [facts.params[op.linear.bias]] if node in row and op.linear.bias else []
                a["sp"].update({id(p): float(p.numel() * p.element_size()) for p in broadcast})
            if node in row or node in embeddings:  # partial sums (an embedding's: of its vocab range)
                a["fwd"].append(float(meta.output_bytes))
            if node in losses:
                rows = math.prod(ir.meta(loss_parts(ir.gm, node).target).shape or ())  # one per target
                a["loss"] += [4.0 * rows] * 3
    kept = column - skip
    for source in {facts.linear(n).input for n in kept}:
        acc[ir.meta(next(iter(u for u in source.users if u in kept))).layer]["bwd"].append(
            float(ir.meta(source).output_bytes))
    for user, source, _ in scatters:
        if user not in skip:
            acc[ir.meta(user).layer]["gather"].append(float(ir.meta(source).output_bytes))
    if copies:
        last = max(ir.layers.index(layer) for layer in copies)
        if (last_reader is None or ir.layers.index(last_reader) < last
                or any(acc[layer][k] != acc[twin][k] for layer, twin in copies.items() for k in ("bwd", "gather"))):
            return layer_work(dataclasses.replace(ir, replicas=None), tp, planned, facts, skip)
    works = {layer: LayerWork(tuple(a["ops"]), a["saved"], a["saved_sp"],
                              float(sum(ir.meta(n).output_bytes for n in a["inputs"])), a["largest"],
                              tuple(a["params"]), a["linear"], max(a["params"], default=0), tuple(a["fwd"]),
                              tuple(a["bwd"]), tuple(a["gather"]), tuple(a["loss"]), tuple(a["reads"]),
                              layer == last_reader, tuple(a["sp"].values()))
             for layer, a in acc.items() if layer not in copies}
    return {layer: works[copies.get(layer, layer)] for layer in ir.layers}


def _repeats(ir: IR, facts: NodeFacts, splits: tuple) -> dict[str, str]:
    """{block: its twin} for the blocks whose work is their twin's, not walked again: with
    repeated blocks analysed once (ir.replicas: every block past the template's copies its last
    block, node for node and annotation for annotation), the blocks past the template but the
    last take the work of the template's last block, when tp splits every block alike (each
    node of blocks 1.. in the same of `splits` as its counterpart in every other block). The
    caller checks the rest (the last parameter read, gathers and backward all-reduces)."""
    r = ir.replicas
    if r is None:
        return {}
    names = [f"{r.prefix}.{k}" for k in range(r.blocks)]
    if r.blocks < r.captured + 2 or not set(names) <= set(ir.layers):
        return {}
    nodes: dict[str, list] = {name: [] for name in names}
    for layer, run in facts.runs():
        if layer in nodes:
            nodes[layer] += run
    marks = [[tuple(n in split for split in splits) for n in nodes[name]] for name in names[1:]]
    if any(m != marks[0] for m in marks):
        return {}
    return {name: names[r.captured - 1] for name in names[r.captured:-1]}


def boundary_bytes(ir: IR) -> list[float]:
    """Activation bytes crossing from layer i to layers after it (the pipeline's p2p sends),
    example batch; graph inputs are excluded (every stage reads its own)."""
    index = {layer: i for i, layer in enumerate(ir.layers)}
    out = [0.0] * max(len(ir.layers) - 1, 0)
    for node in ir.graph.nodes:
        if not ir.has_meta(node) or node.op in ("placeholder", "get_attr") or ir.meta(node).layer not in index:
            continue
        here = index[ir.meta(node).layer]
        last = max((index.get(ir.meta(u).layer, here) for u in node.users if ir.has_meta(u)), default=here)
        for i in range(here, last):
            out[i] += ir.meta(node).output_bytes
    return out
