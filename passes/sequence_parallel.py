"""Rewrite: Megatron sequence parallelism (sp) in the layers whose strategy says sp=True.

Tensor parallelism leaves the ops *between* a row-parallel Linear and the next column-parallel
one (layernorm / RMSNorm, dropout, residual and bias adds) replicated: every rank of the tp
group computes them on the whole [batch, seq, hidden] activation. sp splits those activations
along the sequence dim (dim 1) instead, so each rank keeps 1/tp of them:

  tp_copy   -> sp_gather          (all-gather forward, reduce-scatter backward)
  tp_reduce -> sp_reduce_scatter  (reduce-scatter forward, all-gather backward)

and the token-wise ops in between run on this rank's sequence chunk (placement "S(1)@tp").
Which nodes: in an sp layer, outside the tp region (no placement or replicated), a token-wise op
(elementwise, a norm over trailing dims, a reduction over trailing dims) whose output is
[batch, seq, ...] with the layer's sequence length. Their other inputs are fixed up where
they meet the sharded region:

- a replicated operand holding the sequence dim (the residual stream entering the first sp
  layer, a position embedding) is cut to this rank's chunk with `sp_split` (backward
  all-gather): the entry of a run of sp layers;
- an operand broadcast over the sequence (norm weights, biases, any [hidden] tensor) passes
  through `tp_copy`, whose backward all-reduces: each rank's gradient of it covers only its
  own tokens, and the tp group sums them (what Megatron does for layernorm weights).
  Norm *modules* become their functional form first so their parameters are graph values;
- a consumer that is not sharded (a non-sp layer, the loss, a view) reads the value through
  `sp_unsplit` (all-gather forward, keep the chunk backward): the exit of the run;
- shape queries of a sharded value return the full shape (`global_size`).

A layer's sequence length is dim 1 of what its tp collectives carry; a [batch, hidden]
layer (an MLP, or GPT-2's Conv1D on flattened tokens) has none and is refused, as is a
sequence tp does not divide (`sp_problem`, which the search can ask before the rewrite via
`planned_shapes`). An sp layer without tp collectives (a "pre" / "post" whose Linears tp left
whole) shards its token-wise ops at the other layers' sequence length, so the region runs on
into it. Dropout in the region draws each rank's mask for its own chunk, so equality with the
serial model holds for dropout 0 (as for tensor parallelism).

Every sharded node's placement says it holds a 1/tp sequence chunk; the pass manager's
placements invariant checks that on fake tensors (passes/invariants.py).
"""
from __future__ import annotations

import builtins

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pcompile.errors import PcompileError
from pcompile.ir import IR, REPLICATED, NodeMeta, Placement
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime import collectives
from pcompile.sharding.sp_rules import SEQ_DIM, sequence_length, shape_of, sp_problem, tokenwise
from pcompile.sharding.tp_ops import kind_of

aten = torch.ops.aten
AXIS = "tp"
HARMLESS_ATTRS = ("device", "dtype", "ndim", "is_cuda")  # reads that do not depend on the split


def _is(node: fx.Node, fn) -> bool:
    return node.op == "call_function" and node.target is fn


def collective_shapes(ir: IR, layer: str) -> tuple[list, list]:
    """(shapes of the layer's tp_reduce outputs, shapes of its tp_copy inputs) after tensor_parallel."""
    nodes = ir.nodes_of(layer)
    return ([shape_of(ir, n) for n in nodes if _is(n, collectives.tp_reduce)],
            [shape_of(ir, n.args[0]) for n in nodes if _is(n, collectives.tp_copy)])


# -- the rewrite ----------------------------------------------------------------------------------
class _Rewriter:
    def __init__(self, ir: IR, degree: dict[str, int]):
        self.ir, self.graph, self.degree = ir, ir.graph, degree
        self.sharded: set[fx.Node] = set()
        self.cache: dict[tuple, fx.Node] = {}  # one split / copy / unsplit per (source, ..., layer)

    def annotate(self, node: fx.Node, like: fx.Node, layer: str, placement: Placement) -> NodeMeta:
        meta = self.ir.meta(node)
        src = self.ir.meta(like)
        meta.layer, meta.placement = layer, placement
        meta.shape, meta.dtype, meta.output_bytes = src.shape, src.dtype, src.output_bytes
        return meta

    def functional_norm(self, node: fx.Node) -> fx.Node:
        """nn.LayerNorm / nn.RMSNorm call -> F.layer_norm / F.rms_norm on get_attr parameters,
        so the parameters can pass through tp_copy (their gradient is summed over the group)."""
        module = self.ir.gm.get_submodule(node.target)
        params = []
        for attr in ("weight", "bias") if isinstance(module, nn.LayerNorm) else ("weight",):
            if getattr(module, attr, None) is None:
                params.append(None)
                continue
            with self.graph.inserting_before(node):
                read = self.graph.get_attr(f"{node.target}.{attr}")
            meta = self.ir.meta(read)
            meta.layer, meta.shape = self.ir.meta(node).layer, tuple(getattr(module, attr).shape)
            meta.dtype = str(getattr(module, attr).dtype)
            meta.output_bytes = meta.param_bytes = getattr(module, attr).numel() * getattr(module, attr).element_size()
            params.append(read)
        shape = tuple(module.normalized_shape)
        args = (node.args[0], shape, *params, module.eps)
        with self.graph.inserting_before(node):
            new = self.graph.call_function(F.layer_norm if isinstance(module, nn.LayerNorm) else F.rms_norm, args)
        new.meta = dict(node.meta)
        meta = NodeMeta(**vars(self.ir.meta(node)))
        meta.param_bytes = 0  # now on the get_attr reads
        new.meta["pcompile"] = meta
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def shared(self, key: tuple, make) -> fx.Node:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def operand(self, user: fx.Node, source: fx.Node) -> fx.Node | None:
        """What a sharded `user` reads instead of the unsharded `source` (None: as it is)."""
        ir, layer = self.ir, self.ir.meta(user).layer
        shape, out = shape_of(ir, source), shape_of(ir, user)
        if shape is None or ir.meta(source).dtype is None:
            return None  # a Python value (a size, a scalar)
        dim = SEQ_DIM - (len(out) - len(shape))
        tp = self.degree[layer]
        if dim >= 0 and shape[dim] == out[SEQ_DIM] and shape[dim] > 1:
            def split():
                with self.graph.inserting_before(user):
                    node = self.graph.call_function(collectives.sp_split, (source, dim, AXIS, tp))
                self.annotate(node, source, layer, Placement.shard(dim, AXIS, tp))
                return node
            return self.shared(("split", source, dim, layer), split)
        if dim >= 0 and shape[dim] != 1:
            raise PcompileError(f"sequence parallelism in layer {layer!r}: {user.name} combines its sequence of "
                                f"{out[SEQ_DIM]} tokens with {source.name} of shape {list(shape)}",
                                f"set sp=False for layer {layer!r}")
        if not str(ir.meta(source).dtype).startswith(("torch.float", "torch.bfloat", "torch.half")):
            return None  # no gradient to sum

        def copy():
            with self.graph.inserting_before(user):
                node = self.graph.call_function(collectives.tp_copy, (source, AXIS, tp))
            self.annotate(node, source, layer, REPLICATED)
            return node
        return self.shared(("copy", source, layer), copy)

    def unsplit(self, source: fx.Node) -> fx.Node:
        def make():
            with self.graph.inserting_after(source):
                node = self.graph.call_function(collectives.sp_unsplit,
                                                (source, SEQ_DIM, AXIS, self.degree[self.ir.meta(source).layer]))
            self.annotate(node, source, self.ir.meta(source).layer, REPLICATED)
            return node
        return self.shared(("unsplit", source), make)

    def full_size(self, node: fx.Node, source: fx.Node) -> None:
        """x.shape / x.size(i) / sym_size(x, i) of a sharded x: the full shape."""
        index = tuple(node.args[1:]) if node.op == "call_method" or _is(node, aten.sym_size.int) else ()
        with self.graph.inserting_before(node):
            full = self.graph.call_function(collectives.global_size,
                                            (source, SEQ_DIM, self.degree[self.ir.meta(source).layer]) + index)
        meta = self.ir.meta(full)
        meta.layer, meta.value = self.ir.meta(node).layer, self.ir.meta(node).value
        node.replace_all_uses_with(full)
        self.graph.erase_node(node)

    def retarget(self, node: fx.Node, fn) -> fx.Node:
        """tp_copy / tp_reduce (x, axis, size) -> fn(x, SEQ_DIM, axis, size), named after fn."""
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, (node.args[0], SEQ_DIM, *node.args[1:]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def consumer(self, source: fx.Node, user: fx.Node) -> None:
        """Fix up `user`, which reads the sharded `source` but is not sharded itself."""
        if _is(user, collectives.tp_copy) and user.args[0] is source:  # enters the tp region
            self.retarget(user, collectives.sp_gather)
        elif kind_of(self.ir.gm, user) == "size" and user.args[0] is source:
            self.full_size(user, source)
        elif not (_is(user, builtins.getattr) and user.args[1] in HARMLESS_ATTRS):
            user.replace_input_with(source, self.unsplit(source))

    def run(self, candidates: list[fx.Node]) -> None:
        nodes = [self.functional_norm(n) if n.op == "call_module" and isinstance(
            self.ir.gm.get_submodule(n.target), (nn.LayerNorm, nn.RMSNorm)) else n for n in candidates]
        # Row Linears' reduces leave the tp region: partial sums -> this chunk's sum.
        nodes = [self.retarget(n, collectives.sp_reduce_scatter) if _is(n, collectives.tp_reduce) else n
                 for n in nodes]
        self.sharded = set(nodes)
        for node in nodes:
            self.ir.meta(node).placement = Placement.shard(SEQ_DIM, AXIS, self.degree[self.ir.meta(node).layer])
            if _is(node, collectives.sp_reduce_scatter):
                continue
            for source in list(dict.fromkeys(node.all_input_nodes)):
                if source not in self.sharded:
                    replacement = self.operand(node, source)
                    if replacement is not None:
                        node.replace_input_with(source, replacement)
        for node in nodes:
            for user in list(node.users):
                if user not in self.sharded:
                    self.consumer(node, user)


def sharded_candidates(ir: IR, degree: dict[str, int], length: dict[str, int]) -> list[fx.Node]:
    """The nodes sp shards, in graph order: tp_reduce outputs and token-wise ops of sp layers
    outside the tp region whose output is [batch, seq, ...] with the layer's sequence length."""
    out = []
    for node in ir.graph.nodes:
        meta = ir.meta(node) if ir.has_meta(node) else None
        if meta is None or meta.layer not in degree or not length.get(meta.layer) or node.op not in (
                "call_function", "call_method", "call_module") or not (meta.placement is None
                                                                       or meta.placement.replicated):
            continue
        shape = meta.shape
        if not shape or len(shape) <= SEQ_DIM + 1 or shape[SEQ_DIM] != length[meta.layer]:
            continue
        if _is(node, collectives.tp_reduce) or (not _is(node, collectives.tp_copy) and tokenwise(ir, node)):
            out.append(node)
    return out


@register_pass("sequence_parallel", kind="rewrite", requires=("tensor_parallel",), ensures=("sequence_parallel",))
def sequence_parallel(ir: IR, ctx: PassContext) -> IR:
    """Split the norm / dropout / residual regions of sp layers along the sequence over the tp group."""
    degree = {layer: ctx.plan.strategy_for(layer).tp for layer in ir.layers if ctx.plan.strategy_for(layer).sp}
    if not degree:
        return ir
    shapes = {layer: collective_shapes(ir, layer) for layer in degree}
    for layer, tp in degree.items():
        problem = sp_problem(*shapes[layer], layer, tp)
        if problem:
            raise PcompileError(f"sequence parallelism (sp) cannot run: {problem}",
                                f"set sp=False for layer {layer!r} (or let pcompile search the plan)")
    lengths = {layer: sequence_length(*shapes[layer]) for layer in degree}
    known = sorted({n for n in lengths.values() if n})
    # A layer without tp collectives (a "pre" / "post" tp left whole) shards its token-wise ops
    # at the sequence length of the others, so the sp region runs on into it.
    length = {layer: n if n is not None else (known[0] if len(known) == 1 else 0) for layer, n in lengths.items()}
    for layer, n in length.items():
        problem = sp_problem([(1, n, 1)] if n else [], [], layer, degree[layer])
        if problem:
            raise PcompileError(f"sequence parallelism (sp) cannot run: {problem}",
                                f"use a sequence length divisible by {degree[layer]}, or set sp=False")
    candidates = sharded_candidates(ir, degree, length)
    rewriter = _Rewriter(ir, degree)
    rewriter.run(candidates)
    ir.graph.lint()
    ir.gm.recompile()
    counts = ir.op_counts()
    names = ("sp_gather", "sp_reduce_scatter", "sp_split", "sp_unsplit")
    ctx.report.append("sequence parallel: " + ", ".join(
        f"{counts.get('call_function:pcompile.runtime.collectives.' + n, 0)} {n}" for n in names)
        + f"; {len(candidates)} nodes run on a 1/tp sequence chunk in {len(degree)} layer(s)")
    return ir
