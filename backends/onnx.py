"""Export each rank's rewritten graph to ONNX, collectives as nodes of a custom `pcompile` domain.

Why a hand-built translation instead of torch.onnx: the IR is already an fx graph with every
shape known (fake-tensor analysis), so each fx node maps to a few ONNX nodes directly. That
keeps the fx node names as the ONNX node and value names, puts each node's pcompile metadata
(layer, sharding) on exactly the ONNX nodes it produced, lets the collectives become
`pcompile` domain nodes without registering custom torch ops, and takes milliseconds per
rank (torch.onnx re-traces the module: seconds per rank, and its node names and metadata
no longer line up with the IR). The cost: only the ops pcompile's models use are translated;
any other op is a PcompileError naming it.

The graph is static: sizes computed from shapes (`x.shape[1] // 4`) are folded to the local
(this rank's) values, so each rank's file has its own concrete shapes. Parameters are
initializers holding this rank's shard (or typed graph inputs when the model lives on the
meta device and has no values). The forward graph is exported (it returns the loss);
dropout is exported as identity (ONNX inference semantics).

Rank r sits at mesh coordinates (dp, tp) = divmod(r, tp) (pcompile.mesh), the layout of
`backends/distributed.py`'s DeviceMesh(("dp", "tp")). Plans whose layers use different (dp, tp)
groupings (passes/reshard.py) also name degree axes ("tp4", "dp1") and batch axes ("batch1:2");
their groups are pcompile.mesh's (as the backend's), and the batch regrouping
between layers becomes BatchGather / BatchSlice nodes.

ZeRO-3 (sdp) layers: each rank's initializers hold its dp chunk of its tp shard of every sdp
parameter, and each gather unit (`pcompile.runtime.sdp.sdp_gather`) is one SdpGather node with an input
and an output per parameter. Its backward (the reduce-scatter of the gradients) is not in the
file, like every other collective's.
"""
from __future__ import annotations

import copy
import math
import operator
import os
from typing import NamedTuple

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from pcompile.errors import PcompileError
from pcompile.ir import IR, REPLICATED, Placement, target_name
from pcompile.ir.fake import fake_run
from pcompile.mesh import group_of
from pcompile.plan import Plan
from pcompile.runtime import batch_regroup, collectives, ops, sdp, vocab_parallel
from pcompile.runtime.loss_counts import step_count
from pcompile.runtime.shards import take_shards

DOMAIN = "pcompile"
OPSET = 20  # Gelu and LayerNormalization are standard from here
COLLECTIVE_OPS = {collectives.tp_copy: "TpCopy", collectives.tp_reduce: "TpReduce",
                  collectives.tp_gather: "TpGather", collectives.tp_scatter: "TpScatter",
                  collectives.sp_split: "SpSplit", collectives.sp_gather: "SpGather",
                  collectives.sp_reduce_scatter: "SpReduceScatter", collectives.sp_unsplit: "SpUnsplit",
                  batch_regroup.batch_gather: "BatchGather", batch_regroup.batch_slice: "BatchSlice"}
_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
           torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
           torch.bool: TensorProto.BOOL}


# -- a rank's module, without a process group ------------------------------------------------
def _check_rank(plan: Plan, rank: int) -> None:
    if plan.pp != 1:
        raise PcompileError(f"ONNX export of a pipeline plan (pp={plan.pp}) is not supported yet",
                            "export a plan with pp=1")
    if not 0 <= rank < plan.num_devices:
        raise PcompileError(f"rank {rank} is outside the plan's {plan.num_devices} devices",
                            f"use a rank in 0..{plan.num_devices - 1}")


def group_ranks(plan: Plan, rank: int, axis: str) -> list[int]:
    """Global ranks of the `axis` group that `rank` belongs to. The default mesh's "dp" / "tp"
    are the degree axes of its own degrees (with pp = 1, the "tp{tp}" groups are the mesh's rows
    and the "dp{dp}" groups its columns: pcompile.mesh lays them out for every backend)."""
    _check_rank(plan, rank)
    return group_of(rank, axis, plan.num_devices, plan.default.dp, plan.default.tp)


def coordinate(plan: Plan, rank: int, axis: str) -> int:
    """`rank`'s index in its `axis` group."""
    return group_ranks(plan, rank, axis).index(rank)


def mesh_coords(plan: Plan, rank: int) -> dict[str, int]:
    """(dp, tp) coordinates of `rank` in the row-major (dp, tp) mesh."""
    return {axis: coordinate(plan, rank, axis) for axis in ("dp", "tp")}


def rank_module(ir: IR, plan: Plan, rank: int) -> fx.GraphModule:
    """The graph module `rank` runs: a copy of ir.gm holding that rank's shard of each split
    parameter, the sdp chunk taken from the tp shard (as CompiledModel.lower builds it, but for
    any rank and with no process group)."""
    _check_rank(plan, rank)
    gm = copy.deepcopy(ir.gm)
    axes = {s.axis for s in (*ir.param_shardings.values(), *ir.sdp_shardings.values())}
    coords = {axis: coordinate(plan, rank, axis) for axis in axes}
    take_shards([gm], ir.param_shardings, coords)  # tied weights stay one parameter
    take_shards([gm], ir.sdp_shardings, coords)
    return gm


def local_inputs(ir: IR, plan: Plan) -> list[torch.Tensor]:
    """Meta tensors shaped like one rank's inputs: the global batch split along dim 0 over dp
    (a mixed plan's: the first layer's)."""
    layout = ir.mixed_layout
    dp = plan.default.dp if layout is None else layout.input_dp
    inputs = []
    for node in ir.graph.find_nodes(op="placeholder"):
        meta = ir.meta(node)
        if meta.shape is None:  # a number the runtime passes (a masked mean's step count): its default
            break
        shape = list(meta.shape)
        if shape:
            shape[0] //= dp
        inputs.append(torch.empty(shape, dtype=getattr(torch, meta.dtype.replace("torch.", "")), device="meta"))
    return inputs


def _observe(ir: IR, plan: Plan) -> dict[str, object]:
    """Every node's local value on fake tensors: tensors (shape, dtype), a multi-output node's
    (sdp_gather, chunk) as a tuple of those, and folded python values."""
    values: dict[str, object] = {}

    def local(value):
        return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    def record(node, value):
        several = isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value)
        values[node.name] = tuple(map(local, value)) if several else local(value)

    with collectives.simulate():
        fake_run(ir, tuple(local_inputs(ir, plan)), record, shard=ir.local_param_shape, grad=False)
    return values


def _is_tensor(value) -> bool:
    """Whether an `_observe` value is one tensor's (shape, dtype)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype)


# -- the graph builder -----------------------------------------------------------------------
class _Graph:
    """ONNX nodes, initializers and typed values for one rank, built fx node by fx node."""

    def __init__(self, ir: IR, gm: fx.GraphModule, plan: Plan, rank: int, values: dict[str, object]):
        self.ir, self.gm, self.plan, self.rank, self.values = ir, gm, plan, rank, values
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.names: dict[str, str] = {}  # fx node name -> ONNX value name
        self.canonical = {id(p): n for n, p in gm.named_parameters()} | {id(b): n for n, b in gm.named_buffers()}
        self.current: fx.Node | None = None
        self.count = 0
        self.axes: set[str] = set()  # the mesh axes this rank's nodes and parameters name
        self.layout = ir.mixed_layout
        self.sdp_shardings = ir.sdp_shardings

    def props(self) -> dict[str, str]:
        node, meta = self.current, self.ir.meta(self.current)
        return {"pcompile.node": node.name, "pcompile.target": target_name(node), "pcompile.layer": meta.layer or "-",
                "pcompile.sharding": str(meta.placement or REPLICATED)}

    def add(self, op: str, inputs: list[str], output: str | None = None, domain: str = "",
            outputs: list[str] | None = None, **attrs) -> str:
        """One ONNX node named `output`, its one output, or the values `outputs` names."""
        self.count += 1
        output = output or f"{self.current.name}/{op.lower()}_{self.count}"
        node = helper.make_node(op, inputs, outputs or [output], name=output, domain=domain, **attrs)
        helper.set_metadata_props(node, self.props())
        self.nodes.append(node)
        return output

    def group(self, axis: str) -> list[int]:
        """This rank's `axis` group (global ranks); the axis is recorded for the model's coords."""
        self.axes.add(axis)
        return group_ranks(self.plan, self.rank, axis)

    def const(self, array: np.ndarray) -> str:
        return self.add("Constant", [], value=numpy_helper.from_array(np.asarray(array)))

    def arg(self, value, like: np.dtype = np.float32) -> str:
        """The ONNX name of an fx argument: a node's value, or a constant for a python scalar."""
        if isinstance(value, fx.Node):
            if value.name not in self.names:
                folded = self.values.get(value.name)
                return self.const(np.asarray(folded, dtype=like))
            return self.names[value.name]
        return self.const(np.asarray(value, dtype=like))

    def parameter(self, tensor: torch.Tensor, placement: Placement = REPLICATED) -> str:
        """An initializer holding this rank's tensor (a typed input when it lives on meta)."""
        name = self.canonical[id(tensor)]
        if name not in self.initializers and name not in {i.name for i in self.inputs}:
            tp_then_sdp = (self.ir.param_shardings.get(name), self.sdp_shardings.get(name))
            cuts = [c for c in tp_then_sdp if c is not None]
            props = {"pcompile.sharding": str(Placement.of(*cuts) if cuts else placement),
                     "pcompile.shard_of": str(math.prod(c.size for c in cuts))}
            self.axes.update(c.axis for c in cuts)
            if self.layout is not None and name in self.layout.param_axes:
                # mixed groupings: each parameter's gradient is summed over its own layer's dp axis
                props["pcompile.dp_axis"] = self.layout.param_axes[name][0]
            if tensor.is_meta:
                info = helper.make_tensor_value_info(name, _DTYPES[tensor.dtype], list(tensor.shape))
                helper.set_metadata_props(info, props)
                self.inputs.append(info)
            else:
                array = tensor.detach().cpu()
                values = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
                init = numpy_helper.from_array(values, name)
                helper.set_metadata_props(init, props)
                self.initializers[name] = init
        return name

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.values[node.name][0]

    def typed(self, node: fx.Node, name: str) -> onnx.ValueInfoProto:
        shape, dtype = self.values[node.name]
        if dtype not in _DTYPES:
            raise PcompileError(f"ONNX export: node {node.name} has dtype {dtype}, which has no ONNX type here",
                                f"use one of {sorted(str(d) for d in _DTYPES)}")
        info = helper.make_tensor_value_info(name, _DTYPES[dtype], list(shape))
        helper.set_metadata_props(info, {"pcompile.sharding": str(self.ir.meta(node).placement or REPLICATED)})
        return info


# -- translations: fx node -> ONNX nodes (each returns the output value's name) ---------------
def _linear(g: _Graph, x: str, weight: str, bias: str | None, out: str) -> str:
    weight_t = g.add("Transpose", [weight], perm=[1, 0])
    if bias is None:
        return g.add("MatMul", [x, weight_t], out)
    return g.add("Add", [g.add("MatMul", [x, weight_t]), bias], out)


def _module(g: _Graph, node: fx.Node, out: str) -> str:
    return _apply_module(g, node, g.gm.get_submodule(node.target), node.args, {}, out)


def _module_with(g: _Graph, node: fx.Node, out: str) -> str:
    """sdp.module_with / sdp.sdp_module(module, {name: value}, *args): the module reading some of
    its parameters from graph values (ZeRO-3's gathered parameters; the reshard pass's shared
    parameter routed through grad_scale)."""
    ref, params, *args = node.args
    values = {name: g.arg(value) for name, value in params.items()}
    return _apply_module(g, node, g.gm.get_submodule(ref.target), args, values, out)


def _apply_module(g: _Graph, node: fx.Node, module: nn.Module, args, params: dict[str, str], out: str) -> str:
    """`module(*args)`: its parameters are initializers, except those `params` maps to ONNX values."""
    def param(name: str) -> str | None:
        tensor = getattr(module, name)
        return None if tensor is None else params.get(name) or g.parameter(tensor)

    x = g.arg(args[0])
    if isinstance(module, nn.Linear):
        return _linear(g, x, param("weight"), param("bias"), out)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(g, x, module.normalized_shape, param("weight"), param("bias"), module.eps, out)
    if isinstance(module, nn.Embedding):
        return g.add("Gather", [param("weight"), x], out, axis=0)
    if isinstance(module, nn.Dropout | nn.Identity):
        return g.add("Identity", [x], out)
    if isinstance(module, nn.ReLU | nn.GELU):
        return _activation(g, x, "relu" if isinstance(module, nn.ReLU) else "gelu",
                           getattr(module, "approximate", "none"), out)
    raise _unsupported(node, type(module).__name__)


def _layer_norm(g: _Graph, x: str, normalized, weight: str | None, bias: str | None, eps: float, out: str) -> str:
    scale = weight if weight is not None else g.const(np.ones(normalized, np.float32))
    shift = bias if bias is not None else g.const(np.zeros(normalized, np.float32))
    return g.add("LayerNormalization", [x, scale, shift], out, axis=-len(normalized), epsilon=float(eps))


def _layer_norm_call(g: _Graph, node: fx.Node, out: str) -> str:
    """F.layer_norm(x, shape, weight, bias, eps) on graph values (sequence parallelism's form)."""
    x, normalized, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
    weight, bias, eps = node.kwargs.get("weight", weight), node.kwargs.get("bias", bias), node.kwargs.get("eps", eps)
    scale = g.arg(weight) if weight is not None else g.const(np.ones(normalized, np.float32))
    shift = g.arg(bias) if bias is not None else g.const(np.zeros(normalized, np.float32))
    return g.add("LayerNormalization", [g.arg(x), scale, shift], out, axis=-len(normalized), epsilon=float(eps))


def _activation(g: _Graph, x: str, kind: str, approximate: str, out: str) -> str:
    if kind == "relu":
        return g.add("Relu", [x], out)
    return g.add("Gelu", [x], out, approximate=approximate)


def _causal_mask(g: _Graph, length: int, source: int) -> str:
    """-inf above the diagonal, 0 elsewhere, built by ops (a stored T x T constant would be
    16 MB per layer at T=2048) and shared by every attention of the rank."""
    key = f"causal_mask_{length}x{source}"
    if key not in g.names:
        full = g.add("ConstantOfShape", [g.const(np.array([length, source], np.int64))],
                     value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
        g.names[key] = g.add("Trilu", [full, g.const(np.int64(1))], upper=1)
    return g.names[key]


def _attention(g: _Graph, node: fx.Node, out: str) -> str:
    """softmax(q k^T * scale + causal mask) v, the math SDPA computes (dropout exported as identity)."""
    q, k, v = (g.arg(a) for a in node.args[:3])
    kwargs = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), node.args[3:])) | node.kwargs
    if kwargs.get("attn_mask") is not None:
        raise _unsupported(node, "scaled_dot_product_attention with an explicit attn_mask")
    q_shape, k_shape = g.shape(node.args[0]), g.shape(node.args[1])
    scale = kwargs.get("scale") or 1.0 / math.sqrt(q_shape[-1])
    k_t = g.add("Transpose", [k], perm=list(range(len(k_shape) - 2)) + [len(k_shape) - 1, len(k_shape) - 2])
    scores = g.add("Mul", [g.add("MatMul", [q, k_t]), g.const(np.float32(scale))])
    if kwargs.get("is_causal"):
        scores = g.add("Add", [scores, _causal_mask(g, q_shape[-2], k_shape[-2])])
    return g.add("MatMul", [g.add("Softmax", [scores], axis=-1), v], out)


def _cross_entropy(g: _Graph, node: fx.Node, out: str) -> str:
    kwargs = dict(zip(("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"),
                      node.args[2:])) | node.kwargs
    if kwargs.get("weight") is not None or kwargs.get("label_smoothing", 0.0):
        raise _unsupported(node, "cross_entropy with class weights or label smoothing")
    logits = g.add("LogSoftmax", [g.arg(node.args[0])], axis=1)
    return g.add("NegativeLogLikelihoodLoss", [logits, g.arg(node.args[1])], out,
                 reduction=kwargs.get("reduction", "mean"), ignore_index=int(kwargs.get("ignore_index", -100)))


def _collective(g: _Graph, node: fx.Node, out: str) -> str:
    """A pcompile-domain node: axis, group size, this rank's group and the local output shape."""
    fn = node.target
    if ops.op_of(node).axis_arg == 2:  # (x, dim, axis, size)
        x, dim, axis, size = node.args
        extra = {"dim": int(dim)}
    else:
        x, axis, size = node.args
        extra = {}
    ranks = g.group(axis)
    return g.add(COLLECTIVE_OPS[fn], [g.arg(x)], out, domain=DOMAIN, axis=axis, group_size=int(size),
                 group_ranks=ranks, rank_in_group=ranks.index(g.rank), shape=list(g.shape(node)),
                 input_shape=list(g.shape(x)), **extra)


def _outputs(g: _Graph, node: fx.Node) -> list[str]:
    """The output names of a multi-output node: each named after the getitem that reads it, so
    the value keeps its fx name (an output nothing reads gets a fresh one)."""
    names = [f"{node.name}/{i}" for i in range(len(g.values[node.name]))]
    for user in node.users:
        if user.target is operator.getitem:
            names[user.args[1]] = g.names[user.name] = user.name
    return names


def _item(g: _Graph, node: fx.Node, out: str) -> str:
    """getitem of a multi-output node's tuple: the output that node named after this getitem."""
    if node.name not in g.names:
        raise _unsupported(node, f"getitem of {target_name(node.args[0])}")
    return g.names[node.name]


def _sdp_gather(g: _Graph, node: fx.Node, out: str) -> None:
    """A ZeRO-3 unit's gather (pcompile/runtime/sdp.py) as one pcompile-domain node: per parameter, its
    shard in and the tensor concatenated over the group along its entry of `dims` out."""
    shards, dims, axis, size = node.args
    ranks = g.group(axis)
    g.add("SdpGather", [g.arg(s) for s in shards], out, domain=DOMAIN, outputs=_outputs(g, node), axis=axis,
          group_size=int(size), group_ranks=ranks, rank_in_group=ranks.index(g.rank), dims=list(dims))


def _chunk(g: _Graph, node: fx.Node, out: str) -> None:
    """torch.chunk (operator splitting's pieces) as a Split with the observed sizes (torch.chunk
    may make fewer, unequal chunks than asked for)."""
    x, _, dim = (list(node.args) + [0])[:3]
    dim = node.kwargs.get("dim", dim) % len(g.shape(x))
    sizes = np.array([shape[dim] for shape, _ in g.values[node.name]], np.int64)
    g.add("Split", [g.arg(x), g.const(sizes)], out, outputs=_outputs(g, node), axis=dim)


class _Call(NamedTuple):
    """The op a ZeRO-3 runner calls, shaped like the fx node the translations read."""

    name: str
    target: object
    args: tuple
    kwargs: dict


def _runner(g: _Graph, node: fx.Node, out: str) -> str:
    """sdp_function(qualname, *args) / sdp_method(name, self, *args): the op itself (the runners
    only keep autograd from saving gathered parameters)."""
    target, *args = node.args
    if node.target is sdp.sdp_function:
        target = sdp.resolve(target)
        translate = FUNCTIONS.get(target)
    else:
        translate = METHODS.get(target)
    if translate is None:
        raise _unsupported(node, f"{target_name(node)} of {target}")
    return translate(g, _Call(node.name, target, tuple(args), node.kwargs), out)


def _vocab(g: _Graph, node: fx.Node, out: str) -> str:
    """A vocab-parallel lookup or cross-entropy (pcompile/runtime/vocab_parallel.py) as a pcompile-domain
    node, with this rank's first vocabulary row (`start`)."""
    if node.target is vocab_parallel.vocab_embedding:
        ids, weight, start, padding = node.args
        axis, size, rows = start.args
        op, inputs, extra = "VocabEmbedding", [g.arg(ids), g.arg(weight)], {}
    else:
        logits, target, axis, size, ignore, reduction = node.args
        rows = g.shape(logits)[1 if len(g.shape(logits)) > 1 else 0]
        op, inputs = "VocabParallelCrossEntropy", [g.arg(logits), g.arg(target)]
        extra = {"ignore_index": int(ignore), "reduction": reduction}
    ranks = g.group(axis)
    return g.add(op, inputs, out, domain=DOMAIN, axis=axis, group_size=int(size), group_ranks=ranks,
                 rank_in_group=ranks.index(g.rank), start=ranks.index(g.rank) * int(rows), **extra)


def _reshape(g: _Graph, node: fx.Node, out: str) -> str:
    return g.add("Reshape", [g.arg(node.args[0]), g.const(np.array(g.shape(node), np.int64))], out)


def _transpose(g: _Graph, node: fx.Node, out: str) -> str:
    rank = len(g.shape(node))
    if node.target == "permute":
        dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
        perm = [d % rank for d in dims]
    else:
        a, b = (d % rank for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    return g.add("Transpose", [g.arg(node.args[0])], out, perm=perm)


def _binary(op: str):
    def translate(g: _Graph, node: fx.Node, out: str) -> str:
        like = np.dtype(str(g.values[node.name][1]).replace("torch.", ""))
        return g.add(op, [g.arg(node.args[0], like), g.arg(node.args[1], like)], out)
    return translate


def _arange(g: _Graph, node: fx.Node, out: str) -> str:
    bounds = [g.values[a.name] if isinstance(a, fx.Node) else a for a in node.args]
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (tuple(bounds) + (1,))[:3]
    return g.add("Range", [g.const(np.int64(start)), g.const(np.int64(end)), g.const(np.int64(step))], out)


def _linear_call(g: _Graph, node: fx.Node, out: str) -> str:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _linear(g, g.arg(node.args[0]), g.arg(node.args[1]), None if bias is None else g.arg(bias), out)


FUNCTIONS = {
    operator.add: _binary("Add"), operator.sub: _binary("Sub"), operator.mul: _binary("Mul"),
    operator.truediv: _binary("Div"), torch.add: _binary("Add"), torch.matmul: _binary("MatMul"),
    operator.matmul: _binary("MatMul"),
    F.linear: _linear_call, torch._C._nn.linear: _linear_call,
    F.gelu: lambda g, n, out: _activation(g, g.arg(n.args[0]), "gelu", n.kwargs.get("approximate", "none"), out),
    torch._C._nn.gelu: lambda g, n, out: _activation(g, g.arg(n.args[0]), "gelu",
                                                      n.kwargs.get("approximate", "none"), out),
    F.relu: lambda g, n, out: _activation(g, g.arg(n.args[0]), "relu", "none", out),
    torch.relu: lambda g, n, out: _activation(g, g.arg(n.args[0]), "relu", "none", out),
    F.scaled_dot_product_attention: _attention, torch._C._nn.scaled_dot_product_attention: _attention,
    F.cross_entropy: _cross_entropy, torch.arange: _arange,
    torch.reshape: _reshape, torch.flatten: _reshape,
    F.dropout: lambda g, n, out: g.add("Identity", [g.arg(n.args[0])], out), F.layer_norm: _layer_norm_call,
    # identity forward; it only scales a shared parameter's gradient in backward
    batch_regroup.grad_scale: lambda g, n, out: g.add("Identity", [g.arg(n.args[0])], out),
    sdp.module_with: _module_with, sdp.sdp_module: _module_with, sdp.sdp_function: _runner, sdp.sdp_method: _runner,
    sdp.sdp_gather: _sdp_gather, torch.chunk: _chunk, operator.getitem: _item,
    **{fn: _collective for fn in COLLECTIVE_OPS},
    vocab_parallel.vocab_embedding: _vocab, vocab_parallel.vocab_parallel_cross_entropy: _vocab,
}
METHODS = {"view": _reshape, "reshape": _reshape, "flatten": _reshape, "transpose": _transpose,
           "permute": _transpose, "contiguous": lambda g, n, out: g.add("Identity", [g.arg(n.args[0])], out)}


def _unsupported(node: fx.Node, what: str) -> PcompileError:
    return PcompileError(f"ONNX export: no translation for {what} (node {node.name})",
                         "export a model made of Linear/LayerNorm/Embedding/GELU/ReLU/SDPA/cross_entropy and views, "
                         "or add a translation to pcompile/backends/onnx.py")


def _translate(g: _Graph, node: fx.Node) -> None:
    g.current = node
    value = g.values.get(node.name)
    if node.op == "output":
        return
    if node.op == "placeholder":
        if isinstance(value, float):  # a number the runtime passes (a masked mean's step count): a 0-dim input
            info = helper.make_tensor_value_info(node.name, TensorProto.FLOAT, [])
            helper.set_metadata_props(info, {"pcompile.note": "passed by the runtime each step (normalise_loss)"})
            g.inputs.append(info)
        else:
            g.inputs.append(g.typed(node, node.name))
        g.names[node.name] = node.name
        return
    if node.target is step_count:  # the runtime's wait for a step count: the count input itself
        g.names[node.name] = g.names[node.args[0].name]
        return
    tensor = _is_tensor(value)
    if not tensor and not (isinstance(value, tuple) and value and all(map(_is_tensor, value))):
        return  # a folded python value (a size, a device): consumers read it from g.values
    if node.op == "get_attr":
        g.names[node.name] = g.parameter(g.gm.get_parameter(node.target) if node.target in dict(
            g.gm.named_parameters()) else g.gm.get_buffer(node.target), g.ir.meta(node).placement or REPLICATED)
        return
    if node.op == "call_module":
        translate = _module
    elif node.op == "call_method":
        translate = METHODS.get(node.target)
    else:
        translate = FUNCTIONS.get(node.target)
    if translate is None:
        raise _unsupported(node, f"{node.op} {target_name(node)}")
    result = translate(g, node, node.name)
    if tensor:  # a multi-output node named its outputs after the getitems that read them
        g.names[node.name] = result
        g.value_info.append(g.typed(node, node.name))


# -- public API ------------------------------------------------------------------------------
def export_rank(ir: IR, plan: Plan, rank: int, path: str | os.PathLike | None = None, *,
                _values: dict | None = None) -> onnx.ModelProto:
    """The ONNX model of `rank`'s forward graph (checked with onnx.checker); written to `path` if given."""
    gm = rank_module(ir, plan, rank)
    g = _Graph(ir, gm, plan, rank, _values or _observe(ir, plan))
    for node in ir.graph.nodes:
        _translate(g, node)
    (output_node,) = ir.graph.find_nodes(op="output")
    results = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else (output_node.args[0],)
    outputs = [g.typed(r, g.names[r.name]) for r in results]
    value_info = [v for v in g.value_info if v.name not in {o.name for o in outputs}]
    graph = helper.make_graph(g.nodes, f"rank{rank}", g.inputs, outputs, list(g.initializers.values()),
                              value_info=value_info)
    model = helper.make_model(graph, producer_name="pcompile",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    helper.set_model_props(model, _model_props(g))
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def _model_props(g: _Graph) -> dict[str, str]:
    """The rank's place in the plan: its coordinate on every axis it uses, and the dp groups
    its gradients are combined over after backward."""
    plan, rank, layout = g.plan, g.rank, g.layout
    props = {"pcompile.rank": str(rank), "pcompile.plan": plan.default.describe(),
             "pcompile.num_devices": str(plan.num_devices)}
    if layout is None:
        axes = ["dp", "tp"]
        props["pcompile.dp_group"] = ",".join(map(str, group_ranks(plan, rank, "dp")))
        props["pcompile.note"] = ("forward graph (returns the loss); after backward, gradients are averaged "
                                  "over dp_group")
    else:
        # the input split, the loss parts and the gradient sums use dp axes that no node may name
        dp_axes = sorted({axis for axis, _ in layout.param_axes.values()})
        axes = ["dp", "tp"] + sorted((g.axes | {layout.input_axis, layout.loss_axis, *dp_axes}) - {"dp", "tp"})
        props["pcompile.layers"] = ",".join(f"{layer}={plan.strategy_for(layer).describe()}" for layer in g.ir.layers)
        props["pcompile.dp_group"] = ";".join(f"{axis}=" + ",".join(map(str, group_ranks(plan, rank, axis)))
                                              for axis in dp_axes)
        props["pcompile.note"] = (
            f"forward graph (returns this rank's part of the loss, the mean of {layout.loss_dp} parts over "
            f"{layout.loss_axis}); after backward, each parameter's gradient is summed over the dp_group of its "
            f"pcompile.dp_axis and divided by {layout.loss_dp}")
    if g.sdp_shardings:
        props["pcompile.note"] += ("; a ZeRO-3 shard's gradient (an initializer sharded @dp) is its SdpGather's "
                                   "backward instead: reduce-scattered over the gather's group, averaged")
    props["pcompile.coords"] = ",".join(f"{axis}={coordinate(plan, rank, axis)}" for axis in axes)
    return props


def export(ir: IR, plan: Plan, directory: str | os.PathLike) -> list[str]:
    """Write `rank{r}.onnx` for every rank of `plan` into `directory`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths, values = [], _observe(ir, plan)  # every rank has the same local shapes
    for rank in range(plan.num_devices):
        path = os.path.join(directory, f"rank{rank}.onnx")
        export_rank(ir, plan, rank, path, _values=values)
        paths.append(path)
    return paths
